
"""A batch end to end through Pipeline.process, against in-memory stand-ins (tests/support/stubs.py): each delivery's
outcome, one write per user, what is marked processed in Redis, and every fault turned into retry or failed."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymongo.errors import AutoReconnect

from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.embeddings import EmbeddingError, InputRefused, PhraseEmbedder, RequestRefused, usable_vector
from myshop_ops.base.contract import InvalidMessage, make_event, serialise
from myshop_ops.base.layout import UnreadableProfile
from myshop_ops.base.profile import VectorSpaceMismatch
from myshop_ops.core.pipeline import Pipeline, ProductMissing, Status, StoreUnavailable
from tests.support.generated import BAD_REPLIES
from tests.support.stubs import StubProvider, StubRedis, StubStore

# the core's stand-in suite runs in seconds: a change that makes the loop hang fails here in 30 s, not 300
pytestmark = pytest.mark.timeout(30)

DIMS = 16
SETTINGS = Settings(embedding_provider="hash", embedding_dimensions=DIMS)
T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIMS).astype(np.float32)
    return v / np.linalg.norm(v)


class Core:
    """A pipeline wired to fresh stand-ins."""

    def __init__(self, products: dict[str, np.ndarray] | None = None, *, shared_cache: bool = False):
        self.store = StubStore(products if products is not None else {"p1": unit(1), "p2": unit(2)})
        self.redis = StubRedis()
        self.provider = StubProvider(DIMS, SETTINGS.model)
        self.phrases = PhraseEmbedder(self.provider, self.redis if shared_cache else None, ttl=60)
        self.pipeline = Pipeline(SETTINGS, self.store, self.redis, self.phrases)

    def run(self, *bodies: bytes) -> list[Status]:
        self.result = self.pipeline.process(list(bodies))
        return [i.status for i in self.result.items]


def ev(user: str, kind: str, ref: str, hour: int = 0):
    return make_event(user, kind, ref, T0.replace(hour=hour))


def body(event) -> bytes:
    return serialise(event)


def test_a_mixed_batch_folds_each_user_once_and_marks_only_what_is_stored():
    core = Core()
    events = [ev("u1", "product_view", "p1", 1), ev("u1", "search", "red shoes", 2), ev("u2", "product_purchase", "p2"),
              ev("u2", "product_view", "p404")]
    statuses = core.run(*map(body, events), b"{not json")
    assert statuses == [Status.APPLIED, Status.APPLIED, Status.APPLIED, Status.SKIPPED, Status.FAILED]
    assert isinstance(core.result.items[3].error, ProductMissing)
    assert isinstance(core.result.items[4].error, InvalidMessage)
    assert core.store.writes == 1 and core.result.writes == 2  # one bulk write, one profile per user
    assert core.store.profiles["u1"].event_count == 2 and core.store.profiles["u2"].version == 1
    assert core.provider.calls == [["red shoes"]]  # one provider call for the batch's phrases
    assert core.redis.processed == {events[0].key, events[1].key, events[2].key}  # skipped: not marked
    assert core.result.counts == {"applied": 3, "skipped": 1, "failed": 1}


def test_duplicates_in_the_batch_in_redis_and_in_the_profile_are_applied_once():
    core = Core()
    first, second = ev("u1", "product_view", "p1", 1), ev("u1", "product_view", "p2", 2)
    assert core.run(body(first), body(first)) == [Status.APPLIED, Status.DUPLICATE]
    assert core.result.items[1].second_copy
    assert core.run(body(first)) == [Status.DUPLICATE]  # Redis knows it
    core.pipeline = Pipeline(SETTINGS, core.store, core.redis, PhraseEmbedder(core.provider, None, ttl=60))
    reads = core.store.reads  # a restarted worker, nothing cached: Redis's answer costs no read
    assert core.run(body(first)) == [Status.DUPLICATE] and core.store.reads == reads
    core.redis.processed.clear()  # Redis lost it (restarted, or down): the profile's ring still knows it
    assert core.run(body(first), body(second)) == [Status.DUPLICATE, Status.APPLIED]
    assert core.store.profiles["u1"].event_count == 2 and core.store.profiles["u1"].version == 2


def test_an_id_is_marked_processed_only_once_its_effect_is_stored():
    """A second copy in the batch is acked as a duplicate, but while its first copy goes to a retry queue the id must
    stay unmarked (or the retry would be dropped as a duplicate); a duplicate the profile's ring caught is marked
    again in Redis."""
    core = Core()
    core.provider.fail = EmbeddingError("429 rate limited", transient=True)
    search = ev("u1", "search", "hats")
    assert core.run(body(search), body(search)) == [Status.RETRY, Status.DUPLICATE]
    assert core.redis.processed == set()
    core.provider.fail = None
    assert core.run(body(search)) == [Status.APPLIED]  # the retry copy
    core.redis.processed.clear()
    assert core.run(body(search)) == [Status.DUPLICATE]  # the ring knows it
    assert core.redis.processed == {search.key}


def test_late_events_fold_in_but_leave_the_profiles_last_event():
    core = Core()
    newest, late = ev("u1", "product_view", "p1", 5), ev("u1", "product_click", "p2", 1)
    assert core.run(body(newest)) == [Status.APPLIED]
    assert core.store.last_writes["u1"].last_event_id == newest.message_id
    assert core.run(body(late)) == [Status.APPLIED]
    write = core.store.last_writes["u1"]
    assert write.last_event_id is None and write.last_event_type is None and write.counts == {"product_click": 1}


def test_the_same_message_id_for_two_users_is_two_events():
    core = Core()
    a = ev("u1", "product_view", "p1")
    b = replace(a, user_id="u2")  # the shop's %d-hashed ids collide across users
    assert core.run(body(a), body(b)) == [Status.APPLIED, Status.APPLIED]


def test_mongodb_down_makes_the_batch_retry_and_marks_nothing():
    core = Core()
    core.store.fail_reads = AutoReconnect("connection refused")
    statuses = core.run(body(ev("u1", "product_view", "p1")), body(ev("u2", "search", "hats")))
    assert statuses == [Status.RETRY, Status.RETRY]
    assert all(isinstance(i.error, StoreUnavailable) for i in core.result.items)
    assert core.redis.processed == set()


def test_a_failed_write_retries_its_users():
    core = Core()
    core.store.fail_writes = AutoReconnect("primary stepped down")
    assert core.run(body(ev("u1", "product_view", "p1"))) == [Status.RETRY]
    core.store.fail_writes = None
    assert core.run(body(ev("u1", "product_view", "p1", 3))) == [Status.APPLIED]


def test_the_provider_transient_errors_retry_permanent_ones_fail():
    core = Core()
    core.provider.fail = EmbeddingError("429 rate limited", transient=True)
    assert core.run(body(ev("u1", "search", "a")), body(ev("u1", "product_view", "p1"))) == [Status.RETRY,
                                                                                             Status.APPLIED]
    core.provider.fail = EmbeddingError("400 input too long", transient=False)
    assert core.run(body(ev("u1", "search", "b"))) == [Status.FAILED]


def test_unusable_stored_data_fails_only_its_own_messages():
    core = Core()
    core.store.foreign["p9"] = "a vector of model other-model"
    core.store.unreadable["u2"] = UnreadableProfile("vector: not a list of numbers")
    statuses = core.run(body(ev("u1", "product_view", "p9")), body(ev("u2", "product_view", "p1")),
                        body(ev("u3", "product_view", "p1")))
    assert statuses == [Status.FAILED, Status.FAILED, Status.APPLIED]
    assert isinstance(core.result.items[0].error, VectorSpaceMismatch)
    assert isinstance(core.result.items[1].error, UnreadableProfile)


def test_statuses_are_their_names_as_text():
    assert Status.APPLIED == "applied" and f"{Status.RETRY}" == "retry"
    assert {s.value for s in Status} == {"pending", "applied", "duplicate", "skipped", "erased", "retry", "failed"}


# ---- one bad phrase hurts no one but itself ----------------------------------------------------------------------

def searches(core: Core, events) -> list[Status]:
    return core.run(*map(body, events))


def cached(core: Core, phrase: str) -> bool:
    key = core.phrases.key(phrase)
    return key in core.redis.vectors or not core.phrases._lru.take([key])[1]


def test_nan_for_one_phrase_fails_only_its_events_other_users_are_applied_and_nothing_is_cached():
    core = Core(shared_cache=True)
    core.provider.replies["poison phrase"] = np.full(DIMS, np.nan, np.float32)
    events = [ev("u1", "search", "poison phrase", 1), ev("u1", "search", "red shoes", 2),
              ev("u2", "search", "green tea", 1), ev("u3", "search", "Poison phrase", 1),
              ev("u3", "product_view", "p1")]
    assert searches(core, events) == [Status.FAILED, Status.APPLIED, Status.APPLIED, Status.FAILED, Status.APPLIED]
    assert "NaN" in str(core.result.items[0].error)
    assert not cached(core, "poison phrase") and cached(core, "green tea")
    assert {u: p.event_count for u, p in core.store.profiles.items()} == {"u1": 1, "u2": 1, "u3": 1}

    core.provider.replies.clear()  # the provider recovered: the same phrase, spelled another way, is embedded fresh
    later = [ev("u4", "search", "Poison  PHRASE", 3), ev("u1", "search", "poison phrase", 1)]
    assert searches(core, later) == [Status.APPLIED, Status.APPLIED]
    assert core.provider.calls[-1] == ["poison phrase"]
    assert cached(core, "poison phrase")


def test_a_1e30_reply_is_refused_and_the_profile_keeps_its_scale():
    core = Core(shared_cache=True)
    core.provider.replies["huge"] = core.provider.embed_one("huge") * np.float32(1e30)
    assert searches(core, [ev("u1", "search", "huge", 1), ev("u1", "search", "hats", 2)]) == [Status.FAILED,
                                                                                             Status.APPLIED]
    assert "length 1e+30" in str(core.result.items[0].error) and not cached(core, "huge")
    assert core.store.profiles["u1"].profile.magnitude < 10


def test_one_refused_phrase_fails_only_its_searches_14_searches_of_three_users():
    core = Core()
    core.provider.replies["culprit phrase"] = RequestRefused("embeddings provider refused (400): input refused")
    phrases = [f"phrase {i}" for i in range(13)] + ["culprit phrase"]
    events = [ev(f"u{i % 3}", "search", phrase, i) for i, phrase in enumerate(phrases)]
    statuses = searches(core, events)
    assert statuses == [Status.APPLIED] * 13 + [Status.FAILED]
    assert isinstance(core.result.items[13].error, InputRefused)
    assert sum(p.event_count for p in core.store.profiles.values()) == 13
    # replayed together (what `failed retry --all` does): the culprit fails again, alone
    assert searches(core, events) == [Status.DUPLICATE] * 13 + [Status.FAILED]


def test_a_phrase_without_words_fails_only_itself_with_the_hash_provider():
    core = Core()
    events = [ev("u1", "search", "!!!", 1), ev("u1", "search", "hats", 2), ev("u2", "search", "green tea")]
    assert searches(core, events) == [Status.FAILED, Status.APPLIED, Status.APPLIED]
    assert "no words" in str(core.result.items[0].error)


def test_transient_or_permanent_is_decided_per_phrase():
    """A refused request is split: the refused phrase fails, one whose request then times out retries, the others
    (and the product event) are applied."""
    core = Core()
    core.provider.replies["refused"] = RequestRefused("embeddings provider refused (400): no")
    core.provider.replies["slow"] = EmbeddingError("embeddings provider: APITimeoutError", transient=True)
    events = [ev("u1", "search", "refused", 1), ev("u2", "search", "slow", 1), ev("u3", "search", "hats", 1),
              ev("u3", "search", "green tea", 2), ev("u1", "product_view", "p1", 2)]
    assert searches(core, events) == [Status.FAILED, Status.RETRY, Status.APPLIED, Status.APPLIED, Status.APPLIED]
    assert core.provider.calls == [["refused", "slow", "hats", "green tea"], ["refused", "slow"], ["refused"], ["slow"],
                                   ["hats", "green tea"]]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n_phrases=st.integers(1, 8), n_events=st.integers(1, 30))
def test_generated_provider_replies_fail_only_their_own_searches_and_nothing_bad_is_cached(data, n_phrases, n_events):
    core = Core(shared_cache=True)
    pool = [f"phrase {i}" for i in range(n_phrases)] + ["!!!"]
    bad = {p: data.draw(st.sampled_from(sorted(BAD_REPLIES)), label=p)
           for p in data.draw(st.sets(st.sampled_from(pool[:-1])), label="bad phrases")}
    for phrase, kind in bad.items():
        core.provider.replies[phrase] = BAD_REPLIES[kind](core.provider.embed_one(phrase))
    bad["!!!"] = "no words"
    events = [ev(f"u{data.draw(st.integers(0, 3))}", "search", data.draw(st.sampled_from(pool)), i % 24)
              for i in range(n_events)]
    events = list({e.key: e for e in events}.values())
    for attempt in range(2):  # delivered, then redelivered as a whole
        statuses = searches(core, events)
        for e, status in zip(events, statuses, strict=True):
            if e.search_phrase in bad:
                assert status == Status.FAILED, (e.search_phrase, bad[e.search_phrase])
            else:
                assert status == (Status.APPLIED if attempt == 0 else Status.DUPLICATE)
    innocent = Counter(e.user_id for e in events if e.search_phrase not in bad)
    assert {u: p.event_count for u, p in core.store.profiles.items()} == dict(innocent)
    assert all(np.isfinite(p.profile.magnitude) and p.profile.magnitude < 100 for p in core.store.profiles.values())
    for phrase in pool:
        assert cached(core, phrase) == (phrase not in bad and any(e.search_phrase == phrase for e in events))
    for raw in core.redis.vectors.values():
        assert not isinstance(usable_vector(np.frombuffer(raw, "<f4"), DIMS), str)
