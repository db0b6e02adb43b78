"""The worker end to end on real RabbitMQ, Redis and the Mongo-wire server."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import numpy as np
import pika
import pytest

from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.embeddings import HashProvider, PhraseEmbedder
from myshop_ops.adapters.management import for_dsn
from myshop_ops.adapters.store import RECENT_IDS, TOKEN_BYTES, Store, message_ids
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.core.limits import Limits
from myshop_ops.core.pipeline import Pipeline
from myshop_ops.core.retry_routing import (
    H_ERROR_CLASS,
    H_ORIGINAL_QUEUE,
    H_ORIGINAL_SIZE,
    H_RETRY_COUNT,
    H_WORKER_HOST,
)
from myshop_ops.core.worker import Worker
from tests.support.events import T0, expected_profiles, mixed_events, publish, seed_products
from tests.support.services import run_cli, wait_for
from tests.support.workers import check_profiles, failed_messages

pytestmark = pytest.mark.integration


def consume(settings, n: int, prefetch: int = 200, **kw) -> Worker:
    """Run the worker in-process until it has handled ``n`` messages."""
    worker = Worker(settings, prefetch=prefetch, limits=Limits(messages=n, seconds=60), **kw)
    assert worker.run() == 0
    assert worker.limits.reason == f"message limit {n} reached"
    return worker


def assert_profiles(settings, expected: dict, counts: dict | None = None) -> None:
    """The stored profiles are the expected ones (tests.support.workers.check_profiles), each in the settings'
    vector space with a UTC last_updated."""
    for doc in check_profiles(settings, expected, counts).values():
        assert doc["dimensions"] == settings.embedding_dimensions and doc["model"] == settings.model
        assert doc["last_updated"].utcoffset().total_seconds() == 0


def test_profiles_match_the_spec_math(env, topology):
    s = env.settings()
    users = [f"u-{i}" for i in range(6)]
    products = seed_products(s, [f"p{i}" for i in range(10)])
    events = mixed_events(users, list(products), per_user=12)
    publish(s, topology, events)
    worker = consume(s, len(events))
    assert worker.totals.applied == len(events)
    assert_profiles(s, expected_profiles(s, events, products), {u: 12 for u in users})
    store = Store(s.mongodb_url, s.mongodb_db)
    doc = store.get_profile_doc("u-0")
    newest = max((e for e in events if e.user_id == "u-0"), key=lambda e: e.occurred_at)
    assert doc["last_event_id"] == newest.message_id
    assert doc["last_updated"] == newest.occurred_at.replace(microsecond=newest.occurred_at.microsecond // 1000 * 1000)
    assert doc["version"] == worker.totals.writes // len(users) or doc["version"] >= 1
    store.close()


def test_batches_equal_one_by_one(env, topology):
    """prefetch 1 (one event per write) and one big batch give the same profiles, and versions count writes."""
    s = env.settings()
    products = seed_products(s, ["a", "b", "c"])
    events = mixed_events(["solo"], list(products), per_user=9)
    publish(s, topology, events)
    worker = consume(s, len(events), prefetch=1)
    assert worker.totals.writes == 9
    assert_profiles(s, expected_profiles(s, events, products), {"solo": 9})
    store = Store(s.mongodb_url, s.mongodb_db)
    assert store.get_profile_doc("solo")["version"] == 9
    store.close()


def test_late_events_are_merged(env, topology):
    s = env.settings()
    products = seed_products(s, ["x", "y"])
    new = make_event("late-user", "product_purchase", "x", T0)
    old = make_event("late-user", "product_view", "y", T0.replace(day=1, month=10))
    publish(s, topology, [new])
    consume(s, 1)
    publish(s, topology, [old])
    consume(s, 1)
    assert_profiles(s, expected_profiles(s, [new, old], products), {"late-user": 2})
    doc = Store(s.mongodb_url, s.mongodb_db).get_profile_doc("late-user")
    assert doc["last_updated"] == T0 and doc["version"] == 2 and doc["last_event_id"] == new.message_id


@pytest.mark.parametrize("redis_up", [True, False], ids=["redis-up", "redis-down"])
def test_duplicates_never_double_apply(env, topology, redis_up):
    s = env.settings() if redis_up else env.settings(REDIS_URL="redis://127.0.0.1:1/0")
    products = seed_products(s, ["d1"])
    first = make_event("dup-user", "product_purchase", "d1", T0)
    second = make_event("dup-user", "search", "running shoes", T0.replace(hour=13))
    # The same message three times, in separate batches (prefetch 1) and within one batch.
    publish(s, topology, [first, second, first, first])
    redis = RedisState.from_settings(s, timeout=0.2)
    worker = consume(s, 4, prefetch=1, redis=redis)
    publish(s, topology, [first, second])
    worker2 = consume(s, 2, prefetch=10, redis=redis)
    assert worker.totals.applied + worker2.totals.applied == 2
    assert worker.totals.duplicate + worker2.totals.duplicate == 4
    assert_profiles(s, expected_profiles(s, [first, second], products), {"dup-user": 2})
    if not redis_up:
        assert redis.errors > 0


def test_malformed_messages_go_to_failed_and_valid_ones_are_applied(env, topology):
    s = env.settings()
    products = seed_products(s, ["ok"])
    good = make_event("good-user", "product_click", "ok", T0)
    bad_bodies = [
        b"not json",
        b"\xff\xfe\x00",
        json.dumps({"user_id": "u", "event_type": "teleport", "occurred_at": T0.isoformat()}).encode(),
        json.dumps({**json.loads(serialise(good)), "occurred_at": "2026-11-01T12:00:00"}).encode(),
        b"x" * (70 * 1024),
    ]
    publish(s, topology, [bad_bodies[0], good, *bad_bodies[1:]])
    worker = consume(s, 6)
    assert worker.totals.applied == 1 and worker.totals.failed == 5
    assert_profiles(s, expected_profiles(s, [good], products), {"good-user": 1})
    copies = failed_messages(s, topology)
    assert len(copies) == 5
    for props, body in copies:
        h = props.headers
        assert h[H_ERROR_CLASS] == "InvalidMessage" and h[H_RETRY_COUNT] == 0
        assert h[H_ORIGINAL_QUEUE] == topology.queue and h[H_WORKER_HOST]
        # a body over the contract's limit is kept as a prefix, with its size
        whole = body if H_ORIGINAL_SIZE not in h else body + b"x" * (h[H_ORIGINAL_SIZE] - len(body))
        assert props.message_id and whole in bad_bodies
    records = list(Store(s.mongodb_url, s.mongodb_db).failed.find({}))
    assert {r["message_id"] for r in records} == {p.message_id for p, _ in copies}
    naive = next(r for r in records if r["user_id"] == "good-user")
    assert "occurred_at" in naive["error_message"] and naive["history"][0]["error_class"] == "InvalidMessage"


def test_missing_product_is_skipped_and_profile_untouched(env, topology):
    s = env.settings()
    products = seed_products(s, ["real"])
    events = [make_event("m-user", "product_view", "real", T0), make_event("m-user", "product_view", "ghost", T0)]
    publish(s, topology, events)
    worker = consume(s, 2)
    assert worker.totals.skipped == 1 and worker.totals.applied == 1
    assert_profiles(s, expected_profiles(s, events[:1], products), {"m-user": 1})
    assert failed_messages(s, topology) == []


def test_foreign_vector_space_is_refused(env, topology):
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    store.upsert_products([{"product_id": "old", "embedding": np.ones(8, np.float32) / 8**0.5,
                            "model": "ada", "dimensions": 8}])
    publish(s, topology, [make_event("v-user", "product_purchase", "old", T0)])
    consume(s, 1)
    [(props, _)] = failed_messages(s, topology)
    assert props.headers[H_ERROR_CLASS] == "VectorSpaceMismatch"
    assert store.users.count_documents({}) == 0


@pytest.mark.parametrize("embedding", ["not a vector", b"\x00\x01\x02", [float("nan")] * 64, [[0.1] * 64]],
                         ids=["string", "truncated-bytes", "nan", "nested"])
def test_corrupt_product_vector_fails_the_message_not_the_worker(env, topology, embedding):
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    store.products.insert_one({"product_id": "bad", "embedding": embedding, "model": s.model,
                               "dimensions": s.embedding_dimensions})
    good = seed_products(s, ["good"])
    events = [make_event("c-user", "product_view", "bad", T0), make_event("c-user", "product_view", "good", T0)]
    publish(s, topology, events)
    worker = consume(s, 2)
    assert (worker.totals.failed, worker.totals.applied) == (1, 1)
    [(props, _)] = failed_messages(s, topology)
    assert props.headers[H_ERROR_CLASS] == "VectorSpaceMismatch"
    assert "unreadable vector" in props.headers["x-error-message"]
    assert_profiles(s, expected_profiles(s, events[1:], good), {"c-user": 1})


def _three_workers_apply(env, topology, workers, events, users, prefetch: str) -> tuple[list, list[int], bool]:
    """Start three `myshop consume` processes (all ready before anything is published: two could drain it alone
    while the third starts, and then die of SIGTERM before its handler is installed, the rc -15 one test flaked on),
    publish ``events``, wait until the users' profiles count them all, stop the workers: (processes, exit codes,
    whether everything was applied)."""
    s = env.settings()
    procs = [workers.start(env.subprocess_env(), "--prefetch", prefetch, "--time-limit", "120") for _ in range(3)]
    for p in procs:
        p.wait_ready()
    publish(s, topology, events)
    store = Store(s.mongodb_url, s.mongodb_db)

    def all_applied():
        docs = list(store.users.find({}, {"event_count": 1}))
        return len(docs) == len(users) and sum(d["event_count"] for d in docs) == len(events)

    try:
        applied = wait_for(all_applied, timeout=90, what="all events applied", fail=False)
    finally:
        for p in procs:
            p.signal()
        codes = [p.wait(30) for p in procs]
        store.close()
    return procs, codes, applied


def test_concurrent_workers_lose_no_update(env, topology, workers):
    """Three worker processes, all consuming, on the same few users: every event applied exactly once."""
    s = env.settings()
    users = ["hot-1", "hot-2"]
    products = seed_products(s, [f"p{i}" for i in range(5)])
    events = mixed_events(users, list(products), per_user=60)
    procs, codes, applied = _three_workers_apply(env, topology, workers, events, users, "5")
    described = "\n---\n".join(p.describe() for p in procs)
    assert applied, described
    assert codes == [0, 0, 0], described
    assert_profiles(s, expected_profiles(s, events, products), {u: 60 for u in users})


def test_three_workers_on_the_same_users_claim_them_and_never_conflict(env, topology, workers):
    """Three worker processes on the same users, every batch holding most of them: each worker claims its batch's
    users in Redis, keeps the deliveries of users another worker holds for a later batch: no version conflict, no
    retry through a delay queue, every event applied once."""
    s = env.settings()
    users = [f"claim-{i}" for i in range(8)]
    products = seed_products(s, [f"p{i}" for i in range(5)])
    events = mixed_events(users, list(products), per_user=25)
    procs, codes, applied = _three_workers_apply(env, topology, workers, events, users, "20")
    described = "\n---\n".join(p.describe() for p in procs)
    assert applied and codes == [0, 0, 0], described
    summaries = [p.summary() for p in procs]
    conflicts = [int(p.log_field("worker stopped", "conflicts") or -1) for p in procs]
    assert conflicts == [0, 0, 0] and sum(x.retried for x in summaries) == 0, described
    assert sum(x.applied for x in summaries) == len(events) and sum(x.processed for x in summaries) == len(events)
    assert sum(int(p.log_field("worker stopped", "kept") or 0) for p in procs) > 0, described  # they did meet
    assert_profiles(s, expected_profiles(s, events, products), {u: 25 for u in users})


def test_openai_provider_one_request_per_batch(env, topology, fake_openai):
    s = env.settings(EMBEDDING_PROVIDER="openai", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake_openai.base_url,
                     EMBEDDING_DIMENSIONS="1536")
    fake_openai.clear()
    phrases = ["red running shoes", "Red  Running Shoes", "green tea", "usb-c cable"]
    events = [make_event(f"o-{i % 2}", "search", p, T0.replace(minute=i)) for i, p in enumerate(phrases)]
    publish(s, topology, events)
    consume(s, len(events))
    assert len(fake_openai.requests) == 1
    assert sorted(fake_openai.requests[0]["body"]["input"]) == ["green tea", "red running shoes", "usb-c cable"]
    # The fake server's vectors are the hash provider's at 1536 dimensions, bit for bit.
    assert_profiles(s, expected_profiles(s, events, {}), {"o-0": 2, "o-1": 2})


def test_consume_cli_limit_and_exit_codes(env, topology):
    s = env.settings()
    products = seed_products(s, ["c1"])
    events = [make_event(f"c-{i}", "product_purchase", "c1", T0) for i in range(5)]
    publish(s, topology, events)
    done = run_cli("consume", "--limit", "5", env=env.subprocess_env())
    assert done.returncode == 0, done.stderr
    assert "5 messages, 5 applied" in done.stdout
    assert_profiles(s, expected_profiles(s, events, products))
    bad = run_cli("consume", env=env.subprocess_env(WORKER_MAX_RETRIES="42"))
    assert bad.returncode == 2 and "WORKER_MAX_RETRIES='42' is invalid: an integer in 1..10" in bad.stderr
    assert "Traceback" not in bad.stderr
    down = run_cli("consume", env=env.subprocess_env(MONGODB_URL="mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300"))
    assert down.returncode == 3 and "MongoDB at mongodb://127.0.0.1:1/" in down.stderr
    noindex = run_cli("consume", env=env.subprocess_env(MONGODB_DB=env["MONGODB_DB"] + "_empty"))
    assert noindex.returncode == 2 and "run `myshop setup-indexes`" in noindex.stderr
    noqueue = run_cli("consume", "no-such-queue", "--time-limit", "20", env=env.subprocess_env())
    assert noqueue.returncode == 2 and "run `myshop setup-transports`" in noqueue.stdout + noqueue.stderr
    nobroker = run_cli("consume", env=env.subprocess_env(RABBITMQ_DSN="amqp://guest:s3cret@127.0.0.1:1/%2f"))
    assert nobroker.returncode == 3 and "RabbitMQ unreachable" in nobroker.stderr
    assert "s3cret" not in nobroker.stderr and "guest:***@" in nobroker.stderr


def test_setup_commands_are_idempotent_and_adopt_what_exists(env):
    first = run_cli("setup-transports", "--json", env=env.subprocess_env())
    assert first.returncode == 0, first.stderr
    steps = json.loads(first.stdout)["steps"]
    queue = env["RABBITMQ_QUEUE"]
    states = {(st["kind"], st["name"]): st["state"] for st in steps}
    assert {("queue", queue), ("queue", env["RABBITMQ_FAILED_QUEUE"]), ("queue", queue + ".retry.3"),
            ("queue", queue + ".unrouted"), ("policy", f"myshop.{queue}")} <= set(states)
    assert {st["state"] for st in steps if st["kind"] in ("queue", "exchange", "policy")} == {"created", "set"}
    again = json.loads(run_cli("setup-transports", "--json", env=env.subprocess_env()).stdout)["steps"]
    assert {st["state"] for st in again if st["kind"] in ("queue", "exchange", "policy")} == {"existing", "unchanged"}
    # a new retry delay is a policy change: no queue is deleted, the new TTL applies at once
    delay = run_cli("setup-transports", "--json", env=env.subprocess_env(WORKER_RETRY_DELAY="300"))
    assert delay.returncode == 0, delay.stderr
    changed = {st["name"] for st in json.loads(delay.stdout)["steps"] if st["state"] == "set"}
    assert changed == {f"myshop.{queue}.retry.{i}" for i in (1, 2, 3)}
    api = for_dsn(None, env["RABBITMQ_DSN"])
    assert api.policy(f"myshop.{queue}.retry.1")["definition"]["message-ttl"] == 300
    # a main queue of another type is adopted as it is and reported, never redeclared
    other = run_cli("setup-transports", "--json", env=env.subprocess_env(RABBITMQ_QUEUE_TYPE="classic"))
    assert other.returncode == 0, other.stderr
    [main] = [st for st in json.loads(other.stdout)["steps"] if st["name"] == queue and st["kind"] == "queue"]
    assert main["state"] == "adopted" and "configured classic" in main["detail"] and "--migrate" in main["fix"]
    assert api.queue(queue).type == "quorum"
    idx1 = json.loads(run_cli("setup-indexes", "--json", env=env.subprocess_env()).stdout)["indexes"]
    idx2 = json.loads(run_cli("setup-indexes", "--json", env=env.subprocess_env()).stdout)["indexes"]
    assert {i["state"] for i in idx1} == {"created"} and {i["state"] for i in idx2} == {"existing"}
    assert ("user_embeddings", "user_id_unique") in {(i["collection"], i["index"]) for i in idx1}
    conn = pika.BlockingConnection(pika.URLParameters(env["RABBITMQ_DSN"]))
    ok = conn.channel().queue_declare(queue, passive=True)
    assert ok.method.message_count == 0
    conn.close()


def _trickle(settings, topology, events, gap_s: float) -> threading.Thread:
    """Publish events one by one, ``gap_s`` apart, from a thread (a producer's pace, not a wait)."""

    def run() -> None:
        for e in events:
            publish(settings, topology, [e])
            time.sleep(gap_s)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("enabled", [False, True], ids=["micro-batch", "window-1s"])
def test_batch_window_turns_a_burst_into_one_write(env, topology, enabled):
    s = env.settings(EMBEDDING_BATCH_ENABLED=str(enabled).lower(), EMBEDDING_BATCH_WINDOW="1")
    events = [make_event("w-user", "search", f"burst phrase {i}", T0.replace(minute=i)) for i in range(6)]
    producer = _trickle(s, topology, events, gap_s=0.15)
    worker = consume(s, 6)
    producer.join(10)
    assert worker.totals.applied == 6
    if enabled:
        assert worker.totals.writes == 1  # the user never paused for 1 s: one write for the whole burst
    else:
        assert worker.totals.writes >= 3  # each arrival is its own micro-batch
    assert_profiles(s, expected_profiles(s, events, {}), {"w-user": 6})


def test_batch_window_never_stalls_the_prefetch(env, topology):
    """More users than the prefetch can hold: the oldest are released early instead of blocking delivery."""
    s = env.settings(EMBEDDING_BATCH_ENABLED="true", EMBEDDING_BATCH_WINDOW="2")
    events = [make_event(f"p-user{i}", "search", f"phrase {i}", T0) for i in range(20)]
    publish(s, topology, events)
    started = time.monotonic()
    worker = consume(s, 20, prefetch=5)
    assert worker.totals.applied == 20 and time.monotonic() - started < 15
    assert_profiles(s, expected_profiles(s, events, {}), {e.user_id: 1 for e in events})


def test_purchased_product_ids_are_kept_as_a_set(env, topology):
    s = env.settings()
    products = seed_products(s, ["a", "b", "c"])
    first = [make_event("buyer", "product_purchase", "b", T0), make_event("buyer", "product_view", "c", T0)]
    second = [make_event("buyer", "product_purchase", "a", T0.replace(hour=13)),
              make_event("buyer", "product_purchase", "b", T0.replace(hour=14))]
    publish(s, topology, first)
    consume(s, 2)
    publish(s, topology, second)
    consume(s, 2)
    store = Store(s.mongodb_url, s.mongodb_db)
    assert sorted(store.get_profile_doc("buyer")["purchased_product_ids"]) == ["a", "b"]  # a set: no repeats
    store.close()
    assert_profiles(s, expected_profiles(s, first + second, products), {"buyer": 4})


def test_recent_ids_ring_is_bounded_and_reads_the_array_layout(env, topology):
    """Profiles keep their last 256 message ids as one packed Binary; documents written with arrays of hex ids
    (the earlier layout) are still deduplicated against, and rewritten packed."""
    s = env.settings(REDIS_URL="redis://127.0.0.1:1/0")  # no Redis: the profile's ids are the only dedup
    old = make_event("ring-user", "search", "old phrase", T0)
    publish(s, topology, [old])
    consume(s, 1)
    store = Store(s.mongodb_url, s.mongodb_db)
    doc = store.get_profile_doc("ring-user")
    assert isinstance(doc["recent_message_ids"], bytes) and message_ids(doc) == [old.message_id]
    store.users.update_one({"user_id": "ring-user"}, {"$set": {"recent_message_ids": [old.message_id],
                                                               "recent_writes": ["0123456789abcdef"]}})
    later = [make_event("ring-user", "search", f"phrase {k}", T0.replace(hour=1 + k // 60, minute=k % 60))
             for k in range(300)]
    publish(s, topology, [old, *later[:150]])
    worker = consume(s, 151)
    assert worker.totals.duplicate == 1 and worker.totals.applied == 150
    publish(s, topology, later[150:])
    consume(s, 150)
    doc = store.get_profile_doc("ring-user")
    store.close()
    assert message_ids(doc) == [e.message_id for e in later[-RECENT_IDS:]]
    tokens = doc["recent_writes"]
    assert len(tokens) % TOKEN_BYTES == 0 and len(tokens) >= 3 * TOKEN_BYTES
    assert tokens[:TOKEN_BYTES] == bytes.fromhex("0123456789abcdef")  # the array layout's token, carried over
    assert doc["event_count"] == 301


# ---- the cache of profiles this worker wrote last --------------------------------------------------------------


class CountingFinds:
    """A collection counting its reads (``find`` calls)."""

    def __init__(self, coll):
        self.coll, self.finds = coll, 0

    def __getattr__(self, name):
        return getattr(self.coll, name)

    def find(self, *args, **kw):
        self.finds += 1
        return self.coll.find(*args, **kw)


def pipeline(settings) -> tuple[Pipeline, Store]:
    """An in-process pipeline with no Redis: the profiles' own ids are the only dedup, as after a Redis flush."""
    store = Store(settings.mongodb_url, settings.mongodb_db)
    redis = RedisState("redis://127.0.0.1:1/0", timeout=0.2)
    return Pipeline(settings, store, redis, PhraseEmbedder(HashProvider(settings.embedding_dimensions,
                                                                        settings.model), None, ttl=60)), store


def run(pipe: Pipeline, events) -> list[str]:
    return [i.status for i in pipe.process([serialise(e) for e in events]).items]


def searches(user: str, start: int, n: int):
    return [make_event(user, "search", f"phrase {k}", T0 + timedelta(minutes=k)) for k in range(start, start + n)]


def test_profiles_written_last_are_not_read_again(env, topology):
    s = env.settings()
    pipe, store = pipeline(s)
    users = [f"cache-u{i}" for i in range(5)]
    first = [e for u in users for e in searches(u, 0, 3)]
    second = [e for u in users for e in searches(u, 3, 3)]
    try:
        assert set(run(pipe, first)) == {"applied"}
        store.users = counting = CountingFinds(store.users)
        assert set(run(pipe, second)) == {"applied"}
        assert counting.finds == 0, "the second batch read profiles this pipeline had just written"
        assert set(run(pipe, second[:2])) == {"duplicate"}  # the cached ring knows them
        assert counting.finds == 0
    finally:
        store.close()
    assert_profiles(s, expected_profiles(s, first + second, {}), {u: 6 for u in users})


def test_a_cached_profile_changed_by_another_worker_is_read_again(env, topology):
    s = env.settings()
    mine, store = pipeline(s)
    other, other_store = pipeline(s)
    a, b, c = searches("cache-shared", 0, 2), searches("cache-shared", 2, 2), searches("cache-shared", 4, 2)
    try:
        assert set(run(mine, a)) == {"applied"}  # cached here at version 1
        assert set(run(other, b)) == {"applied"}  # version 2, written by the other worker
        assert set(run(mine, c + b[:1])) == {"applied", "duplicate"}  # stale cache: the write misses, re-read
        assert run(mine, b[1:]) == ["duplicate"]
    finally:
        store.close()
        other_store.close()
    assert_profiles(s, expected_profiles(s, a + b + c, {}), {"cache-shared": 6})


def test_an_erased_profile_is_never_resurrected_from_the_cache(env, topology):
    """Erased, then created again by another worker at the same version: the cached copy's _id no longer
    matches, so its write misses and the new profile gets only the new events."""
    s = env.settings()
    mine, store = pipeline(s)
    other, other_store = pipeline(s)
    before, after, later = (searches("cache-erased", k, n) for k, n in ((0, 3), (3, 1), (4, 1)))
    try:
        assert set(run(mine, before)) == {"applied"}  # version 1, cached here
        store.users.delete_one({"user_id": "cache-erased"})  # `myshop user delete`
        assert run(other, after) == ["applied"]  # a new document, version 1 again
        assert run(mine, later) == ["applied"]
    finally:
        store.close()
        other_store.close()
    assert_profiles(s, expected_profiles(s, after + later, {}), {"cache-erased": 2})


def test_product_vectors_are_read_once_per_minute(env, topology):
    s = env.settings()
    products = seed_products(s, ["c1", "c2"])
    pipe, store = pipeline(s)
    views = [make_event(f"cache-viewer{i}", "product_view", f"c{1 + i % 2}", T0 + timedelta(minutes=i))
             for i in range(6)]
    try:
        assert set(run(pipe, views[:3])) == {"applied"}
        store._raw_products = counting = CountingFinds(store._raw_products)  # product vectors are read raw
        assert set(run(pipe, views[3:])) == {"applied"}
        assert counting.finds == 0, "product vectors read again within a minute"
        pipe.products.ttl = 0.0  # the minute has passed
        assert set(run(pipe, [make_event("cache-viewer9", "product_view", "c1", T0)])) == {"applied"}
        assert counting.finds == 1
    finally:
        store.close()
    assert_profiles(s, expected_profiles(s, [*views, make_event("cache-viewer9", "product_view", "c1", T0)],
                                         products))
