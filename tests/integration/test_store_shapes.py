"""Whatever is in user_embeddings and product_embeddings, the worker goes on: hostile documents fail their own
messages with a reason; both layouts are written and read; the shop's product id variants are found."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pika
import pytest
from bson.binary import Binary
from bson.int64 import Int64

from myshop_ops.adapters.management import for_connection
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import make_event
from myshop_ops.base.layout import read_profile
from myshop_ops.core.limits import Limits
from myshop_ops.core.retry_routing import H_ERROR_CLASS
from myshop_ops.core.worker import Worker
from myshop_ops.tools import preflight
from tests.support.events import T0, expected_profiles, publish, seed_products, stored_profile
from tests.support.services import DIMS, run_cli, wait_for
from tests.support.workers import failed_messages, one_line

pytestmark = pytest.mark.integration

GOOD = [0.125] * DIMS
HOSTILE = {  # name: the document's fields besides user_id (each breaks one thing)
    "vector-string": {"vector": "not a vector", "last_updated": T0, "version": 1},
    "vector-nested": {"vector": [GOOD], "last_updated": T0, "version": 1},
    "vector-nan": {"vector": [float("nan")] * DIMS, "last_updated": T0, "version": 1},
    "vector-zero": {"vector": [0.0] * DIMS, "last_updated": T0, "version": 1},
    "vector-short": {"vector": GOOD[:8], "last_updated": T0, "version": 1},
    # arrays of the configured length that are not all doubles, or not all finite: the raw read's fast path
    # (rawbson.py) must hand them to the plain decoder, which refuses them
    "vector-mixed": {"vector": [*GOOD[1:], "x"], "last_updated": T0, "version": 1},
    "vector-one-nan": {"vector": [*GOOD[1:], float("nan")], "last_updated": T0, "version": 1},
    "vector-int64-huge": {"vector": [Int64(2**60)] * DIMS, "last_updated": T0, "version": 1},
    "vector-ints-long": {"vector": [1] * (DIMS + 1), "last_updated": T0, "version": 1},
    "vector-dict": {"vector": {"a": 1}, "last_updated": T0, "version": 1},
    "embedding-garbage": {"embedding": Binary(b"\x27\x00\x01", 9), "magnitude": 1.0, "last_updated": T0,
                          "version": 1},
    "no-vector": {"last_updated": T0, "version": 1},
    "no-version": {"vector": GOOD, "last_updated": T0},
    "version-string": {"vector": GOOD, "last_updated": T0, "version": "3"},
    "last-updated-garbage": {"vector": GOOD, "last_updated": "yesterday", "version": 1},
    "counts-string": {"vector": GOOD, "last_updated": T0, "version": 1, "event_counts": "many"},
    "other-model": {"vector": GOOD, "last_updated": T0, "version": 1, "model": "ada", "dimensions": DIMS},
}


def consume(settings, n: int) -> Worker:
    worker = Worker(settings, prefetch=200, limits=Limits(messages=n, seconds=60))
    assert worker.run() == 0
    return worker


def test_hostile_profiles_fail_their_messages_with_a_reason_and_the_worker_goes_on(env, topology):
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    store.users.insert_many([{"user_id": name, **doc} for name, doc in HOSTILE.items()])
    store.users.insert_one({"user_id": "odd-rings", "vector": GOOD, "last_updated": T0, "version": 1,
                            "recent_message_ids": 7, "recent_writes": ["zz"]})  # unusable rings: read as empty
    products = seed_products(s, ["p1"])
    events = [make_event(u, "product_view", "p1", T0) for u in [*HOSTILE, "odd-rings", "fine"]]
    publish(s, topology, events)
    worker = consume(s, len(events))
    assert (worker.totals.failed, worker.totals.applied) == (len(HOSTILE), 2)
    reasons = {}
    for props, body in failed_messages(s, topology):
        user = next(u for u in HOSTILE if f'"user_id":"{u}"' in body.decode().replace(" ", ""))
        reasons[user] = (props.headers[H_ERROR_CLASS], props.headers["x-error-message"])
    assert set(reasons) == set(HOSTILE)
    for user, (cls, message) in reasons.items():
        assert message.startswith(f"the profile of user {user} cannot be folded into: it"), message
        mismatch = ("vector-short", "vector-ints-long", "other-model")
        assert cls == ("VectorSpaceMismatch" if user in mismatch else "UnreadableProfile")
    assert "untagged 8d vector, expected hash-v1/64d" in reasons["vector-short"][1]
    assert "version is a str" in reasons["version-string"][1]
    assert "neither a vector nor an embedding" in reasons["no-vector"][1]
    assert "mixed values, not of numbers" in reasons["vector-mixed"][1]
    assert "a NaN or infinite element" in reasons["vector-one-nan"][1]
    assert "outside 1e-06..1e+06" in reasons["vector-int64-huge"][1]
    assert "untagged 65d vector" in reasons["vector-ints-long"][1]
    for user in HOSTILE:  # untouched
        assert store.users.find_one({"user_id": user}, {"_id": 0, "version": 1}) == (
            {} if user == "no-version" else {"version": HOSTILE[user]["version"]})
    # an adopted prior with unusable rings: the event applied once, the rings rewritten
    doc = store.users.find_one({"user_id": "odd-rings"})
    assert doc["version"] == 2 and doc["event_count"] == 1 and len(doc["recent_message_ids"]) == 32
    expected = expected_profiles(s, events[-1:], products)["fine"]
    assert np.allclose(stored_profile(s, store.get_profile_doc("fine")).embedding, expected.embedding, atol=1e-6)
    store.close()


def test_layouts_switch_both_ways_and_keep_one_vector(env, topology):
    """STORE_LAYOUT=compact writes the Binary embedding, shop the array vector; each removes the other's fields,
    and a profile written in one layout is folded into by a worker of the other (the same math state)."""
    products = seed_products(env.settings(), ["p1", "p2"])
    events = [make_event("switch", "product_view", "p1", T0),
              make_event("switch", "product_click", "p2", T0 + timedelta(hours=1)),
              make_event("switch", "search", "lamp", T0 + timedelta(hours=2))]
    store = Store(env["MONGODB_URL"], env["MONGODB_DB"])
    for layout, event in zip(("compact", "shop", "compact"), events, strict=True):
        s = env.settings(STORE_LAYOUT=layout)
        publish(s, topology, [event])
        consume(s, 1)
        doc = store.get_profile_doc("switch")
        stored_profile(s, doc)  # asserts the layout's shape
        assert ("vector" in doc, "dimension_count" in doc, "embedding" in doc) == (
            (False, False, True) if layout == "compact" else (True, True, False))
    expected = expected_profiles(s, events, products)["switch"]
    got = read_profile(doc, s.model, s.embedding_dimensions)
    assert not got.adopted and np.allclose(got.profile.embedding, expected.embedding, atol=1e-6)
    assert got.profile.magnitude == pytest.approx(expected.magnitude, rel=1e-6)
    store.close()


def test_the_shops_product_ids_and_untagged_vectors(env, topology):
    """product_id as a string or an int, only productId, untagged vectors of the right or the wrong length."""
    s = env.settings()
    vec = [float(x) for x in np.linspace(0.1, 1.0, DIMS)]
    store = Store(s.mongodb_url, s.mongodb_db)
    store.products.insert_many([
        {"productId": "42", "product_id": "42", "embedding": vec, "updated_at": "2026-02-10T14:30:00+00:00"},
        {"product_id": 7, "embedding": vec},  # an int in the document, a string in the event
        {"productId": "only-camel", "embedding": vec},
        {"product_id": "short", "embedding": vec[:16]},  # untagged, another length
        {"product_id": "tagged-other", "embedding": vec, "model": "ada", "dimensions": DIMS},
    ])
    found, foreign = store.product_vectors(["42", "7", "only-camel", "short", "tagged-other", "none"], s.model, DIMS)
    assert sorted(found) == ["42", "7", "only-camel"]
    assert foreign == {"short": f"an untagged 16d vector, expected hash-v1/{DIMS}d",
                       "tagged-other": f"a ada/{DIMS}d vector, expected hash-v1/{DIMS}d"}
    events = [make_event("ids", "product_view", pid, T0) for pid in (42, "7", "only-camel", "short", "none")]
    publish(s, topology, events)
    worker = consume(s, len(events))
    assert (worker.totals.applied, worker.totals.failed, worker.totals.skipped) == (3, 1, 1)
    [(props, _)] = failed_messages(s, topology)
    assert props.headers["x-error-message"] == f"product short has an untagged 16d vector, expected hash-v1/{DIMS}d"
    assert store.get_profile_doc("ids")["event_count"] == 3
    store.close()


def test_preflight_reports_the_shops_data_and_consumers_that_are_not_myshop(env, topology):
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    store.users.insert_many([
        {"user_id": "php", "vector": GOOD, "dimension_count": DIMS, "last_updated": T0, "version": 4},
        {"user_id": "ours", "vector": GOOD, "magnitude": 2.0, "last_updated": T0, "version": 2, "myshop_version": 2},
        {"user_id": "old", "embedding": Binary(b"\x27\x00" + b"\x00" * 4 * DIMS, 9), "magnitude": 1.0,
         "last_updated": T0, "version": 1},
        {"user_id": "empty", "last_updated": T0, "version": 1},
    ])
    store.products.insert_many([{"productId": "1", "embedding": GOOD}, {"product_id": "2", "embedding": GOOD[:3]}])
    store.users.create_index([("last_updated", 1)], name="idx_last_updated_php")  # the Mongo-wire server allows it
    store.close()
    checks = {c.name: c for c in preflight._shop_data(s, reachable=True)}
    assert checks["profiles"].status == "WARN" and checks["profiles"].detail == (
        "1 in the shop layout, 1 compact, 1 written by the shop's PHP workers (adopted at their next event), 1 without "
        "a vector (their events fail); STORE_LAYOUT=shop: the shop's PHP code cannot read the 1 compact ones until "
        "their next event")
    assert checks["untagged products"].status == "WARN" and checks["untagged products"].detail.startswith(
        f"2 product vectors without a model (the shop's sync), 1 of them {DIMS}-d: used as hash-v1; 1 of another "
        "length or not an array: their events fail; 1 found by productId only")
    assert checks["indexes"].detail == (
        "not named by myshop: user_embeddings.idx_last_updated_php (serves as last_updated)")

    amqp = pika.BlockingConnection(pika.URLParameters(s.rabbitmq_dsn))
    api = for_connection(s.rabbitmq_management_url, s.rabbitmq_dsn, amqp)  # checked to be this broker's
    amqp.close()
    assert [c.status for c in preflight._other_consumers(s, api)] == ["PASS"]
    params = pika.URLParameters(s.rabbitmq_dsn)
    params.client_properties = {"connection_name": "php messenger:consume"}
    php = pika.BlockingConnection(params)
    try:
        php.channel().basic_consume(topology.queue, lambda *a: None)
        [check] = wait_for(lambda: [c for c in preflight._other_consumers(s, api) if c.status == "WARN"], timeout=15)
        assert check.detail.startswith(f"1 connection(s) consuming {topology.queue} are not myshop workers: "
                                       "php messenger:consume from 127.0.0.1 (guest)"), check.detail
    finally:
        php.close()


def test_setup_indexes_names_an_index_the_data_refuses_and_creates_the_others(env):
    """Two catalog documents with one product_id (a sync run twice under other keys): the unique index cannot be
    built. setup-indexes says which, why and what to do, creates every other index, and exits 1 (it was MongoDB's
    duplicate-key error as 'MongoDB failed ... is it running?', exit 3, with nothing after it created)."""
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    store.products.insert_many([{"productId": 7, "product_id": "7", "name": "a"},
                                {"productId": "7", "product_id": "7", "name": "b[/red]"}])
    done = run_cli("setup-indexes", "--json", env=env.subprocess_env())
    assert done.returncode == 1 and "Traceback" not in done.stderr
    states = {(r["collection"], r["index"]): r["state"] for r in json.loads(done.stdout)["indexes"]}
    assert states[("product_embeddings", "product_id_unique")] == (
        "failed: documents of product_embeddings share a value of product_id (a missing field counts as null): make "
        "it unique, then run setup-indexes again")
    assert states[("failed_messages", "expires_at_ttl")] == "created"  # the ones after it too
    assert one_line(done.stderr) == ("error: index(es) not created: product_embeddings.product_id_unique (the state "
                                     "column says why); workers refuse to start without them")
    assert store.missing_indexes() == [("product_embeddings", "product_id_unique")]
    store.products.delete_many({"name": "b[/red]"})
    assert run_cli("setup-indexes", env=env.subprocess_env()).returncode == 0 and store.missing_indexes() == []
    store.close()


def test_profile_writes_in_several_bulks_keep_each_writes_outcome(env, monkeypatch):
    """write_profiles splits its writes into bulks (small ones for the single-threaded test server): a conflict or
    a duplicate insert in a later bulk is reported for its own user, every other write lands."""
    import myshop_ops.adapters.store as store_module
    from myshop_ops.adapters.store import ProfileWrite
    from myshop_ops.base.profile import Profile

    monkeypatch.setattr(store_module, "PROFILE_WRITE_BATCH", 3)
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    store.setup_indexes()
    vec = np.full(DIMS, 1 / np.sqrt(DIMS), np.float32)

    def write(user: str, base, n: int) -> ProfileWrite:
        return ProfileWrite(user, Profile(vec, 1.0 + n, 20_000.0 + n, s.model, DIMS), base,
                            [f"{n:064x}"], {"search": 1}, "search", f"{n:064x}")

    users = [f"bulk-{i}" for i in range(7)]
    assert store.write_profiles([write(u, None, 1) for u in users]).applied == users
    loaded, _ = store.load_profiles(users, s.model, DIMS)
    stale = store_module.StoredProfile(**{**{f: getattr(loaded[users[5]], f) for f in
                                             loaded[users[5]].__slots__}, "version": 0})
    writes = [write(u, loaded[u], 2) for u in users[:5]] + [write(users[5], stale, 2), write(users[6], None, 2),
                                                             write("bulk-new", None, 2)]
    result = store.write_profiles(writes)
    assert result.conflicted == [users[5], users[6]]
    assert result.applied == [*users[:5], "bulk-new"]
    versions = {d["user_id"]: d["version"] for d in store.users.find({}, {"user_id": 1, "version": 1})}
    assert versions == {**dict.fromkeys(users[:5], 2), users[5]: 1, users[6]: 1, "bulk-new": 1}
    store.close()
