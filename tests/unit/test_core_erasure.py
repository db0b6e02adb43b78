"""The pipeline honours erasure records (`myshop user delete`), against the in-memory stand-ins: an event from before
an erasure (or up to the contract's future tolerance after it) is acked without effect; a later one creates a new
profile that carries the erasure time; an erasure landing between the worker's read and its write still holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.embeddings import PhraseEmbedder
from myshop_ops.base.contract import FUTURE_TOLERANCE, make_event, serialise
from myshop_ops.core.pipeline import ErasedMeanwhile, Pipeline, Status
from tests.support.stubs import StubProvider, StubRedis, StubStore

pytestmark = pytest.mark.timeout(30)

DIMS = 16
SETTINGS = Settings(embedding_provider="hash", embedding_dimensions=DIMS)
ERASED_AT = datetime(2026, 11, 1, 12, tzinfo=UTC)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIMS).astype(np.float32)
    return v / np.linalg.norm(v)


def view(user: str, at: datetime, product: str = "p1"):
    return make_event(user, "product_view", product, at)


class EraseDuringWrite(StubStore):
    """Erases ``user`` at ERASED_AT once, just before (or just after) the next profile write lands."""

    def __init__(self, user: str, *, after: bool = False):
        super().__init__({"p1": unit(1), "p2": unit(2)})
        self.user, self.after, self.armed = user, after, False

    def write_profiles(self, writes, layout="shop"):
        armed, self.armed = self.armed, False
        if armed and not self.after:
            self.erase(self.user, ERASED_AT)
        result = super().write_profiles(writes, layout)
        if armed and self.after:
            self.erase(self.user, ERASED_AT)
        return result


def core(store: StubStore | None = None) -> tuple[Pipeline, StubStore, StubRedis]:
    store = store or StubStore({"p1": unit(1), "p2": unit(2)})
    redis = StubRedis()
    phrases = PhraseEmbedder(StubProvider(DIMS, SETTINGS.model), None, ttl=60)
    return Pipeline(SETTINGS, store, redis, phrases), store, redis


def statuses(pipeline: Pipeline, *events) -> list[Status]:
    return [i.status for i in pipeline.process([serialise(e) for e in events]).items]


def test_events_up_to_the_erasure_and_its_tolerance_are_dropped_later_ones_applied():
    pipeline, store, redis = core()
    store.erase("u1", ERASED_AT)
    before, within, after = (view("u1", ERASED_AT + d) for d in (-timedelta(hours=1), FUTURE_TOLERANCE,
                                                                    FUTURE_TOLERANCE + timedelta(seconds=1)))
    other = view("u2", ERASED_AT - timedelta(hours=1))  # never erased: applied whatever its time
    assert statuses(pipeline, before, within, after, other) == [Status.ERASED, Status.ERASED, Status.APPLIED,
                                                                Status.APPLIED]
    assert store.profiles["u1"].event_count == 1 and store.profiles["u1"].erased_at == ERASED_AT
    assert store.profiles["u2"].erased_at is None
    assert redis.processed == {after.key, other.key}  # nothing of the dropped events is kept in Redis


def test_a_profile_created_after_an_erasure_carries_it_so_its_users_cost_no_erasure_read():
    pipeline, store, _ = core()
    store.erase("u1", ERASED_AT)
    assert statuses(pipeline, view("u1", ERASED_AT + timedelta(hours=1))) == [Status.APPLIED]
    pipeline.profiles.drop(["u1"])  # read from the store: the document carries the erasure time
    store.erasures.clear()  # and no erasure record is read for a user who has a profile

    def no_read(user_ids):
        raise AssertionError(f"erasure records read for {list(user_ids)}")

    store.erasure_times = no_read
    late_copy = view("u1", ERASED_AT - timedelta(minutes=1), "p2")  # e.g. `failed retry` of a pre-erasure event
    assert statuses(pipeline, late_copy, view("u1", ERASED_AT + timedelta(hours=2))) == [Status.ERASED,
                                                                                          Status.APPLIED]
    assert store.profiles["u1"].event_count == 2


def test_an_erasure_between_the_read_and_the_update_drops_the_event():
    store = EraseDuringWrite("u1")
    pipeline, _, redis = core(store)
    assert statuses(pipeline, view("u1", ERASED_AT - timedelta(hours=2))) == [Status.APPLIED]
    store.armed = True  # the profile is read (cached); the erasure lands before the update: it conflicts, re-read
    copy = view("u1", ERASED_AT - timedelta(hours=1), "p2")
    assert statuses(pipeline, copy) == [Status.ERASED]
    assert "u1" not in store.profiles and copy.key not in redis.processed


@pytest.mark.parametrize("after", [False, True], ids=["before-the-insert", "after-the-insert"])
def test_an_erasure_between_the_read_and_the_insert_deletes_the_new_profile(after):
    store = EraseDuringWrite("u1", after=after)
    pipeline, _, redis = core(store)
    store.armed = True  # no profile, no erasure record when read; the erasure lands around the insert
    copy = view("u1", ERASED_AT - timedelta(hours=1))
    result = pipeline.process([serialise(copy)])
    assert [i.status for i in result.items] == [Status.RETRY]
    assert isinstance(result.items[0].error, ErasedMeanwhile)
    assert "u1" not in store.profiles and not redis.processed and result.writes == 0
    assert statuses(pipeline, copy) == [Status.ERASED]  # the retry meets the erasure record
    assert "u1" not in store.profiles


def test_a_second_erasure_between_the_read_and_the_insert_is_honoured_too():
    store = EraseDuringWrite("u1")
    pipeline, _, _ = core(store)
    store.erase("u1", ERASED_AT - timedelta(days=1))  # an earlier erasure: this copy is after it
    store.armed = True  # the user is erased again while the copy creates the profile
    copy = view("u1", ERASED_AT - timedelta(hours=1))
    assert statuses(pipeline, copy) == [Status.RETRY]
    assert "u1" not in store.profiles
    assert statuses(pipeline, copy) == [Status.ERASED]
