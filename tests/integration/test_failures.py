"""Retries through the delay queues, the failed queue and `myshop failed show/retry/remove`."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pika
import pytest

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Publisher
from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.embeddings import PhraseEmbedder, make_provider
from myshop_ops.adapters.management import for_dsn
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.core.limits import Limits
from myshop_ops.core.retry_routing import H_ERROR_CLASS, H_ERROR_MESSAGE, H_RETRY_COUNT
from myshop_ops.core.worker import Worker
from tests.support.events import T0, publish
from tests.support.services import run_cli

pytestmark = pytest.mark.integration


def openai_env(env, fake):
    return {"EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": fake.base_url,
            "EMBEDDING_DIMENSIONS": "1536"}


def run_until(settings, condition, timeout=30.0) -> Worker:
    """Run an in-process worker until ``condition(store)`` holds (checked between batches via a time limit)."""
    store = Store(settings.mongodb_url, settings.mongodb_db)
    deadline = time.monotonic() + timeout
    worker = None
    while time.monotonic() < deadline:
        worker = Worker(settings, limits=Limits(seconds=1), store=store)
        worker.run()
        if condition(store):
            return worker
    raise AssertionError("condition not reached")


def queue_messages(settings, queue) -> list[tuple]:
    conn = broker.connect(settings.rabbitmq_dsn)
    ch = conn.channel()
    out = []
    while (got := ch.basic_get(queue, auto_ack=False))[0] is not None:
        out.append(got[1:])
    conn.close()  # nothing acked: all go back
    return out


def test_transient_failures_are_retried_with_growing_delays_then_applied_once(env, topology, fake_openai):
    s = env.settings(**openai_env(env, fake_openai))
    fake_openai.clear()
    fake_openai.fail_next(503, retry_after_ms=1, times=3 * 2)  # the SDK tries 3 times per worker attempt
    event = make_event("retry-user", "search", "noise cancelling headphones", T0)
    publish(s, topology, [event])
    totals = {"retried": 0}
    store = Store(s.mongodb_url, s.mongodb_db)
    deadline = time.monotonic() + 30
    while store.get_profile_doc("retry-user") is None and time.monotonic() < deadline:
        w = Worker(s, limits=Limits(seconds=1), store=store)
        w.run()
        totals["retried"] += w.totals.retried
    doc = store.get_profile_doc("retry-user")
    assert doc is not None and doc["event_count"] == 1 and doc["version"] == 1
    assert totals["retried"] == 2
    attempts = [r["at"] for r in fake_openai.requests]
    assert len(attempts) == 7  # 2 failed worker attempts x 3 SDK tries + 1 success
    # WORKER_RETRY_DELAY=200 ms doubling: >= 200 ms before attempt 2, >= 400 ms before attempt 3.
    assert attempts[3] - attempts[2] >= 0.2 and attempts[6] - attempts[5] >= 0.4
    assert queue_messages(s, topology.failed_queue) == []


def test_permanent_failure_ends_in_failed_after_max_retries_and_failed_retry_applies_it(env, topology, fake_openai):
    s = env.settings(**openai_env(env, fake_openai))
    fake_openai.clear()
    fake_openai.fail_next(503, retry_after_ms=1, times=10_000)
    event = make_event("doomed-user", "search", "garden hose", T0)
    publish(s, topology, [event])
    store = Store(s.mongodb_url, s.mongodb_db)
    run_until(s, lambda st: st.failed.count_documents({}) == 1)
    [(props, body)] = queue_messages(s, topology.failed_queue)
    h = props.headers
    assert h[H_RETRY_COUNT] == 3 and h[H_ERROR_CLASS] == "EmbeddingError"
    assert h[H_ERROR_MESSAGE].startswith("gave up after 3 retries")
    assert props.message_id == event.message_id and body == serialise(event)
    rec = store.failed.find_one({"message_id": event.message_id})
    assert rec["retry_count"] == 3 and rec["user_id"] == "doomed-user" and len(rec["history"]) == 4
    assert all(x in h for x in ("x-first-failure-at", "x-last-failure-at", "x-worker-host", "x-original-queue"))
    assert store.get_profile_doc("doomed-user") is None

    # The operator sees it, fixes the cause, retries it: applied once, gone from queue and collection.
    shown = run_cli("failed", "show", "--json", env=env.subprocess_env(**openai_env(env, fake_openai)))
    data = json.loads(shown.stdout)
    assert data["queue_count"] == 1 and data["messages"][0]["message_id"] == event.message_id
    one = run_cli("failed", "show", event.message_id, env=env.subprocess_env(**openai_env(env, fake_openai)))
    assert "garden hose" in one.stdout and "gave up after 3 retries" in one.stdout and "history" in one.stdout
    fake_openai.clear()
    refused = run_cli("failed", "retry", event.message_id, env=env.subprocess_env(**openai_env(env, fake_openai)))
    assert refused.returncode == 2 and "--force" in refused.stderr
    retried = run_cli("failed", "retry", event.message_id, "--force",
                      env=env.subprocess_env(**openai_env(env, fake_openai)))
    assert retried.returncode == 0 and "retried 1" in retried.stdout
    assert store.failed.count_documents({}) == 0 and queue_messages(s, topology.failed_queue) == []
    [(props, _)] = queue_messages(s, topology.queue)
    assert H_RETRY_COUNT not in (props.headers or {})
    run_until(s, lambda st: st.get_profile_doc("doomed-user") is not None)
    assert store.get_profile_doc("doomed-user")["event_count"] == 1


def test_failed_show_filters_stats_and_reports_drift(env, topology):
    s = env.settings()
    bodies = [b"not json", json.dumps({"user_id": "filter-me", "event_type": "nope"}).encode(), b"{}"]
    publish(s, topology, bodies, message_ids=False)
    run_until(s, lambda st: st.failed.count_documents({}) == 3)
    sub = env.subprocess_env()
    stats = json.loads(run_cli("failed", "show", "--stats", "--json", env=sub).stdout)
    assert stats["by_error_class"] == {"InvalidMessage": 3}
    filtered = json.loads(run_cli("failed", "show", "--filter", "FILTER-ME", "--json", env=sub).stdout)
    assert [m["user_id"] for m in filtered["messages"]] == ["filter-me"]
    assert json.loads(run_cli("failed", "show", "--since", "1h", "--json", env=sub).stdout)["record_count"] == 3
    assert run_cli("failed", "show", "--since", "soon", env=sub).returncode == 2

    # Drift both ways: a dead-lettered message without a record, and a record whose message is gone.
    conn = broker.connect(s.rabbitmq_dsn)
    Publisher(conn).publish(topology.failed_exchange, topology.failed_queue, b'{"user_id": "dl"}',
                            message_id="dead-lettered-1", headers={"x-first-death-reason": "delivery_limit"})
    ch = conn.channel()
    method, props, _ = ch.basic_get(topology.failed_queue, auto_ack=False)
    gone = props.message_id
    ch.basic_ack(method.delivery_tag)
    conn.close()
    table = run_cli("failed", "show", env=sub)
    assert "drift:" in table.stdout and "recorded now" in table.stdout and "no message left" in table.stdout
    store = Store(s.mongodb_url, s.mongodb_db)
    assert store.failed.find_one({"message_id": "dead-lettered-1"})["error_class"] == "DeliveryLimitExceeded"
    assert run_cli("failed", "remove", gone, "--force", env=sub).returncode == 0
    assert store.failed.find_one({"message_id": gone}) is None
    removed = run_cli("failed", "remove", "--all", "--force", env=sub)
    assert removed.returncode == 0 and store.failed.count_documents({}) == 0
    assert queue_messages(s, topology.failed_queue) == []


def test_walking_the_failed_queue_keeps_every_message_once(env, topology):
    s = env.settings()
    bodies = [f"bad {i}".encode() for i in range(30)]
    publish(s, topology, bodies, message_ids=False)
    run_until(s, lambda st: st.failed.count_documents({}) == 30)
    before = [b for _, b in queue_messages(s, topology.failed_queue)]
    for _ in range(3):
        assert run_cli("failed", "show", "--json", env=env.subprocess_env()).returncode == 0
    target = Store(s.mongodb_url, s.mongodb_db).failed.find_one({"body": "bad 7"})["message_id"]
    assert run_cli("failed", "remove", target, "--force", env=env.subprocess_env()).returncode == 0
    after = [b for _, b in queue_messages(s, topology.failed_queue)]
    assert sorted(after) == sorted(b for b in before if b != b"bad 7") and len(after) == 29
    conn = pika.BlockingConnection(pika.URLParameters(env["RABBITMQ_DSN"]))
    assert conn.channel().queue_declare(topology.failed_queue, passive=True).method.message_count == 29
    conn.close()


def test_failed_messages_are_kept_for_the_retention_only(env, topology):
    """FAILED_RETENTION_DAYS: a record expires that long after its last failure (TTL index), and the failed queue
    drops its copies after as long (policy), so search phrases in failed bodies are not kept forever."""
    s = env.settings(FAILED_RETENTION_DAYS="30")
    store = Store.from_settings(s)
    assert store.setup_indexes() and not store.missing_indexes()
    now = datetime.now(UTC)
    old, fresh = ({"failure_id": f"f-{n}", "message_id": n, "last_failure_at": when, "first_failure_at": when,
                   "error_class": "InvalidMessage", "body": "search phrase"}
                  for n, when in (("old", now - timedelta(days=31)), ("fresh", now - timedelta(days=29))))
    store.record_failures([old, fresh])
    # the Mongo-wire server hides an expired document at once; real MongoDB removes it within ~60 s
    assert [d["message_id"] for d in store.failed.find({}, {"message_id": 1})] == ["fresh"]
    expires = store.failed.find_one({"message_id": "fresh"})["expires_at"]
    assert abs(expires - (fresh["last_failure_at"] + timedelta(days=30))) < timedelta(milliseconds=1)  # BSON: ms
    keep = Store.from_settings(env.settings(FAILED_RETENTION_DAYS="0"))
    keep.record_failures([{**old, "failure_id": "f-kept"}])
    assert keep.failed.count_documents({"failure_id": "f-kept"}) == 1  # 0: kept until removed
    api = for_dsn(None, s.rabbitmq_dsn)
    assert api.policy(f"myshop.{topology.failed_queue}")["definition"] == {"message-ttl": 30 * 86_400_000}
    store.close()
    keep.close()


def test_failed_retry_all_of_14_searches_with_one_refused_phrase_fails_only_that_one_again(env, topology, fake_openai):
    """The provider refused every request (a revoked key): 14 searches of three users in `failed`. The key is fixed
    but the provider refuses one phrase (400, the whole request holding it): `failed retry --all` replays the 14
    together and only the search of that phrase fails again; the 13 others are applied."""
    s = env.settings(**openai_env(env, fake_openai))
    sub = env.subprocess_env(**openai_env(env, fake_openai))
    fake_openai.clear()
    fake_openai.fail_next(401, times=100)
    phrases = [f"garden tool {i}" for i in range(13)] + ["Culprit  Phrase"]
    events = [make_event(f"replay-{i % 3}", "search", phrase, T0 + timedelta(minutes=i))
              for i, phrase in enumerate(phrases)]
    publish(s, topology, events)
    store = Store(s.mongodb_url, s.mongodb_db)
    run_until(s, lambda st: st.failed.count_documents({}) == 14)

    fake_openai.clear()
    fake_openai.answer("culprit phrase", "400")
    retried = run_cli("failed", "retry", "--all", "--force", env=sub)
    assert retried.returncode == 0 and "retried 14" in retried.stdout, retried.stdout + retried.stderr
    run_until(s, lambda st: st.failed.count_documents({}) == 1
              and sum((st.get_profile_doc(f"replay-{u}") or {}).get("event_count", 0) for u in range(3)) == 13)
    [record] = store.failed.find({})
    assert record["message_id"] == events[13].message_id and "(400)" in record["error_message"]
    [(props, _)] = queue_messages(s, topology.failed_queue)
    assert props.message_id == events[13].message_id
    assert [store.get_profile_doc(f"replay-{u}")["event_count"] for u in range(3)] == [5, 4, 4]
    assert any(inputs == ["culprit phrase"] for inputs in fake_openai.inputs())  # found alone by splitting


def test_a_nan_reply_fails_only_its_search_is_not_cached_in_redis_and_failed_retry_embeds_it_again(env, topology,
                                                                                                     fake_openai):
    s = env.settings(**openai_env(env, fake_openai))
    fake_openai.clear()
    fake_openai.answer("poison phrase", "nan")
    events = [make_event("nan-1", "search", "poison phrase", T0), make_event("nan-1", "search", "red shoes", T0),
              make_event("nan-2", "search", "Poison  PHRASE", T0), make_event("nan-3", "search", "green tea", T0)]
    publish(s, topology, events)
    store = Store(s.mongodb_url, s.mongodb_db)
    run_until(s, lambda st: st.failed.count_documents({}) == 2 and st.get_profile_doc("nan-3") is not None)
    assert store.get_profile_doc("nan-1")["event_count"] == 1 and store.get_profile_doc("nan-2") is None
    assert {r["message_id"] for r in store.failed.find({})} == {events[0].message_id, events[2].message_id}
    keys = PhraseEmbedder(make_provider(s), None, ttl=60)
    redis = RedisState.from_settings(s)
    poison, tea = redis.get_vectors([keys.key("poison phrase"), keys.key("green tea")])
    assert poison is None and tea is not None  # the refused vector is not in the shared cache

    fake_openai.clear()  # the provider recovered
    sub = env.subprocess_env(**openai_env(env, fake_openai))
    assert run_cli("failed", "retry", "--all", "--force", env=sub).returncode == 0
    run_until(s, lambda st: st.get_profile_doc("nan-2") is not None and st.get_profile_doc("nan-1")["event_count"] == 2)
    assert store.failed.count_documents({}) == 0
    assert ["poison phrase"] in fake_openai.inputs()  # embedded fresh, once for both spellings
    assert redis.get_vectors([keys.key("poison phrase")])[0] is not None
    redis.close()
