"""Erasure holds (`myshop user delete`), on the real services: no processed key of the user stays in Redis, and no
copy of an event from before the erasure re-creates the profile, whichever way it comes back (a retry delay queue,
`failed retry`, `unrouted republish`, a redelivery). Each attack: the user has a profile, is erased while a copy of an
earlier event waits somewhere, then the copy reaches a worker."""

from __future__ import annotations

from datetime import timedelta

import pika

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.embeddings import HashProvider, PhraseEmbedder
from myshop_ops.adapters.store import ERASURES, RECENT_IDS, Store, erasure_key
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.base.exit_codes import EXIT_OK
from myshop_ops.core.limits import Limits
from myshop_ops.core.pipeline import Pipeline
from myshop_ops.core.retry_routing import H_RETRY_COUNT
from myshop_ops.core.worker import Worker
from tests.support.events import T0, publish
from tests.support.services import run_cli, wait_for
from tests.support.workers import prepare, queue_state, wait_queue


def search(user: str, minute: int):
    return make_event(user, "search", f"phrase {minute}", T0 + timedelta(minutes=minute))


def profile(settings, user: str) -> dict | None:
    store = Store(settings.mongodb_url, settings.mongodb_db)
    try:
        return store.get_profile_doc(user, rings=False)
    finally:
        store.close()


def drain(settings, *queues: str) -> int:
    """In-process workers (1 s each) until the main queue and ``queues`` hold nothing; each stops with exit 0.
    Returns how many events they dropped as erased."""
    erased = 0

    def empty() -> bool:
        nonlocal erased
        worker = Worker(settings, limits=Limits(seconds=1))
        assert worker.run() == EXIT_OK
        erased += worker.totals.erased
        return all(queue_state(settings, q)[0] == 0 for q in (Topology.from_settings(settings).queue, *queues))

    wait_for(empty, timeout=60, interval=0, what="the queues to drain")
    return erased


def erase(env, user: str) -> str:
    done = run_cli("user", "delete", user, "--force", env=env.subprocess_env(), input="")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def send(settings, exchange: str, routing_key: str, event, **headers) -> None:
    """Publish ``event`` as the worker or a producer would (confirmed)."""
    conn = broker.connect(settings.rabbitmq_dsn)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish(exchange, routing_key, serialise(event), pika.BasicProperties(
        message_id=event.message_id, delivery_mode=2, content_type="application/json", headers=headers or None),
        mandatory=True)
    conn.close()


def with_profile(env, topo, user: str) -> None:
    s = env.settings()
    publish(s, topo, [search(user, 0)])
    drain(s)
    assert profile(s, user) is not None


def user_keys(redis_client, prefix: str, user: str) -> list[bytes]:
    """The processed keys of ``user``: ``<prefix>processed:<64 hex>:<user>``."""
    head = f"{prefix}processed:".encode()
    return [k for k in redis_client.scan_iter(match=f"{prefix}*", count=1000)
            if k.startswith(head) and k[len(head) + 64:] == b":" + user.encode()]


def test_a_retry_queue_copy_coming_back_after_the_erasure_does_not_recreate_the_profile(env):
    env["WORKER_RETRY_DELAY"] = "8000"  # the copy waits 8 s in the first delay queue, then comes back by itself
    s = env.settings()
    topo = prepare(s)
    user = "erased-retry"
    with_profile(env, topo, user)
    send(s, "", topo.retry_queue(1), search(user, 1), **{H_RETRY_COUNT: 1})  # a transient failure's copy
    erase(env, user)
    assert queue_state(s, topo.retry_queue(1))[0] == 1  # it was waiting in the delay queue all along
    wait_queue(s, topo.queue, messages=1, timeout=30)  # back in the main queue
    assert drain(s, topo.retry_queue(1)) == 1
    assert profile(s, user) is None


def test_failed_retry_of_an_event_from_before_the_erasure_does_not_recreate_the_profile(env, topology):
    """A copy that was in a retry queue during the erasure and failed afterwards lands in the failed queue after the
    erasure removed the user's failed messages; `failed retry --all` replays it."""
    s = env.settings()
    user = "erased-failed"
    with_profile(env, topology, user)
    erase(env, user)
    send(s, "", topology.failed_queue, search(user, 1))
    done = run_cli("failed", "retry", "--all", "--force", env=env.subprocess_env(), input="")
    assert done.returncode == 0, done.stdout + done.stderr
    assert queue_state(s, topology.queue)[0] == 1
    assert drain(s, topology.failed_queue) == 1
    assert profile(s, user) is None


def test_unrouted_republish_of_an_event_from_before_the_erasure_does_not_recreate_the_profile(env, topology):
    """A producer published with a routing key nothing is bound to: the copy waits in the unrouted queue through the
    erasure, until `unrouted republish` moves it to the main queue."""
    s = env.settings()
    user = "erased-unrouted"
    with_profile(env, topology, user)
    send(s, topology.exchange, "events.renamed-key", search(user, 1))
    wait_queue(s, topology.unrouted, messages=1)
    erase(env, user)
    done = run_cli("unrouted", "republish", env=env.subprocess_env(), input="")
    assert done.returncode == 0, done.stdout + done.stderr
    assert queue_state(s, topology.queue)[0] == 1
    assert drain(s, topology.unrouted) == 1
    assert profile(s, user) is None


def test_a_redelivery_after_the_erasure_does_not_recreate_the_profile(env, topology):
    """A worker took the copy and died before acking it; the user is erased meanwhile; the broker redelivers it."""
    s = env.settings()
    user = "erased-redelivered"
    with_profile(env, topology, user)
    publish(s, topology, [search(user, 1)])
    conn = broker.connect(s.rabbitmq_dsn)
    ch = conn.channel()
    method, _, _ = ch.basic_get(topology.queue, auto_ack=False)
    assert method is not None and not method.redelivered
    erase(env, user)
    conn.close()  # the worker's death: the unacked copy goes back, marked redelivered
    assert drain(s) == 1
    assert profile(s, user) is None


def test_no_processed_key_of_the_user_stays_in_redis(env, topology, redis_client):
    """More events than the profile's id ring holds (its ids were the only keys forgotten before), and a user id with
    glob characters: every processed key of the user goes, the neighbours' stay (user ``b`` is not ``a:b``)."""
    s = env.settings()
    prefix = s.redis_prefix
    user, neighbours = "u*[1]?\\", ["x:u*[1]?\\", "u-1-!\\", "u*[1]?\\x"]
    store = Store(s.mongodb_url, s.mongodb_db)
    state = RedisState.from_settings(s)
    pipe = Pipeline(s, store, state, PhraseEmbedder(HashProvider(s.embedding_dimensions, s.model), None, ttl=60))
    events = [search(user, m) for m in range(RECENT_IDS + 44)]
    try:
        for i in range(0, len(events), 100):
            assert {i.status for i in pipe.process([serialise(e) for e in events[i:i + 100]]).items} == {"applied"}
        assert {i.status for i in pipe.process([serialise(search(n, 0)) for n in neighbours]).items} == {"applied"}
    finally:
        state.close()
        store.close()
    assert len(user_keys(redis_client, prefix, user)) == RECENT_IDS + 44
    out = erase(env, user)
    assert f"forgot {RECENT_IDS + 44} processed-message key(s) in Redis" in " ".join(out.split())
    assert user_keys(redis_client, prefix, user) == []
    assert all(len(user_keys(redis_client, prefix, n)) == 1 for n in neighbours)


def test_the_erasure_record_holds_a_hash_and_a_time_and_expires_with_the_failed_messages(env, topology):
    s = env.settings()
    erase(env, "never-seen")  # no profile: the record is written all the same (copies may be in flight)
    client = Store(s.mongodb_url, s.mongodb_db)
    try:
        docs = list(client.db[ERASURES].find({}))
        assert [d["_id"] for d in docs] == [erasure_key("never-seen")] and "never-seen" not in str(docs)
        assert set(docs[0]) == {"_id", "erased_at", "expires_at"}
        assert docs[0]["expires_at"] - docs[0]["erased_at"] == timedelta(days=s.failed_retention_days)
        assert ("user_erasures", "expires_at_ttl") not in client.missing_indexes()
        client.db[ERASURES].drop_indexes()
        assert ("user_erasures", "expires_at_ttl") in client.missing_indexes()  # the worker refuses to start
    finally:
        client.close()


def test_a_profile_created_after_an_erasure_keeps_its_time_and_drops_older_copies(env, topology):
    """The real store: the erasure time goes into the new document and is read back from it."""
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    erased_at = store.record_erasure("erased-then-back", T0 + timedelta(hours=1))

    def pipe() -> Pipeline:  # a fresh worker: nothing cached
        return Pipeline(s, store, RedisState("redis://127.0.0.1:1/0", timeout=0.2),
                        PhraseEmbedder(HashProvider(s.embedding_dimensions, s.model), None, ttl=60))

    old, new = search("erased-then-back", 60 + 5), search("erased-then-back", 60 + 6)  # at and past the tolerance
    try:
        assert [i.status for i in pipe().process([serialise(old), serialise(new)]).items] == ["erased", "applied"]
        doc = store.get_profile_doc("erased-then-back")
        assert doc["erased_at"] == erased_at and doc["event_count"] == 1
        store.erasures.delete_many({})  # the record expired: the profile's own time still drops older copies
        late = search("erased-then-back", 30)
        assert [i.status for i in pipe().process([serialise(late), serialise(old)]).items] == ["erased", "erased"]
        assert store.get_profile_doc("erased-then-back")["event_count"] == 1
    finally:
        store.close()


def test_erasing_again_keeps_the_later_time(env, topology):
    s = env.settings()
    user = "erased-twice"
    store = Store(s.mongodb_url, s.mongodb_db)
    try:
        later = store.record_erasure(user, T0 + timedelta(days=2))
        assert store.record_erasure(user, T0 + timedelta(days=1)) == later
        assert store.erasure_times([user, "someone-else"]) == ({user: later}, {})
    finally:
        store.close()
