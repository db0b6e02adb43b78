"""Per-user claims against in-memory stand-ins: two workers sharing one StubRedis and one StubStore, their batches
interleaved at the worst moment (the other worker's batch runs between this one's read and its write). A worker
that finds a user claimed keeps those deliveries unacked for a later batch; nobody conflicts, every event is applied
once, every delivery acked once. The same with real processes: tests/reliability/test_claims.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from myshop_ops.base.contract import serialise
from myshop_ops.core import worker as worker_module
from myshop_ops.core.limits import Limits
from myshop_ops.core.pipeline import Item, Status
from myshop_ops.core.settlement import settle
from myshop_ops.core.worker import CLAIM_TTL_S
from tests.support.stubs import StubRedis, StubStore
from tests.unit.test_core_worker import DIMS, TOPO, Shop, buffered, event, unit

pytestmark = pytest.mark.timeout(30)


class RacingStore(StubStore):
    """A StubStore that runs ``during_write`` once, as the next profile write starts (after its batch's read)."""

    def __init__(self):
        super().__init__({"p1": unit(1), "p2": unit(2)})
        self.during_write: Callable[[], None] | None = None

    def write_profiles(self, writes, layout="shop"):
        hook, self.during_write = self.during_write, None
        if hook is not None:
            hook()
        return super().write_profiles(writes, layout)


@pytest.fixture(autouse=True)
def no_keep_pause(monkeypatch):
    monkeypatch.setattr(worker_module, "KEEP_RETRY_S", 0.0)  # kept deliveries may try again at once


def codes(redis: StubRedis, user: str, token: str, ttl_ms: int) -> list[int]:
    return redis.claim([user], token, ttl_ms, "m", DIMS).codes


def pair(*, redis_down: bool = False) -> tuple[Shop, Shop, RacingStore]:
    store, redis = RacingStore(), StubRedis()
    redis.down = redis_down
    return Shop(store=store, redis=redis), Shop(store=store, redis=redis), store


def consuming(shop: Shop):
    channel = shop.attach()
    channel.basic_consume(TOPO.queue, shop.worker._on_message)
    shop.worker._connection.process_data_events()
    return channel


def acked_once(channel, tags: range) -> bool:
    """Every tag acked by exactly one ack (a multiple ack covers the unacked tags up to it), none left."""
    open_tags, covered = set(tags), []
    for tag, multiple in channel.acks:
        hit = {t for t in open_tags if t <= tag} if multiple else {tag} & open_tags
        if not hit:
            return False
        covered += hit
        open_tags -= hit
    return not open_tags and sorted(covered) == list(tags) and not channel.unacked


def test_two_workers_interleaved_on_the_same_users_never_conflict_and_apply_each_event_once():
    a, b, store = pair()
    users = [f"u{i}" for i in range(5)]
    a.send(*(serialise(event(u, "p1", h)) for u in users for h in (1, 2)))
    b.send(*(serialise(event(u, "p2", h)) for u in users for h in (3, 4)), serialise(event("u9", "p2", 5)))
    ch_a, ch_b = consuming(a), consuming(b)
    store.during_write = lambda: b.worker._run_batch(ch_b)  # B's batch runs while A holds its users
    a.worker._run_batch(ch_a)
    assert b.worker.totals.kept == 10 and b.worker.totals.applied == 1  # only u9 was free
    assert set(ch_b.unacked) == set(range(1, 11))  # kept: not acked by u9's ack (tag 11, not a multiple ack)
    assert ch_b.acks == [(11, False)]
    reads = b.worker.totals.reads
    b.worker._run_batch(ch_b)  # A released them, and left B (waiting for them) the profiles as A wrote them
    assert b.worker.totals.reads == reads  # B read no profile
    # A again, after B wrote its users: its cached profiles are stale, the claim says so, it reads them first
    a.send(*(serialise(event(u, "p1", 6)) for u in users))
    a.worker._connection.process_data_events()
    a.worker._run_batch(ch_a)
    assert a.worker.totals.conflicts == b.worker.totals.conflicts == 0
    assert a.worker.totals.applied == 15 and b.worker.totals.applied == 11
    assert all(store.profiles[u].event_count == 5 and store.profiles[u].version == 3 for u in users)
    assert acked_once(ch_a, range(1, 16)) and acked_once(ch_b, range(1, 12))
    assert not store.records and not a.broker.queues[TOPO.queue] and not b.broker.queues[TOPO.queue]
    assert not any(a.broker.queues[TOPO.retry_queue(n)] or b.broker.queues[TOPO.retry_queue(n)] for n in (1, 2))


def test_with_redis_down_two_interleaved_workers_still_apply_each_event_once():
    a, b, store = pair(redis_down=True)
    users = [f"u{i}" for i in range(5)]
    a.send(*(serialise(event(u, "p1", h)) for u in users for h in (1, 2)))
    b.send(*(serialise(event(u, "p2", h)) for u in users for h in (3, 4)))
    ch_a, ch_b = consuming(a), consuming(b)
    store.during_write = lambda: b.worker._run_batch(ch_b)
    a.worker._run_batch(ch_a)
    assert b.worker.totals.kept == 0 and a.worker.totals.conflicts == 5  # no claims: optimistic locking decides
    assert all(store.profiles[u].event_count == 4 and store.profiles[u].version == 2 for u in users)
    assert acked_once(ch_a, range(1, 11)) and acked_once(ch_b, range(1, 11))


def test_a_user_claimed_elsewhere_is_not_counted_towards_the_limit_and_goes_back_unacked_at_the_stop():
    shop = Shop(limits=Limits(messages=2))
    shop.redis.claim(["u0"], "another-worker", 60_000, "m", DIMS)
    shop.send(*(serialise(event("u0", "p1", h)) for h in (1, 2)), *(serialise(event("u9", "p1", h)) for h in (3, 4)))
    assert shop.worker.run() == 0
    assert shop.worker.totals.applied == 2 and "u9" in shop.store.profiles and "u0" not in shop.store.profiles
    assert shop.worker.limits.reason == "message limit 2 reached"
    back = shop.broker.queues[TOPO.queue]
    assert [m.redelivered for m in back] == [True, True] and all(b'"u0"' in m.body for m in back)
    assert shop.broker.connections[0].consumer.acks == [(3, False), (4, False)]


def test_a_kept_redelivery_is_not_an_attempt_in_the_poison_journal():
    shop = Shop()
    shop.redis.claim(["u0"], "another-worker", 60_000, "m", DIMS)
    body = serialise(event("u0"))
    delivery = shop.delivery(1, body, message_id="m1", redelivered=True)
    delivery.user = "u0"
    buffered(shop, delivery)
    assert shop.worker._take_batch() == [] and shop.redis.journal == {} and shop.worker._buffer == [delivery]
    shop.redis.release(["u0"], "another-worker")
    assert shop.worker._take_batch() == [delivery] and shop.redis.journal == {"m1": 1}


def test_a_claim_that_never_expires_holds_a_delivery_no_longer_than_keep_max(monkeypatch):
    shop = Shop()
    shop.redis.claims["u0"] = ("written-by-hand", float("inf"))  # a key without TTL, never released
    delivery = shop.delivery(1, serialise(event("u0")))
    delivery.user = "u0"
    buffered(shop, delivery)
    assert shop.worker._take_batch() == [] and delivery.kept_since is not None
    delivery.kept_since -= worker_module.KEEP_MAX_S + 0.001
    assert shop.worker._take_batch() == [delivery]  # processed anyway: the conditional write decides


def test_a_hot_user_is_not_starved_the_waiting_worker_gets_it_next():
    redis = StubRedis()
    assert codes(redis, "hot", "A", 1000) == [1]
    assert codes(redis, "hot", "B", 1000) == [0]  # B waits for it
    redis.release(["hot"], "A")
    assert codes(redis, "hot", "A", 1000) == [0]  # A's next batch yields to the waiter
    assert codes(redis, "hot", "B", 1000) == [1]
    redis.release(["hot"], "B")
    assert codes(redis, "hot", "B", 1000) == [2]  # B held it last: its cached profile is current


def test_a_dead_workers_claim_frees_itself_after_its_ttl():
    redis, now = StubRedis(), [0.0]
    redis.clock = lambda: now[0]
    assert codes(redis, "u1", "dead", int(CLAIM_TTL_S * 1000)) == [1]
    assert codes(redis, "u1", "alive", 1000) == [0]
    now[0] += CLAIM_TTL_S + 0.001
    assert codes(redis, "u1", "alive", 1000) == [1]


def test_settle_acks_one_by_one_above_a_kept_delivery():
    shop = Shop()
    batch = [shop.delivery(t, serialise(event(f"u{t}"))) for t in (2, 3, 5)]
    items = [Item(body=d.body, status=Status.APPLIED) for d in batch]
    assert settle(TOPO, batch, items, ack_each=False, lowest_open=4).acks == [(3, True), (5, False)]
    assert settle(TOPO, batch, items, ack_each=False, lowest_open=1).acks == [(2, False), (3, False), (5, False)]
    assert settle(TOPO, batch, items, ack_each=False, lowest_open=9).acks == [(5, True)]
