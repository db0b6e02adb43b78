"""`myshop verify`: the oracle accepts what the worker stored and catches every kind of damage."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest

from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.base.layout import decode_vector, encode_vector, vector_value
from myshop_ops.core.limits import Limits
from myshop_ops.core.worker import Worker
from tests.support.events import T0, mixed_events, publish, seed_products
from tests.support.services import run_cli, wait_for
from tests.support.workers import wait_queue

pytestmark = pytest.mark.integration


def run_verify(env, path) -> tuple[dict, int]:
    done = run_cli("verify", "--events", str(path), "--json", env=env.subprocess_env())
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout), done.returncode


@pytest.fixture
def applied(env, topology, tmp_path):
    """24 mixed events of 3 users, a duplicate, a product without vector, a product in another vector space and
    an invalid line, all published and consumed; the recorded file holds exactly what was published."""
    s = env.settings()
    products = seed_products(s, [f"p{i}" for i in range(4)])
    store = Store(s.mongodb_url, s.mongodb_db)
    store.upsert_products([{"product_id": "old", "embedding": np.ones(8, np.float32) / 8**0.5, "model": "ada",
                            "dimensions": 8}])
    users = [f"{env['MONGODB_DB']}-v{i}" for i in range(3)]
    events = mixed_events(users, list(products), per_user=8)
    ghost = make_event(users[0], "product_view", "no-such-product", T0)
    foreign = make_event(users[1], "product_purchase", "old", T0)
    bodies = [serialise(e) for e in [*events, events[3], ghost, foreign]] + [b'{"not": "an event"}']
    publish(s, topology, bodies, message_ids=False)
    worker = Worker(s, limits=Limits(messages=len(bodies), seconds=60))
    assert worker.run() == 0
    assert (worker.totals.applied, worker.totals.failed) == (24, 2)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(bodies) + b"\n")
    yield s, store, users, path
    store.close()


def test_verify_accepts_what_the_worker_stored(env, applied):
    _, _, _, path = applied
    report, code = run_verify(env, path)
    assert code == 0 and report["ok"] is True
    assert {k: report[k] for k in ("lines", "invalid_lines", "events", "duplicates_in_file", "skipped_no_product",
                                   "in_failed", "users", "users_ok", "events_lost", "events_duplicated")} == {
        "lines": 28, "invalid_lines": 1, "events": 26, "duplicates_in_file": 1, "skipped_no_product": 1,
        "in_failed": 1, "users": 3, "users_ok": 3, "events_lost": 0, "events_duplicated": 0}
    piped = {k: v for k, v in env.subprocess_env().items() if k != "COLUMNS"}  # a pipe, no terminal width given
    table = run_cli("verify", "--events", str(path), env=piped)
    assert table.returncode == 0 and "verification: OK" in table.stdout
    assert "lost (users/events)" in table.stdout and "…" not in table.stdout  # whole columns, nothing cut


def test_verify_reports_lost_duplicated_and_diverging_users(env, applied):
    s, store, users, path = applied
    store.users.delete_one({"user_id": users[0]})
    store.users.update_one({"user_id": users[1]}, {"$inc": {"event_count": 1}})
    doc = store.get_profile_doc(users[2])
    rng = np.random.default_rng(1)
    store.users.update_one({"user_id": users[2]}, {"$set": {"vector": vector_value(
        rng.standard_normal(s.embedding_dimensions).astype(np.float32), s.store_layout)}})
    assert doc is not None
    report, code = run_verify(env, path)
    assert code == 1 and report["ok"] is False
    assert (report["users_lost"], report["users_duplicated"], report["users_diverging"]) == (1, 1, 1)
    assert report["events_lost"] == 8 and report["events_duplicated"] == 1
    by_user = {p["user_id"]: p for p in report["problems"]}
    assert by_user[users[0]]["status"] == "lost" and by_user[users[0]]["stored_events"] == 0
    assert by_user[users[2]]["status"] == "diverging" and by_user[users[2]]["cosine"] < 0.9


def test_verify_bad_file_is_one_line(env, topology, tmp_path):
    done = run_cli("verify", "--events", str(tmp_path / "missing.jsonl"), env=env.subprocess_env())
    assert done.returncode == 2 and "No such file" in done.stderr and done.stderr.count("\n") == 1


def test_verify_reports_messages_in_flight_as_pending_not_lost(env, topology, workers, tmp_path):
    """Right after a worker stopped the queue still holds events: verify says so (pending, not lost); once a consumer
    has applied them, verify is OK."""
    s = env.settings()
    seed_products(s, ["p0", "p1"])
    users = [f"{env['MONGODB_DB']}-f{i}" for i in range(2)]
    events = mixed_events(users, ["p0", "p1"], per_user=6)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(serialise(e) for e in events) + b"\n")
    publish(s, topology, events)
    worker = Worker(s, prefetch=4, limits=Limits(messages=4, seconds=60))
    assert worker.run() == 0  # 4 applied, 8 still queued with no consumer
    report, code = run_verify(env, path)
    assert code == 1 and report["ok"] is False and report["in_flight"] == 8
    assert report["users_lost"] == 0 and report["events_lost"] == 8 and report["users_pending"] >= 1
    assert {p["status"] for p in report["problems"]} == {"pending"}
    table = run_cli("verify", "--events", str(path), "--wait", "0", env=env.subprocess_env())
    assert "NOT SETTLED" in table.stdout and "8 message(s) still queued or unacked" in " ".join(table.stdout.split())
    workers.start(env.subprocess_env(), "--time-limit", "60")  # a consumer drains the rest
    wait_queue(s, topology.queue, consumers=1)
    # once every event is in its profile, nothing is in flight and verify is OK; the unacked count verify reads is
    # the management API's sample (seconds old), so verify itself cannot be the one to wait for the last batch
    store = Store(s.mongodb_url, s.mongodb_db)
    try:
        wait_for(lambda: sum(d.get("event_count", 0) for d in store.profile_progress(users)) == len(events),
                 timeout=60, what="the consumer to apply the 8 queued events")
    finally:
        store.close()
    report, code = run_verify(env, path)
    assert code == 0 and report["ok"] is True and report["in_flight"] == 0 and report["users_ok"] == 2


def _forge_adoption(s, store, user: str, cosine: float, *, prior: bool) -> None:
    """Replace the user's vector by one at ``cosine`` to the true one and add an adoption record that agrees with the
    profile (an earlier version, no events before it, a day before its time). With ``prior`` the record also holds
    a prior whose weight, decayed, is exactly the length the forged sum has beyond the true one (what the old rule
    measured), in another direction."""
    doc = store.get_profile_doc(user)
    true = np.asarray(doc["vector"], np.float64)
    other = np.random.default_rng(7).standard_normal(true.size)
    other -= (other @ true) * true
    forged = cosine * true + np.sqrt(1 - cosine**2) * other / np.linalg.norm(other)
    record = {"version": 0, "last_updated": doc["last_updated"] - timedelta(days=1), "event_count": 0}
    if prior:
        direction = np.random.default_rng(8).standard_normal(true.size)
        record.update(event_counts={}, vector=encode_vector(direction / np.linalg.norm(direction)),
                      magnitude=doc["magnitude"] * float(np.linalg.norm(forged - true)) * np.exp(s.decay_lambda))
    store.users.update_one({"user_id": user}, {"$set": {
        "vector": vector_value(forged.astype(np.float32), s.store_layout), "adopted": record}})


@pytest.mark.parametrize("prior", [False, True], ids=["record-without-prior", "record-with-prior"])
@pytest.mark.parametrize("cosine", [0.287, 0.758])
def test_verify_forged_adoption_record_is_not_ok(env, applied, cosine, prior):
    """A profile whose vector was replaced (cosine 0.287, then 0.758 to the truth) plus a forged `adopted` record
    passed as ok: the old rule only measured the sum's length beyond the events. A record without a prior cannot be
    checked: unverifiable; one with a prior is recomputed as fold(prior, events): the forged vector diverges."""
    s, store, users, path = applied
    _forge_adoption(s, store, users[1], cosine, prior=prior)
    report, code = run_verify(env, path)
    assert code == 1 and report["ok"] is False
    status = "diverging" if prior else "unverifiable"
    assert (report["users_ok"], report[f"users_{status}"], report["users_adopted"]) == (2, 1, 1)
    [problem] = report["problems"]
    assert problem["user_id"] == users[1] and problem["status"] == status and problem["adopted"] is True
    assert "not the events'" in problem["reason"] if prior else \
        problem["reason"] == "adopted before myshop kept the prior: cannot be checked"
    table = run_cli("verify", "--events", str(path), "--wait", "0", env=env.subprocess_env(COLUMNS="300"))
    assert table.returncode == 1 and f"verification: {'MISMATCH' if prior else 'UNVERIFIABLE'}" in table.stdout


def _shop_profile(user: str, vec: np.ndarray, when, version: int) -> dict:
    """A profile as the shop's PHP workers write it: the unit vector as doubles, a time in whole seconds, no
    magnitude, model or counts (tests/shop/shop_mongo.php writes the same through the shop's own code)."""
    return {"user_id": user, "vector": [float(x) for x in vec / np.linalg.norm(vec)], "dimension_count": len(vec),
            "last_updated": when, "version": version, "created_at": when, "updated_at": when}


@pytest.fixture(params=["shop", "compact"])
def adopted(request, env, topology, tmp_path):
    """6 users whose profiles the shop's PHP workers wrote and 1 new one, 4 mixed events each (and one event older
    than a shop profile), consumed by a worker writing ``request.param``'s layout; the file holds what was
    published."""
    env["STORE_LAYOUT"] = request.param
    s = env.settings()
    products = seed_products(s, [f"p{i}" for i in range(4)])
    store = Store(s.mongodb_url, s.mongodb_db)
    users = [f"{env['MONGODB_DB']}-a{i}" for i in range(7)]
    rng = np.random.default_rng(3)
    store.users.insert_many([_shop_profile(u, rng.standard_normal(s.embedding_dimensions),
                                           (T0 - timedelta(days=3 + i, seconds=17)).replace(microsecond=0), 2)
                             for i, u in enumerate(users[:6])])
    events = [*mixed_events(users, list(products), per_user=4),
              make_event(users[0], "product_view", "p1", T0 - timedelta(days=5))]
    publish(s, topology, events)
    worker = Worker(s, prefetch=200, limits=Limits(messages=len(events), seconds=60))
    assert worker.run() == 0 and worker.totals.applied == len(events)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(serialise(e) for e in events) + b"\n")
    yield s, store, users, path
    store.close()


def test_verify_checks_an_adopted_shop_profile_exactly(env, adopted):
    """A profile the shop's PHP workers wrote, adopted by a real worker: its adoption record holds the prior, so
    verify recomputes fold(prior, events) and says OK, in both layouts."""
    s, store, users, path = adopted
    doc = store.get_profile_doc(users[0])
    assert doc["adopted"]["vector"].subtype == 9 and doc["adopted"]["magnitude"] == 1.0
    assert ("vector" in doc) == (s.store_layout == "shop")
    report, code = run_verify(env, path)
    assert code == 0 and report["ok"] is True, report
    assert (report["users"], report["users_ok"], report["users_adopted"], report["events"]) == (7, 7, 6, 29)


@pytest.mark.parametrize("adopted", ["shop"], indirect=True)
def test_verify_adoption_record_inconsistent_with_the_profile_is_unverifiable(env, adopted):
    """What an adoption record claims is checked against the document: an earlier version, no more events, no
    later time, a finite unit vector of the configured size, a finite positive magnitude. Anything else is
    unverifiable with the reason, never ok."""
    s, store, users, path = adopted
    docs = {u: store.get_profile_doc(u) for u in users[:6]}
    unit = f"its vector is not a {s.embedding_dimensions}d unit vector"
    cases = [  # (the change, given the document and its prior; the reason)
        (lambda d, v: {"version": d["version"]}, "contradicts the profile"),
        (lambda d, v: {"event_count": d["event_count"] + 1}, "contradicts the profile"),
        (lambda d, v: {"last_updated": d["last_updated"] + timedelta(seconds=1)}, "contradicts the profile"),
        (lambda d, v: {"vector": encode_vector(v * 2)}, unit),
        (lambda d, v: {"vector": encode_vector(v[:-1])}, unit),
        (lambda d, v: {"vector": encode_vector(np.where(v == v.max(), np.nan, v))}, "a NaN or infinite element"),
        (lambda d, v: {"magnitude": 0.0}, "its magnitude is 0.0"),
        (lambda d, v: {"magnitude": float("nan")}, "its magnitude is a float"),
        (lambda d, v: {"magnitude": "1"}, "its magnitude is a str"),
        (lambda d, v: {"event_counts": "search"}, "its event_counts is a str"),
        (lambda d, v: {"vector": None}, "its vector is an unreadable vector (missing)"),
        (lambda d, v: {"vector": None, "magnitude": None}, "adopted before myshop kept the prior: cannot be checked"),
    ]
    for batch in (cases[:6], cases[6:]):
        for user, (change, _) in zip(users[:6], batch, strict=True):
            record = docs[user]["adopted"]
            tampered = {**record, **change(docs[user], decode_vector(record["vector"]))}
            store.users.update_one({"user_id": user}, {"$set": {"adopted": {
                k: v for k, v in tampered.items() if v is not None}}})
        report, code = run_verify(env, path)
        assert code == 1 and report["users_ok"] == 1 and report["users_unverifiable"] == 6, report
        by_user = {p["user_id"]: p for p in report["problems"]}
        for user, (_, reason) in zip(users[:6], batch, strict=True):
            assert by_user[user]["status"] == "unverifiable" and reason in by_user[user]["reason"], (reason, by_user)


def test_verify_checks_what_a_profile_says_about_its_past(env, applied):
    """Records a profile keeps about itself excuse nothing: an adoption record that contradicts the profile, an
    unreadable one, a counter or a time that is not the events' are reported, never ok."""
    _, store, users, path = applied
    doc = store.get_profile_doc(users[0])
    store.users.update_one({"user_id": users[0]}, {"$set": {"adopted": {
        "version": doc["version"] + 5, "last_updated": doc["last_updated"], "event_count": 0}}})
    store.users.update_one({"user_id": users[1]}, {"$set": {"adopted": "yes"}})
    store.users.update_one({"user_id": users[2]}, {"$set": {"last_updated": doc["last_updated"] + timedelta(days=9)}})
    report, code = run_verify(env, path)
    assert code == 1 and report["users_ok"] == 0
    by_user = {p["user_id"]: p for p in report["problems"]}
    assert by_user[users[0]]["status"] == "unverifiable" and "contradicts" in by_user[users[0]]["reason"]
    assert by_user[users[1]]["status"] == "unverifiable" and "unreadable" in by_user[users[1]]["reason"]
    assert by_user[users[2]]["status"] == "diverging" and "last_updated" in by_user[users[2]]["reason"]
