"""Version conflicts cost re-reads inside the batch, not a trip through a delay queue (in-memory stand-ins)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.embeddings import HashProvider
from myshop_ops.adapters.store import WriteResult
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.core import pipeline
from myshop_ops.core.pipeline import Pipeline, VersionConflict

# the core's stand-in suite runs in seconds: a change that makes the loop hang fails here in 30 s, not 300
pytestmark = pytest.mark.timeout(30)

DIMS = 16
SETTINGS = Settings(embedding_provider="hash", embedding_dimensions=DIMS)


class Redis:
    def seen(self, keys):
        return set()

    def mark(self, keys):
        self.marked = list(keys)


class Phrases:
    def __init__(self):
        self.provider = HashProvider(DIMS, SETTINGS.model)

    def embed(self, phrases):
        return {p: self.provider.embed_one(p) for p in phrases}


class ConflictingStore:
    """Every write of a profile loses to another worker ``losses`` times, then lands."""

    def __init__(self, losses: int):
        self.losses, self.reads, self.writes = losses, 0, 0

    def load_profiles(self, user_ids, model, dimensions):
        self.reads += 1
        return {}, {}

    def erasure_times(self, user_ids):
        return {}, {}

    def migration(self):
        return None

    def write_profiles(self, writes, layout="shop"):
        self.writes += 1
        if self.writes <= self.losses:
            return WriteResult(conflicted=[w.user_id for w in writes])
        return WriteResult(applied=[w.user_id for w in writes])


def run(store) -> list:
    events = [make_event("u1", "search", f"phrase {i}", datetime(2026, 11, 1, i, tzinfo=UTC)) for i in range(3)]
    result = Pipeline(SETTINGS, store, Redis(), Phrases()).process([serialise(e) for e in events])
    return result.items


def test_a_profile_that_changed_under_the_worker_is_re_read_until_the_write_lands():
    store = ConflictingStore(losses=8)  # more than the 5 attempts a conflict used to get before the delay queue
    items = run(store)
    assert [i.status for i in items] == ["applied"] * 3
    assert store.writes == 9 and store.reads == 9  # one re-read per conflict, nothing else


def test_only_a_profile_that_keeps_changing_past_the_budget_goes_to_a_delay_queue(monkeypatch):
    monkeypatch.setattr(pipeline, "WRITE_BUDGET_S", 0.3)
    store = ConflictingStore(losses=10**9)
    items = run(store)
    assert {i.status for i in items} == {"retry"} and isinstance(items[0].error, VersionConflict)
    assert store.writes > 5  # pauses are random but short: several re-reads fit in the budget


def test_pauses_grow_and_stay_bounded(monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(pipeline.time, "sleep", pauses.append)
    monkeypatch.setattr(pipeline.random, "uniform", lambda lo, hi: hi)  # the longest pause each time
    for attempt in range(1, 12):
        assert Pipeline._pause_after_conflict(attempt, pipeline.time.monotonic() + 60)
    first, cap = pipeline.CONFLICT_PAUSE_S
    assert pauses[:3] == [first, 2 * first, 4 * first] and max(pauses) == cap
    assert not Pipeline._pause_after_conflict(1, pipeline.time.monotonic())  # no budget left: stop
