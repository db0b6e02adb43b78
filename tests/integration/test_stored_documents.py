"""Documents read from MongoDB go through total parsers: one bad product or profile document (any BSON type in any
field, a cut-short BSON vector, a date outside years 1..9999, a version at the int64 limit) fails only what needs it,
with a reason, on every path (`consume`, `recommend`, `user show`, `verify`); the documents beside it still work."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import bson
import numpy as np
import pytest
from bson import DatetimeMS
from bson.binary import Binary
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.objectid import ObjectId
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.base.layout import ForeignVector, UnreadableProfile, encode_vector, product_vector, read_profile
from myshop_ops.base.profile import VectorSpaceMismatch
from myshop_ops.cli.user import _profile_table
from myshop_ops.core.limits import Limits
from myshop_ops.core.retry_routing import H_ERROR_CLASS
from myshop_ops.core.worker import Worker
from myshop_ops.tools.recommend import MatrixCache, Recommender, RecommendError
from tests.support.events import T0, publish, seed_products
from tests.support.services import DIMS, ROOT, run_cli
from tests.support.workers import failed_messages

pytestmark = pytest.mark.integration

EVIL = {"product_id": "EVIL-1", "embedding": Binary(b"\x27", 9), "model": "hash-v1", "dimensions": DIMS,
        "name": "Evil", "category": "test"}
UNIT = (np.ones(DIMS) / DIMS**0.5).tolist()


def profile_doc(user_id: str, **fields) -> dict:
    """A profile in the shop's layout (as its PHP workers write it), with ``fields`` over it."""
    return {"user_id": user_id, "vector": UNIT, "last_updated": T0, "version": 1, **fields}


def cli_ok(env, *args: str):
    done = run_cli(*args, env=env.subprocess_env(COLUMNS="300"))
    assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stdout, done.stderr)
    return done


# ---- the attacks, by name --------------------------------------------------------------------------------


def test_evil_1_with_a_cut_short_bson_vector_is_left_out_of_recommend_and_user_show(env):
    """EVIL-1's embedding is Binary(b"\\x27", 9) (pymongo's as_vector raised struct.error): `recommend` and
    `user show` work for everyone, without it; the load says once that a product was left out."""
    s = env.settings()
    seed_products(s, ["p1", "p2"])
    store = Store(s.mongodb_url, s.mongodb_db)
    store.products.insert_one(dict(EVIL))
    store.users.insert_one(profile_doc("u1"))
    store.close()
    done = cli_ok(env, "recommend", "u1", "--json")
    assert [r["product_id"] for r in json.loads(done.stdout)["recommendations"]] in (["p1", "p2"], ["p2", "p1"])
    assert done.stderr.count("products left out of recommendations") == 1, done.stderr
    shown = cli_ok(env, "user", "show", "u1")
    assert "p1" in shown.stdout and "EVIL-1" not in shown.stdout and "unavailable" not in shown.stdout


def test_a_product_view_of_evil_1_fails_with_a_reason_and_the_worker_goes_on(env, topology):
    """The real worker, EVIL-1 among valid events: it does not exit (it did, with exit 1, four times in a row until
    the poison journal sent the event to failed), EVIL-1's event fails with a reason, the others are applied."""
    s = env.settings()
    seed_products(s, ["p1"])
    store = Store(s.mongodb_url, s.mongodb_db)
    store.products.insert_one(dict(EVIL))
    events = [make_event("u1", "product_view", "p1", T0), make_event("u2", "product_view", "EVIL-1", T0),
              make_event("u2", "product_view", "p1", T0 + timedelta(seconds=1)),
              make_event("u3", "product_purchase", "EVIL-1", T0), make_event("u3", "search", "shoes", T0)]
    publish(s, topology, events)
    done = subprocess.run([sys.executable, "-m", "myshop_ops", "consume", "--limit", str(len(events)),
                           "--time-limit", "60"], env=env.subprocess_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    reasons = [(p.headers[H_ERROR_CLASS], p.headers["x-error-message"]) for p, _ in failed_messages(s, topology)]
    assert len(reasons) == 2 and all("product EVIL-1 has an unreadable vector" in m for _, m in reasons), reasons
    counts = {d["user_id"]: d["event_count"] for d in store.users.find({}, {"user_id": 1, "event_count": 1})}
    store.close()
    assert counts == {"u1": 1, "u2": 1, "u3": 1}


HOSTILE_PROFILES = {
    "embedding-empty-binary": ({"embedding": Binary(b"", 9), "magnitude": 1.0},
                               "its embedding is an unreadable vector"),
    "last-updated-9999": ({"last_updated": datetime(9999, 6, 1, tzinfo=UTC)}, "more than a day in the future"),
    "version-2^63-2": ({"version": Int64(2**63 - 2)}, "at the limit of its type"),
    "event-count-int64-max": ({"event_count": Int64(2**63 - 1)}, "its event_count is"),
    "magnitude-1e300": ({"embedding": encode_vector(np.array(UNIT, np.float32)), "magnitude": 1e300},
                        "more than any sum of events reaches"),
}


@pytest.mark.parametrize("name", list(HOSTILE_PROFILES))
def test_a_hostile_profile_fails_only_its_users_events_with_a_reason(env, topology, name):
    """A profile with embedding Binary(b"", 9) crashed consume; one dated 9999 acked events as applied with no
    effect; version 2^63-2 made the profile unreadable after one write (int64 overflow): each fails its own
    user's events with a reason, the document untouched, the other user applied."""
    fields, reason = HOSTILE_PROFILES[name]
    s = env.settings()
    seed_products(s, ["p1"])
    store = Store(s.mongodb_url, s.mongodb_db)
    doc = profile_doc("bad", **fields)
    if "embedding" in fields:
        del doc["vector"]
    store.users.insert_one(dict(doc))
    events = [make_event("bad", "product_view", "p1", T0), make_event("good", "product_view", "p1", T0)]
    publish(s, topology, events)
    worker = Worker(s, prefetch=50, limits=Limits(messages=len(events), seconds=60))
    assert worker.run() == 0
    assert (worker.totals.failed, worker.totals.applied) == (1, 1)
    [(props, body)] = failed_messages(s, topology)
    assert props.headers[H_ERROR_CLASS] == "UnreadableProfile" and b'"bad"' in body.replace(b" ", b"")
    assert props.headers["x-error-message"].startswith("the profile of user bad cannot be folded into: ")
    assert reason in props.headers["x-error-message"], props.headers["x-error-message"]
    stored = store.users.find_one({"user_id": "bad"}, {"_id": 0})
    store.close()
    assert stored == {k: v for k, v in doc.items()}, stored  # untouched
    shown = cli_ok(env, "user", "show", "bad")
    assert ("recommendations unavailable" in shown.stdout) == (name == "embedding-empty-binary"), shown.stdout


def test_verify_reports_an_empty_binary_profile_as_unverifiable(env, topology, tmp_path):
    """`verify` read the profile of Binary(b"", 9) with a traceback: it is reported, the run goes on."""
    s = env.settings()
    seed_products(s, ["p1"])
    store = Store(s.mongodb_url, s.mongodb_db)
    store.users.insert_one({"user_id": "bad", "embedding": Binary(b"", 9), "last_updated": T0, "version": 1})
    store.close()
    path = tmp_path / "events.jsonl"
    path.write_bytes(serialise(make_event("bad", "product_view", "p1", T0)) + b"\n")
    done = run_cli("verify", "--events", str(path), "--json", env=env.subprocess_env())
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    [user] = report["problems"]
    assert report["users_unverifiable"] == 1 and not report["ok"], report
    assert user["status"] == "unverifiable" and "unreadable vector" in user["reason"], user


@pytest.mark.parametrize(("field", "value"), [("event_counts", ["product_view", 3]), ("purchased_product_ids", 7),
                                              ("magnitude", "1.5")])
def test_user_show_renders_any_field_type(env, field, value):
    """`user show` crashed on event_counts a list, purchased_product_ids an int, magnitude a string (any other
    type: test_property_any_profile_document_fails_only_its_user)."""
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    store.users.insert_one(profile_doc("odd", **{field: value}))
    store.close()
    assert "user odd" in cli_ok(env, "user", "show", "odd").stdout


def test_dates_outside_years_1_to_9999_never_break_a_read(env):
    """pymongo raised InvalidBSON (not a PyMongoError) mid-cursor on such a date. The Mongo-wire server cannot
    store one, so the reply is decoded here with the store's own codec options: profiles see the date as
    DatetimeMS and refuse it with a reason; products and failed records see the nearest representable date."""
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    try:
        for ms in (253_402_300_800_000 + 1, -62_135_596_800_000 - 1, 2**63 - 1, -(2**63)):
            raw = bson.encode(profile_doc("u", last_updated=DatetimeMS(ms), created_at=DatetimeMS(ms)))
            doc = bson.decode(raw, codec_options=store.users.codec_options)
            with pytest.raises(UnreadableProfile, match=r"last_updated is a date outside years 1\.\.9999"):
                read_profile(doc, s.model, DIMS)
            render(doc)
            for coll in (store.products, store.failed):
                decoded = bson.decode(bson.encode({"updated_at": DatetimeMS(ms)}), codec_options=coll.codec_options)
                assert decoded["updated_at"].year in (1, 9999)
    finally:
        store.close()


# ---- any BSON value in any field ---------------------------------------------------------------------------

_KEYS = st.text("abcdefgh_", min_size=1, max_size=6)
_VECTORISH = st.one_of(  # what a vector field may hold instead of a vector: each has broken a read before
    st.builds(lambda h, b: Binary(h + b, 9), st.sampled_from([b"", b"\x27", b"\x03\x00", b"\x10\x00", b"\x27\x07",
                                                             b"\x27\x00"]), st.binary(max_size=12)),
    st.builds(lambda b: Binary(b"\x27\x00" + b, 9), st.binary(max_size=DIMS * 4 + 8)),
    st.lists(st.floats(width=32), min_size=DIMS, max_size=DIMS),  # a vector, maybe with NaN/Inf
    st.builds(lambda x: [x] * DIMS, st.sampled_from([0.0, 1e-30, 1e30, 0.5, -1])),
)
_SCALARS = st.one_of(_VECTORISH,
    st.none(), st.booleans(), st.integers(-(2**31), 2**31 - 1), st.sampled_from([Int64(2**63 - 1), Int64(-(2**63)),
                                                                                  Int64(2**63 - 2), Int64(0)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=40),
    st.builds(Binary, st.binary(max_size=40), st.integers(1, 255).filter(lambda t: t not in (3, 4))),
    st.builds(Decimal128, st.sampled_from(["1", "-0", "NaN", "Infinity", "1E+6000", "3.5"])),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)),
    st.builds(ObjectId),
)
ANY_BSON = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(_KEYS, inner, max_size=3)), max_leaves=8)
ANY_BSON_OR_OUT_OF_RANGE_DATE = st.one_of(ANY_BSON, st.builds(DatetimeMS, st.integers(-(2**63), 2**63 - 1)))

PRODUCT_FIELDS = ("product_id", "productId", "embedding", "model", "dimensions", "name", "category", "updated_at")
PROFILE_FIELDS = ("vector", "embedding", "magnitude", "last_updated", "model", "dimensions", "version",
                  "myshop_version", "event_count", "event_counts", "purchased_product_ids", "recent_message_ids",
                  "recent_writes", "created_at", "updated_at", "last_event_type", "adopted")


def hostile(base: dict, fields: tuple[str, ...], values) -> st.SearchStrategy[dict]:
    """``base`` with its vector field (``embedding``, or a profile's ``vector``) and some of ``fields`` replaced by
    something else (mostly what a vector field may hold instead of a vector, else any BSON value), or removed."""
    value = st.one_of(st.just(_DROP), _VECTORISH, values)
    vector = st.dictionaries(st.sampled_from(["vector" if "vector" in base else "embedding"]), value, min_size=1)
    changes = st.tuples(vector, st.dictionaries(st.sampled_from(fields), value, max_size=3))
    return changes.map(lambda c: {k: v for k, v in {**base, **c[0], **c[1]}.items() if v is not _DROP})


_DROP = object()
HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))


def good_product(pid: str) -> dict:
    return {"product_id": pid, "embedding": encode_vector(np.array(UNIT, np.float32)), "model": "hash-v1",
            "dimensions": DIMS, "name": pid, "category": "test"}


def render(doc: dict) -> str:
    """`user show`'s table of a profile document, as text."""
    out = io.StringIO()
    Console(file=out, width=200).print(_profile_table(str(doc.get("user_id")), {
        k: doc.get(k) for k in ("version", "event_count", "event_counts", "last_event_type", "last_updated",
                                "magnitude", "model", "dimensions", "created_at", "updated_at")}))
    return out.getvalue()


def test_property_any_product_document_fails_only_itself(env):
    """Generated product documents beside a good one, in the real store: product_vectors and the recommend
    matrix never raise; the good product is always there; a bad one is left out with a reason."""
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)

    @HYPOTHESIS
    @given(st.lists(hostile({**good_product("bad"), "product_id": "bad"}, PRODUCT_FIELDS, ANY_BSON), min_size=1,
                    max_size=3))
    def check(docs: list[dict]) -> None:
        store.products.delete_many({})
        store.products.insert_many([good_product("good"), *docs])
        vectors, foreign = store.product_vectors(["good", "bad", "0"], s.model, DIMS)
        assert "good" in vectors and set(vectors) | set(foreign) <= {"good", "bad", "0"}
        assert all(isinstance(why, str) and why for why in foreign.values())
        recs = Recommender(s, store, MatrixCache()).for_profile(profile_doc("u"), limit=10)  # a fresh matrix
        assert "good" in [r.product_id for r in recs.items]

    try:
        check()
    finally:
        store.close()


def test_property_any_profile_document_fails_only_its_user(env):
    """Generated profile documents beside a good one, in the real store: load_profiles never raises, the good
    profile is read, the bad one is read or refused with a reason; recommendations raise only RecommendError and
    `user show`'s table renders whatever is stored."""
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    store.products.insert_one(good_product("p1"))
    recommender = Recommender(s, store, MatrixCache())

    @HYPOTHESIS
    @given(hostile(profile_doc("bad", magnitude=2.0, model="hash-v1", dimensions=DIMS), PROFILE_FIELDS, ANY_BSON))
    def check(doc: dict) -> None:
        store.users.delete_many({})
        store.users.insert_many([profile_doc("good"), doc])
        profiles, unreadable = store.load_profiles(["good", "bad"], s.model, DIMS)
        assert "good" in profiles and set(profiles) | set(unreadable) == {"good", "bad"}
        assert all(isinstance(e, UnreadableProfile | VectorSpaceMismatch) and str(e) for e in unreadable.values())
        stored = store.get_profile_doc("bad", rings=False)
        try:
            recommender.for_profile(stored, limit=3)
        except RecommendError as exc:
            assert str(exc)
        assert "user bad" in render(stored)

    try:
        check()
    finally:
        store.close()


def test_property_any_decoded_document_is_parsed_or_refused():
    """Any document as the store's codec options decode it (out-of-range dates included: the Mongo-wire server
    cannot store those) is a vector and profile, or refused with ForeignVector / UnreadableProfile /
    VectorSpaceMismatch; `user show`'s table renders it."""
    store = Store("mongodb://127.0.0.1:1/?directConnection=true", "x", timeout_ms=100)  # never connects
    codecs = store.users.codec_options, store.products.codec_options
    store.close()

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(st.dictionaries(st.sampled_from(PROFILE_FIELDS + PRODUCT_FIELDS), ANY_BSON_OR_OUT_OF_RANGE_DATE,
                           max_size=6))
    def check(fields: dict) -> None:
        raw = bson.encode({"user_id": "u", **fields})
        users, products = (bson.decode(raw, codec_options=c) for c in codecs)
        try:
            product_vector(products, "hash-v1", DIMS)
        except ForeignVector as exc:
            assert str(exc)
        try:
            read_profile(users, "hash-v1", DIMS)
        except (UnreadableProfile, VectorSpaceMismatch) as exc:
            assert str(exc)
        assert "user u" in render(users)

    check()


def test_a_product_dated_9999_does_not_freeze_the_recommend_cache(env):
    """The matrix cache reloads when the newest updated_at changes: a product dated 9999 (date or ISO string) stayed
    the newest forever, so a re-embedded product was never seen by recommendations (same document count)."""
    s = env.settings()
    seed_products(s, ["p1", "p2"])
    store = Store(s.mongodb_url, s.mongodb_db)
    store.products.insert_many([{**good_product("future-date"), "updated_at": datetime(9999, 1, 1, tzinfo=UTC)},
                                {**good_product("future-text"), "updated_at": "9999-01-01T00:00:00+00:00"}])
    cache = MatrixCache()
    recommender = Recommender(s, store, cache)
    recommender.for_profile(profile_doc("u"), limit=3)
    store.update_products({"p1": {"name": "renamed"}})  # what a re-embedding or a catalog update does
    names = {r.product_id: r.name for r in recommender.for_profile(profile_doc("u"), limit=10).items}
    store.close()
    assert cache.loads == 2 and names["p1"] == "renamed", (cache.loads, names)
