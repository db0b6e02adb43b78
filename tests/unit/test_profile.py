"""Unit tests for the profile math (SPEC section 4, "Math"): myshop_ops.base.profile."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from myshop_ops.base.profile import (
    DEFAULT_LAMBDA,
    SECONDS_PER_DAY,
    Profile,
    VectorSpaceMismatch,
    apply_event,
    decay,
    fold,
    from_days,
    half_life_days,
    to_days,
)

LAM = DEFAULT_LAMBDA
MODEL = "text-embedding-3-small"
OTHER_MODEL = "text-embedding-3-large"
WEIGHTS = (0.3, 0.5, 0.7, 1.0)

EMB_TOL = 1e-5  # max abs difference between two embeddings
MAG_RTOL = 1e-6  # relative difference between two magnitudes
# Folding stores the embedding as float32, so each intermediate step loses ~6e-8 * |S_k| of
# absolute precision. When the events nearly cancel (|S| tiny compared with the sum of the
# decayed weights) that absolute error is amplified by 1/|S|; such ill-conditioned draws are
# not what the order/batching properties are about, so they are filtered out.
MIN_CONDITIONING = 0.05

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


# --------------------------------------------------------------------------- helpers


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def basis(dims: int, i: int) -> np.ndarray:
    e = np.zeros(dims, dtype=np.float64)
    e[i] = 1.0
    return e


def random_unit_vectors(seed: int, n: int, dims: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    while True:
        raw = rng.standard_normal((n, dims))
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        if np.all(norms > 1e-9):
            return raw / norms


def one_by_one(profile, times, weights, vectors, order=None, *, model=MODEL, lam=LAM) -> Profile:
    idx = range(len(times)) if order is None else order
    for i in idx:
        profile = apply_event(profile, float(times[i]), float(weights[i]), vectors[i], lam=lam, model=model)
    return profile


def reference_total(times, weights, vectors, lam=LAM) -> tuple[np.ndarray, float]:
    """S(T) straight from the definition, in float64, with T = newest time."""
    times = np.asarray(times, dtype=np.float64)
    big_t = float(times.max())
    coeffs = np.asarray(weights, dtype=np.float64) * np.exp(-lam * (big_t - times))
    return coeffs @ np.asarray(vectors, dtype=np.float64), big_t


def conditioning(times, weights, vectors, lam=LAM) -> float:
    """|S| divided by the sum of the decayed weights (1 = no cancellation, ~0 = near total)."""
    total, big_t = reference_total(times, weights, vectors, lam)
    mass = float(np.sum(np.asarray(weights) * np.exp(-lam * (big_t - np.asarray(times)))))
    return float(np.linalg.norm(total)) / mass


def assert_same_profile(a: Profile, b: Profile, *, emb_tol=EMB_TOL, mag_rtol=MAG_RTOL) -> None:
    assert a.model == b.model
    assert a.dimensions == b.dimensions
    assert a.last_updated == pytest.approx(b.last_updated, abs=1e-12)
    diff = float(np.max(np.abs(a.embedding.astype(np.float64) - b.embedding.astype(np.float64))))
    assert diff <= emb_tol, f"embeddings differ by {diff}"
    assert a.magnitude == pytest.approx(b.magnitude, rel=mag_rtol)


def assert_well_formed(p: Profile, dims: int) -> None:
    assert isinstance(p.embedding, np.ndarray)
    assert p.embedding.dtype == np.float32
    assert p.embedding.shape == (dims,)
    assert p.dimensions == dims
    assert abs(float(np.linalg.norm(p.embedding.astype(np.float64))) - 1.0) <= 1e-5
    assert np.all(np.isfinite(p.embedding))
    assert isinstance(p.magnitude, float)
    assert p.magnitude > 0.0
    assert math.isfinite(p.magnitude)


# --------------------------------------------------------------------------- strategies


@st.composite
def event_sets(draw, min_events: int = 1, max_events: int = 30):
    dims = draw(st.integers(min_value=2, max_value=64))
    n = draw(st.integers(min_value=min_events, max_value=max_events))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    base = draw(st.floats(min_value=19_000.0, max_value=21_000.0))  # ~2022..2027 in epoch days
    offsets = draw(
        st.lists(
            st.floats(min_value=-200.0, max_value=200.0, allow_nan=False, allow_infinity=False),
            min_size=n,
            max_size=n,
        )
    )
    weights = draw(st.lists(st.sampled_from(WEIGHTS), min_size=n, max_size=n))
    times = base + np.asarray(offsets, dtype=np.float64)
    vectors = random_unit_vectors(seed, n, dims)
    return times, np.asarray(weights, dtype=np.float64), vectors


# --------------------------------------------------------------------------- first event


class TestFirstEvent:
    @pytest.mark.parametrize("w", WEIGHTS)
    def test_first_event_gives_v_and_w(self, w):
        v = unit([3.0, -4.0, 12.0, 0.5])
        p = apply_event(None, 19_500.25, w, v, lam=LAM, model=MODEL)
        np.testing.assert_allclose(p.embedding, v, atol=1e-7)
        assert p.embedding.dtype == np.float32
        assert p.magnitude == pytest.approx(w, rel=1e-12)
        assert p.last_updated == 19_500.25
        assert p.model == MODEL
        assert p.dimensions == 4

    def test_first_fold_of_a_single_event_via_fold(self):
        v = unit(np.arange(1.0, 9.0))
        p = fold(None, np.array([12.5]), np.array([0.7]), v[None, :], lam=LAM, model=MODEL)
        np.testing.assert_allclose(p.embedding, v, atol=1e-7)
        assert p.magnitude == pytest.approx(0.7, rel=1e-12)
        assert p.last_updated == 12.5

    def test_float32_input_vector(self):
        v = unit([1.0, 2.0, 2.0]).astype(np.float32)
        p = apply_event(None, 1.0, 1.0, v, lam=LAM, model=MODEL)
        np.testing.assert_allclose(p.embedding, v, atol=1e-7)
        assert p.magnitude == pytest.approx(1.0, rel=1e-6)

    def test_list_input_vector(self):
        p = apply_event(None, 3.0, 0.5, [0.0, 1.0], lam=LAM, model=MODEL)
        np.testing.assert_array_equal(p.embedding, np.array([0.0, 1.0], dtype=np.float32))
        assert p.magnitude == pytest.approx(0.5)

    def test_first_fold_of_many_events_sets_t_to_the_newest(self):
        times = np.array([5.0, 9.0, 7.0])
        vecs = np.stack([basis(3, 0), basis(3, 1), basis(3, 2)])
        p = fold(None, times, np.ones(3), vecs, lam=LAM, model=MODEL)
        assert p.last_updated == 9.0
        total = p.total
        assert total[1] == pytest.approx(1.0, rel=1e-6)
        assert total[2] == pytest.approx(math.exp(-LAM * 2.0), rel=1e-6)
        assert total[0] == pytest.approx(math.exp(-LAM * 4.0), rel=1e-6)

    def test_total_property_is_float64_s(self):
        p = apply_event(None, 0.0, 0.7, unit([1.0, 1.0]), lam=LAM, model=MODEL)
        assert p.total.dtype == np.float64
        np.testing.assert_allclose(p.total, 0.7 * unit([1.0, 1.0]), rtol=1e-6)

    def test_profile_is_frozen(self):
        p = apply_event(None, 0.0, 1.0, basis(2, 0), lam=LAM, model=MODEL)
        with pytest.raises(AttributeError):
            p.magnitude = 2.0  # type: ignore[misc]


# --------------------------------------------------------------------------- half-life / decay


class TestHalfLife:
    def test_decay_at_half_life_is_one_half(self):
        assert abs(float(decay(half_life_days(0.023), 0.023)) - 0.5) <= 1e-12

    def test_half_life_value(self):
        hl = half_life_days(0.023)
        assert hl == pytest.approx(30.1, abs=0.05)
        assert hl == pytest.approx(30.136, abs=1e-3)
        assert hl == pytest.approx(math.log(2.0) / 0.023, rel=1e-15)

    def test_default_lambda_half_life_is_30_1_days(self):
        assert DEFAULT_LAMBDA == 0.023
        assert round(half_life_days(DEFAULT_LAMBDA), 1) == 30.1

    @pytest.mark.parametrize("lam", [0.001, 0.023, 0.1, 1.0])
    def test_decay_halves_every_half_life(self, lam):
        hl = half_life_days(lam)
        for k in range(5):
            assert float(decay(k * hl, lam)) == pytest.approx(0.5**k, rel=1e-12)

    def test_decay_basic_values_and_arrays(self):
        assert float(decay(0.0, LAM)) == 1.0
        out = decay(np.array([0.0, 1.0, 10.0]), LAM)
        assert isinstance(out, np.ndarray)
        np.testing.assert_allclose(out, np.exp(-LAM * np.array([0.0, 1.0, 10.0])), rtol=1e-15)
        assert float(decay(-1.0, LAM)) > 1.0  # future events would grow: only elapsed >= 0 is used

    def test_event_one_half_life_older_contributes_half(self):
        hl = half_life_days(LAM)
        e0, e1 = basis(4, 0), basis(4, 1)
        t_new = 20_000.0
        p = fold(
            None,
            np.array([t_new - hl, t_new]),
            np.array([1.0, 1.0]),
            np.stack([e0, e1]),
            lam=LAM,
            model=MODEL,
        )
        total = p.total
        assert total[1] == pytest.approx(1.0, rel=1e-6)
        assert total[0] == pytest.approx(0.5, rel=1e-6)
        assert total[0] / total[1] == pytest.approx(0.5, rel=1e-6)
        assert p.last_updated == t_new

    def test_event_30_1_days_older_contributes_about_half_sequential(self):
        e0, e1 = basis(3, 0), basis(3, 2)
        p = apply_event(None, 100.0, 0.7, e0, lam=LAM, model=MODEL)
        p = apply_event(p, 130.1, 0.7, e1, lam=LAM, model=MODEL)
        total = p.total
        assert total[2] == pytest.approx(0.7, rel=1e-6)
        assert total[0] == pytest.approx(0.35, rel=1e-3)  # 30.1 ~ the 30.136-day half-life
        assert total[0] == pytest.approx(0.7 * math.exp(-LAM * 30.1), rel=1e-6)
        assert total[1] == 0.0

    def test_late_event_one_half_life_older_contributes_half(self):
        hl = half_life_days(LAM)
        e0, e1 = basis(2, 0), basis(2, 1)
        p = apply_event(None, 500.0, 1.0, e1, lam=LAM, model=MODEL)
        p = apply_event(p, 500.0 - hl, 1.0, e0, lam=LAM, model=MODEL)  # arrives late
        assert p.last_updated == 500.0
        assert p.total[0] == pytest.approx(0.5, rel=1e-6)
        assert p.total[1] == pytest.approx(1.0, rel=1e-6)


# --------------------------------------------------------------------------- SPEC's two cases


class TestSpecCases:
    v1 = unit([1.0, 2.0, -2.0])
    v2 = unit([0.0, 3.0, 4.0])
    v3 = unit([-1.0, 0.5, 0.25])

    def test_newer_event_rescales_s(self):
        # t >= T: S' = exp(-lambda (t - T)) S + w v, T' = t
        p = apply_event(None, 10.0, 0.5, self.v1, lam=LAM, model=MODEL)
        s = p.total
        q = apply_event(p, 25.0, 0.7, self.v2, lam=LAM, model=MODEL)
        expected = math.exp(-LAM * 15.0) * s + 0.7 * self.v2
        np.testing.assert_allclose(q.total, expected, rtol=1e-6, atol=1e-7)
        assert q.magnitude == pytest.approx(np.linalg.norm(expected), rel=1e-6)
        np.testing.assert_allclose(q.embedding, expected / np.linalg.norm(expected), atol=1e-6)
        assert q.last_updated == 25.0

    def test_equal_time_is_plain_sum(self):
        p = apply_event(None, 10.0, 0.5, self.v1, lam=LAM, model=MODEL)
        q = apply_event(p, 10.0, 1.0, self.v2, lam=LAM, model=MODEL)
        expected = 0.5 * self.v1 + 1.0 * self.v2
        np.testing.assert_allclose(q.total, expected, rtol=1e-6, atol=1e-7)
        assert q.last_updated == 10.0

    def test_late_event_is_merged_decayed(self):
        # t < T: S' = S + w exp(-lambda (T - t)) v, T' = T
        p = apply_event(None, 40.0, 1.0, self.v1, lam=LAM, model=MODEL)
        s = p.total
        q = apply_event(p, 12.5, 0.3, self.v2, lam=LAM, model=MODEL)
        expected = s + 0.3 * math.exp(-LAM * 27.5) * self.v2
        np.testing.assert_allclose(q.total, expected, rtol=1e-6, atol=1e-7)
        assert q.magnitude == pytest.approx(np.linalg.norm(expected), rel=1e-6)
        assert q.last_updated == 40.0

    def test_three_events_mixed_cases_by_hand(self):
        # events arrive at t=10, then t=5 (late), then t=20 (newer)
        p = apply_event(None, 10.0, 1.0, self.v1, lam=LAM, model=MODEL)
        p = apply_event(p, 5.0, 0.5, self.v2, lam=LAM, model=MODEL)
        s = 1.0 * self.v1 + 0.5 * math.exp(-LAM * 5.0) * self.v2
        np.testing.assert_allclose(p.total, s, rtol=1e-6, atol=1e-7)
        assert p.last_updated == 10.0
        p = apply_event(p, 20.0, 0.7, self.v3, lam=LAM, model=MODEL)
        s = math.exp(-LAM * 10.0) * s + 0.7 * self.v3
        np.testing.assert_allclose(p.total, s, rtol=1e-6, atol=1e-7)
        assert p.last_updated == 20.0
        # and equals the definition S(T) = sum_i w_i exp(-lambda (T - t_i)) v_i
        direct = 1.0 * math.exp(-LAM * 10.0) * self.v1 + 0.5 * math.exp(-LAM * 15.0) * self.v2 + 0.7 * self.v3
        np.testing.assert_allclose(p.total, direct, rtol=1e-6, atol=1e-7)

    def test_fold_batch_straddling_t(self):
        # a batch with one late and one newer event applied to an existing profile
        p = apply_event(None, 10.0, 1.0, self.v1, lam=LAM, model=MODEL)
        q = fold(
            p,
            np.array([4.0, 16.0]),
            np.array([0.5, 0.3]),
            np.stack([self.v2, self.v3]),
            lam=LAM,
            model=MODEL,
        )
        expected = math.exp(-LAM * 6.0) * self.v1 + 0.5 * math.exp(-LAM * 12.0) * self.v2 + 0.3 * self.v3
        np.testing.assert_allclose(q.total, expected, rtol=1e-6, atol=1e-7)
        assert q.last_updated == 16.0

    def test_lambda_zero_is_plain_weighted_sum(self):
        p = apply_event(None, 0.0, 1.0, self.v1, lam=0.0, model=MODEL)
        p = apply_event(p, 1000.0, 0.5, self.v2, lam=0.0, model=MODEL)
        p = apply_event(p, -1000.0, 0.3, self.v3, lam=0.0, model=MODEL)
        np.testing.assert_allclose(p.total, self.v1 + 0.5 * self.v2 + 0.3 * self.v3, rtol=1e-6, atol=1e-7)

    def test_inputs_and_previous_profile_are_not_mutated(self):
        p = apply_event(None, 10.0, 1.0, self.v1, lam=LAM, model=MODEL)
        emb_before = p.embedding.copy()
        mag_before, t_before = p.magnitude, p.last_updated
        times = np.array([4.0, 16.0])
        weights = np.array([0.5, 0.3])
        vecs = np.stack([self.v2, self.v3])
        copies = (times.copy(), weights.copy(), vecs.copy())
        fold(p, times, weights, vecs, lam=LAM, model=MODEL)
        np.testing.assert_array_equal(p.embedding, emb_before)
        assert (p.magnitude, p.last_updated) == (mag_before, t_before)
        for a, b in zip((times, weights, vecs), copies, strict=True):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(events=event_sets(), perm_seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_property_permutation_invariance(events, perm_seed):
    times, weights, vectors = events
    assume(conditioning(times, weights, vectors) >= MIN_CONDITIONING)
    order = np.random.default_rng(perm_seed).permutation(len(times))
    base = fold(None, times, weights, vectors, lam=LAM, model=MODEL)
    # the same batch in another order
    permuted_batch = fold(None, times[order], weights[order], vectors[order], lam=LAM, model=MODEL)
    assert_same_profile(base, permuted_batch)
    # the events arriving one by one in another order
    permuted_seq = one_by_one(None, times, weights, vectors, order=order)
    assert_same_profile(base, permuted_seq)
    # and both equal the definition
    total, big_t = reference_total(times, weights, vectors)
    assert base.last_updated == big_t == permuted_seq.last_updated
    assert base.magnitude == pytest.approx(float(np.linalg.norm(total)), rel=MAG_RTOL)
    assert np.max(np.abs(base.embedding - total / np.linalg.norm(total))) <= EMB_TOL


@PROPERTY_SETTINGS
@given(events=event_sets(), data=st.data())
def test_property_batching_invariance(events, data):
    times, weights, vectors = events
    assume(conditioning(times, weights, vectors) >= MIN_CONDITIONING)
    n = len(times)
    cuts = sorted(data.draw(st.sets(st.integers(min_value=1, max_value=max(1, n - 1)), max_size=n), label="cuts"))
    bounds = [0, *[c for c in cuts if 0 < c < n], n]
    all_at_once = fold(None, times, weights, vectors, lam=LAM, model=MODEL)
    batched = None
    for lo, hi in itertools.pairwise(bounds):
        if lo == hi:
            continue
        batched = fold(batched, times[lo:hi], weights[lo:hi], vectors[lo:hi], lam=LAM, model=MODEL)
    assert batched is not None
    assert_same_profile(all_at_once, batched)
    sequential = one_by_one(None, times, weights, vectors)
    assert_same_profile(all_at_once, sequential)
    assert_same_profile(batched, sequential)


@PROPERTY_SETTINGS
@given(
    events=event_sets(min_events=1, max_events=29),
    late_by=st.floats(min_value=1e-3, max_value=400.0),
    w=st.sampled_from(WEIGHTS),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_property_late_events_are_merged_not_dropped(events, late_by, w, seed):
    times, weights, vectors = events
    p = fold(None, times, weights, vectors, lam=LAM, model=MODEL)
    dims = vectors.shape[1]
    v = random_unit_vectors(seed, 1, dims)[0]
    t_late = p.last_updated - late_by
    q = apply_event(p, t_late, w, v, lam=LAM, model=MODEL)
    assert q.last_updated == p.last_updated  # T stays the max
    expected = p.total + w * math.exp(-LAM * late_by) * v
    assert q.magnitude != p.magnitude  # the event was not dropped
    assert q.magnitude == pytest.approx(float(np.linalg.norm(expected)), rel=MAG_RTOL)
    np.testing.assert_allclose(q.total - p.total, w * math.exp(-LAM * late_by) * v, atol=1e-5)
    # and the same event inside a batch with newer ones is kept too
    all_times = np.append(times, t_late)
    all_w = np.append(weights, w)
    all_v = np.vstack([vectors, v[None, :]])
    assume(conditioning(all_times, all_w, all_v) >= MIN_CONDITIONING)
    r = fold(None, all_times, all_w, all_v, lam=LAM, model=MODEL)
    assert r.last_updated == p.last_updated
    assert_same_profile(q, r)


@PROPERTY_SETTINGS
@given(events=event_sets())
def test_property_well_formed(events):
    times, weights, vectors = events
    dims = vectors.shape[1]
    p = fold(None, times, weights, vectors, lam=LAM, model=MODEL)
    assert_well_formed(p, dims)
    assert p.model == MODEL
    assert p.last_updated == float(times.max())
    q = None
    for i in range(len(times)):
        q = apply_event(q, float(times[i]), float(weights[i]), vectors[i], lam=LAM, model=MODEL)
        assert_well_formed(q, dims)
        assert q.last_updated == float(times[: i + 1].max())


@PROPERTY_SETTINGS
@given(events=event_sets(min_events=2))
def test_property_newer_event_matches_spec_case_one(events):
    """Folding the events in time order: every step is the t >= T case of the SPEC."""
    times, weights, vectors = events
    order = np.argsort(times, kind="stable")
    p = apply_event(None, float(times[order[0]]), float(weights[order[0]]), vectors[order[0]], lam=LAM, model=MODEL)
    for i in order[1:]:
        s, big_t = p.total, p.last_updated
        t, w, v = float(times[i]), float(weights[i]), vectors[i]
        p = apply_event(p, t, w, v, lam=LAM, model=MODEL)
        expected = math.exp(-LAM * (t - big_t)) * s + w * v
        np.testing.assert_allclose(p.total, expected, atol=1e-5 * max(1.0, float(np.linalg.norm(s))))
        assert p.last_updated == t


# --------------------------------------------------------------------------- vector spaces


class TestVectorSpaceMismatch:
    def _profile(self, dims=4, model=MODEL) -> Profile:
        return apply_event(None, 100.0, 1.0, unit(np.arange(1.0, dims + 1)), lam=LAM, model=model)

    def test_is_a_value_error(self):
        assert issubclass(VectorSpaceMismatch, ValueError)

    def test_other_model_name_apply_event(self):
        p = self._profile()
        with pytest.raises(VectorSpaceMismatch):
            apply_event(p, 101.0, 1.0, basis(4, 0), lam=LAM, model=OTHER_MODEL)

    def test_other_model_name_fold(self):
        p = self._profile()
        with pytest.raises(VectorSpaceMismatch):
            fold(p, np.array([101.0, 99.0]), np.ones(2), np.eye(4)[:2], lam=LAM, model=OTHER_MODEL)

    @pytest.mark.parametrize("other_dims", [2, 3, 5, 8])
    def test_other_dimensions_apply_event(self, other_dims):
        p = self._profile(dims=4)
        with pytest.raises(VectorSpaceMismatch):
            apply_event(p, 101.0, 1.0, basis(other_dims, 0), lam=LAM, model=MODEL)

    def test_other_dimensions_fold(self):
        p = self._profile(dims=4)
        with pytest.raises(VectorSpaceMismatch):
            fold(p, np.array([101.0]), np.ones(1), np.ones((1, 5)), lam=LAM, model=MODEL)

    def test_both_differ(self):
        p = self._profile(dims=4)
        with pytest.raises(VectorSpaceMismatch):
            apply_event(p, 101.0, 1.0, basis(6, 0), lam=LAM, model=OTHER_MODEL)

    def test_mismatch_checked_before_the_math(self):
        # even a batch that would cancel to zero reports the space mismatch first
        p = self._profile(dims=4)
        vecs = np.array([[1.0, 0, 0, 0, 0], [-1.0, 0, 0, 0, 0]])
        with pytest.raises(VectorSpaceMismatch):
            fold(p, np.array([100.0, 100.0]), np.ones(2), vecs, lam=LAM, model=MODEL)

    def test_model_name_comparison_is_exact(self):
        p = self._profile()
        with pytest.raises(VectorSpaceMismatch):
            apply_event(p, 101.0, 1.0, basis(4, 0), lam=LAM, model=MODEL.upper())

    def test_same_space_is_accepted_and_tagged(self):
        p = self._profile(dims=4, model=OTHER_MODEL)
        q = apply_event(p, 101.0, 1.0, basis(4, 0), lam=LAM, model=OTHER_MODEL)
        assert (q.model, q.dimensions) == (OTHER_MODEL, 4)

    def test_no_profile_accepts_any_space(self):
        p = apply_event(None, 1.0, 1.0, basis(7, 3), lam=LAM, model="anything")
        assert (p.model, p.dimensions) == ("anything", 7)

    @PROPERTY_SETTINGS
    @given(
        dims=st.integers(min_value=2, max_value=64),
        shift=st.integers(min_value=1, max_value=63),
        seed=st.integers(min_value=0, max_value=2**32 - 1),
    )
    def test_property_any_other_dimension_is_refused(self, dims, shift, seed):
        other = (dims - 1 + shift) % 64 + 1  # any of 1..64 except dims
        p = apply_event(None, 0.0, 1.0, random_unit_vectors(seed, 1, dims)[0], lam=LAM, model=MODEL)
        with pytest.raises(VectorSpaceMismatch):
            apply_event(p, 1.0, 1.0, random_unit_vectors(seed, 1, other)[0], lam=LAM, model=MODEL)


# --------------------------------------------------------------------------- bad input


class TestBadInput:
    def test_zero_events(self):
        with pytest.raises(ValueError):
            fold(None, np.array([]), np.array([]), np.zeros((0, 4)), lam=LAM, model=MODEL)

    def test_zero_events_on_existing_profile(self):
        p = apply_event(None, 1.0, 1.0, basis(4, 0), lam=LAM, model=MODEL)
        with pytest.raises(ValueError):
            fold(p, np.array([]), np.array([]), np.zeros((0, 4)), lam=LAM, model=MODEL)

    @pytest.mark.parametrize(
        ("n_times", "n_weights", "n_vectors"),
        [(2, 3, 3), (3, 2, 3), (3, 3, 2), (1, 2, 2), (2, 2, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0)],
    )
    def test_mismatched_lengths(self, n_times, n_weights, n_vectors):
        with pytest.raises(ValueError):
            fold(
                None,
                np.arange(n_times, dtype=np.float64),
                np.ones(n_weights),
                np.ones((n_vectors, 3)),
                lam=LAM,
                model=MODEL,
            )

    def test_one_dimensional_vectors_block(self):
        with pytest.raises(ValueError):
            fold(None, np.array([1.0, 2.0]), np.ones(2), np.ones(2), lam=LAM, model=MODEL)

    def test_three_dimensional_vectors_block(self):
        with pytest.raises(ValueError):
            fold(None, np.array([1.0]), np.ones(1), np.ones((1, 2, 2)), lam=LAM, model=MODEL)

    def test_apply_event_two_dimensional_vector(self):
        with pytest.raises(ValueError):
            apply_event(None, 1.0, 1.0, np.ones((2, 2)), lam=LAM, model=MODEL)

    def test_vectors_summing_to_zero(self):
        v = unit([1.0, 2.0, 3.0])
        with pytest.raises(ValueError):
            fold(None, np.array([5.0, 5.0]), np.array([0.5, 0.5]), np.stack([v, -v]), lam=LAM, model=MODEL)

    def test_zero_vector_first_event(self):
        with pytest.raises(ValueError):
            apply_event(None, 1.0, 1.0, np.zeros(4), lam=LAM, model=MODEL)

    def test_zero_weight_first_event(self):
        with pytest.raises(ValueError):
            apply_event(None, 1.0, 0.0, basis(4, 1), lam=LAM, model=MODEL)

    def test_event_cancelling_the_profile(self):
        p = apply_event(None, 5.0, 1.0, basis(3, 0), lam=LAM, model=MODEL)
        with pytest.raises(ValueError):
            apply_event(p, 5.0, 1.0, -basis(3, 0), lam=LAM, model=MODEL)

    def test_zero_sum_is_not_a_vector_space_mismatch(self):
        v = unit([1.0, 1.0])
        with pytest.raises(ValueError) as info:
            fold(None, np.array([1.0, 1.0]), np.ones(2), np.stack([v, -v]), lam=LAM, model=MODEL)
        assert not isinstance(info.value, VectorSpaceMismatch)

    @pytest.mark.filterwarnings("ignore::RuntimeWarning")
    @pytest.mark.parametrize("bad", [math.nan, math.inf])
    def test_non_finite_weight(self, bad):
        with pytest.raises(ValueError):
            apply_event(None, 1.0, bad, basis(3, 0), lam=LAM, model=MODEL)

    def test_non_finite_vector(self):
        with pytest.raises(ValueError):
            apply_event(None, 1.0, 1.0, np.array([1.0, math.nan, 0.0]), lam=LAM, model=MODEL)

    def test_nan_time(self):
        with pytest.raises(ValueError):
            apply_event(None, math.nan, 1.0, basis(3, 0), lam=LAM, model=MODEL)

    def test_failed_fold_leaves_the_profile_usable(self):
        p = apply_event(None, 5.0, 1.0, basis(3, 0), lam=LAM, model=MODEL)
        with pytest.raises(ValueError):
            apply_event(p, 5.0, 1.0, -basis(3, 0), lam=LAM, model=MODEL)
        q = apply_event(p, 5.0, 1.0, basis(3, 1), lam=LAM, model=MODEL)
        np.testing.assert_allclose(q.total, [1.0, 1.0, 0.0], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- time conversion


UTC_DATETIMES = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2050, 1, 1), timezones=st.just(UTC))


class TestTimeConversion:
    def test_epoch_is_zero(self):
        assert to_days(datetime(1970, 1, 1, tzinfo=UTC)) == 0.0
        assert from_days(0.0) == datetime(1970, 1, 1, tzinfo=UTC)

    def test_known_values(self):
        assert to_days(datetime(1970, 1, 2, 12, tzinfo=UTC)) == 1.5
        assert to_days(datetime(1969, 12, 31, tzinfo=UTC)) == -1.0
        assert SECONDS_PER_DAY == 86_400.0
        assert from_days(1.5) == datetime(1970, 1, 2, 12, tzinfo=UTC)

    def test_from_days_is_aware_utc(self):
        d = from_days(19_723.25)
        assert d.tzinfo is not None
        assert d.utcoffset() == timedelta(0)
        assert d == datetime(2024, 1, 1, 6, tzinfo=UTC)

    def test_other_timezones_are_the_same_instant(self):
        paris = timezone(timedelta(hours=2))
        a = datetime(2024, 6, 1, 14, 0, tzinfo=paris)
        b = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
        assert to_days(a) == to_days(b)
        assert from_days(to_days(a)) == a

    def test_naive_datetime_is_refused(self):
        with pytest.raises(TypeError):
            to_days(datetime(2024, 1, 1))

    def test_differences_are_days(self):
        a = datetime(2024, 1, 1, tzinfo=UTC)
        b = a + timedelta(days=30, hours=3)
        assert to_days(b) - to_days(a) == pytest.approx(30.125, abs=1e-9)

    def test_microseconds_survive(self):
        d = datetime(2025, 3, 4, 5, 6, 7, 123_457, tzinfo=UTC)
        assert abs(from_days(to_days(d)) - d) <= timedelta(microseconds=1)

    @PROPERTY_SETTINGS
    @given(
        d=st.datetimes(
            min_value=datetime(1900, 1, 1),
            max_value=datetime(2100, 12, 31),
            timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]),
        )
    )
    def test_property_round_trip(self, d):
        back = from_days(to_days(d))
        assert back.tzinfo is not None
        assert back.utcoffset() == timedelta(0)
        assert abs(back - d) <= timedelta(microseconds=1)

    @PROPERTY_SETTINGS
    @given(days=st.floats(min_value=-25_000.0, max_value=50_000.0))
    def test_property_days_round_trip(self, days):
        # from_days -> to_days loses only the sub-microsecond part
        assert abs(to_days(from_days(days)) - days) * SECONDS_PER_DAY <= 1e-6

    @PROPERTY_SETTINGS
    @given(a=UTC_DATETIMES, b=UTC_DATETIMES)
    def test_property_monotonic(self, a, b):
        if a < b:
            assert to_days(a) < to_days(b)
        elif a == b:
            assert to_days(a) == to_days(b)
