"""Per-user claims against the real Redis (dedup.RedisState's scripts): who gets a user, who waits, what a release
and a TTL free, and what the worker is told when Redis cannot answer (no claims: the conditional write decides)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest
from bson.objectid import ObjectId

from myshop_ops.adapters.dedup import RedisState, claim_reply, pack_profile, unpack_profile
from myshop_ops.adapters.store import StoredProfile
from myshop_ops.base.basis import Basis, encode_basis
from myshop_ops.base.profile import Profile
from tests.support.services import forget_keys, redis_url, wait_for


@pytest.fixture
def state():
    prefix = f"claims-{uuid.uuid4().hex[:8]}:"
    s = RedisState(redis_url(), prefix=prefix)
    yield s
    s.close()
    forget_keys(prefix)


def test_a_claimed_user_is_refused_to_others_until_released_and_the_waiter_goes_first(state):
    assert state.claim(["u1", "u2"], "A", 5000, "m", 4).codes == [1, 1]
    assert state.claim(["u1", "u3"], "B", 5000, "m", 4).codes == [0, 1]  # B now waits for u1
    assert state.claim(["u1"], "A", 5000, "m", 4).codes == [2]  # holding it: renewed
    state.release(["u1", "u2"], "A")
    assert state.claim(["u1"], "A", 5000, "m", 4).codes == [0]  # a hot user: A's next batch yields to the waiter
    assert state.claim(["u1", "u2"], "B", 5000, "m", 4).codes == [1, 1]
    state.release(["u1"], "A")  # not A's any more: nothing happens
    assert state.claim(["u1"], "C", 5000, "m", 4).codes == [0]
    state.release(["u1"], "B")
    assert state.claim(["u1"], "B", 5000, "m", 4).codes == [0]  # C waits for it now
    assert state.claim(["u1"], "C", 5000, "m", 4).codes == [1]
    state.release(["u1"], "C")
    assert state.claim(["u1"], "C", 5000, "m", 4).codes == [2]  # C held it last: its cached profile is current


def test_a_dead_workers_claim_frees_itself(state):
    assert state.claim(["u1"], "dead", 100, "m", 4).codes == [1]
    assert state.claim(["u1"], "alive", 5000, "m", 4).codes == [0]
    wait_for(lambda: state.claim(["u1"], "alive", 5000, "m", 4).codes == [1], timeout=5, what="the claim to expire")


def test_redis_down_or_refusing_scripts_means_no_claims():
    down = RedisState("redis://127.0.0.1:1/0", timeout=0.2)
    assert down.claim(["u1"], "A", 5000, "m", 4) is None
    down.release(["u1"], "A")  # degrades, never raises
    assert down.errors == 2


BASIS = Basis(("p:42", "s:red shoes"), np.array([1.5, 0.25]), 0.125)
TAIL = len(encode_basis(BASIS))  # the handoff ends with the item map


def profile(version: int = 3) -> StoredProfile:
    return StoredProfile(Profile(np.array([0.6, 0.8, 0, 0], dtype=np.float32), 2.5, 20_400.25, "m", 4), version,
                         recent_ids=b"i" * 64, recent_writes=b"w" * 16, doc_id=ObjectId(), event_count=7,
                         erased_at=datetime(2026, 1, 2, tzinfo=UTC), basis=BASIS)


def test_the_waiting_worker_gets_the_profile_as_written_instead_of_a_read(state):
    written = profile()
    assert state.claim(["u1", "u2"], "A", 5000, "m", 4).codes == [1, 1]
    assert state.claim(["u1"], "B", 5000, "m", 4).codes == [0]  # B waits for u1, nobody for u2
    state.release(["u1", "u2"], "A", {"u1": written, "u2": written})
    got = state.claim(["u1", "u2"], "B", 5000, "m", 4)
    assert got.codes == [1, 1] and list(got.profiles) == ["u1"]  # u2 had no waiter: nothing left, B reads it
    p = got.profiles["u1"]
    assert (p.version, p.doc_id, p.recent_ids, p.recent_writes, p.event_count, p.erased_at) == (
        written.version, written.doc_id, written.recent_ids, written.recent_writes, 7, written.erased_at)
    assert (p.basis.keys, p.basis.weights.tolist(), p.basis.residual) == (BASIS.keys, [1.5, 0.25], 0.125)
    assert np.array_equal(p.profile.embedding, written.profile.embedding) and p.profile.embedding.dtype == np.float32
    assert (p.profile.magnitude, p.profile.last_updated, p.profile.model, p.profile.dimensions) == (2.5, 20_400.25,
                                                                                                  "m", 4)
    state.release(["u1"], "B")
    assert state.claim(["u1"], "A", 5000, "m", 4).profiles == {}  # taken once: never a stale copy


def test_a_claim_reply_that_is_not_what_the_script_answers_is_no_claims():
    assert claim_reply([[0, 1, 2], [b"", b"", b""]], ["a", "b", "c"], "m", 4).codes == [0, 1, 2]
    for raw in (None, b"OK", [1, 2], [[1], [b""]], [[1, 3], [b"", b""]], [[1, b"1"], [b"", b""]],
                [[True, 1], [b"", b""]], [[-1, 0], [b"", b""]], [[1, 1], [b"", None]], "12"):
        assert claim_reply(raw, ["a", "b"], "m", 4) is None, raw


def test_a_handoff_that_is_not_a_profile_of_this_space_is_not_used():
    blob = pack_profile(profile())
    assert unpack_profile(blob, "m", 4) is not None
    assert unpack_profile(blob, "other-model", 4) is None and unpack_profile(blob, "m", 8) is None
    name = len(blob) - (1 + 16 + 64 + 16 + TAIL)  # where the model's name starts
    for bad in (b"", b"MSH1", blob[:-1], blob + b"x", b"XXXX" + blob[4:], blob[:name] + b"\xff" + blob[name + 1:],
                blob[:-TAIL]):
        assert unpack_profile(bad, "m", 4) is None
    assert pack_profile(replace(profile(), basis=None)) == b""  # no item map: the next holder reads the document
    nan = (blob[:-(64 + 16 + 16 + TAIL)] + np.array([np.nan, 0, 0, 0], dtype="<f4").tobytes()
           + blob[-(64 + 16 + TAIL):])
    assert len(nan) == len(blob) and unpack_profile(nan, "m", 4) is None
    assert claim_reply([[1], [b"garbage"]], ["a"], "m", 4).profiles == {}  # granted, the profile is read


def test_a_user_id_with_a_lone_surrogate_is_claimed_released_and_erased(state):
    """The worker claims the user a body names before the contract checks it: a lone surrogate (a JSON ``\\ud800``
    escape) made the claim's key unencodable and the worker crashed (UnicodeEncodeError, not a RedisError)."""
    user = "u\ud800"
    assert state.claim([user, "u2"], "A", 5000, "m", 4).codes == [1, 1]
    assert state.claim([user], "B", 5000, "m", 4).codes == [0]
    state.release([user, "u2"], "A")
    assert state.claim([user], "B", 5000, "m", 4).codes == [1]
    assert state.forget_user(user) == 0
    assert state.claim([user], "C", 5000, "m", 4).codes == [1]  # erasure dropped B's claim and the wait
