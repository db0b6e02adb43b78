"""Per-user claims against the real Redis (dedup.RedisState's scripts): who gets a user, who waits, what a release
and a TTL free, and what the worker is told when Redis cannot answer (no claims: the conditional write decides)."""

from __future__ import annotations

import uuid

import pytest

from myshop_ops.adapters.dedup import RedisState, claim_codes
from tests.support.services import forget_keys, redis_url, wait_for


@pytest.fixture
def state():
    prefix = f"claims-{uuid.uuid4().hex[:8]}:"
    s = RedisState(redis_url(), prefix=prefix)
    yield s
    s.close()
    forget_keys(prefix)


def test_a_claimed_user_is_refused_to_others_until_released_and_the_waiter_goes_first(state):
    assert state.claim(["u1", "u2"], "A", 5000) == [1, 1]
    assert state.claim(["u1", "u3"], "B", 5000) == [0, 1]  # B now waits for u1
    assert state.claim(["u1"], "A", 5000) == [2]  # holding it: renewed
    state.release(["u1", "u2"], "A")
    assert state.claim(["u1"], "A", 5000) == [0]  # a hot user: A's next batch yields to the waiter
    assert state.claim(["u1", "u2"], "B", 5000) == [1, 1]
    state.release(["u1"], "A")  # not A's any more: nothing happens
    assert state.claim(["u1"], "C", 5000) == [0]
    state.release(["u1"], "B")
    assert state.claim(["u1"], "B", 5000) == [0]  # C waits for it now
    assert state.claim(["u1"], "C", 5000) == [1]
    state.release(["u1"], "C")
    assert state.claim(["u1"], "C", 5000) == [2]  # C held it last: its cached profile is current


def test_a_dead_workers_claim_frees_itself(state):
    assert state.claim(["u1"], "dead", 100) == [1]
    assert state.claim(["u1"], "alive", 5000) == [0]
    wait_for(lambda: state.claim(["u1"], "alive", 5000) == [1], timeout=5, what="the claim to expire")


def test_redis_down_or_refusing_scripts_means_no_claims():
    down = RedisState("redis://127.0.0.1:1/0", timeout=0.2)
    assert down.claim(["u1"], "A", 5000) is None
    down.release(["u1"], "A")  # degrades, never raises
    assert down.errors == 2


def test_a_claim_reply_that_is_not_one_code_per_user_is_no_claims():
    assert claim_codes([0, 1, 2], 3) == [0, 1, 2]
    for raw in (None, b"OK", [1], [1, 3], [1, b"1"], [True, 1], [-1, 0], "12"):
        assert claim_codes(raw, 2) is None, raw
