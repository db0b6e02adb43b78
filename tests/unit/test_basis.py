"""The item map (myshop_ops.base.basis): a profile rebuilt from it equals the fold of its events, under this model
and under another of another size; with items dropped, the rebuild stays within the stated bound; the stored form
reads back exactly and refuses anything else."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from myshop_ops.base.basis import (
    Basis,
    UnreadableBasis,
    decode_basis,
    encode_basis,
    fold_basis,
    phrase_key,
    product_key,
    rebuild,
)
from myshop_ops.base.profile import DEFAULT_LAMBDA, fold

LAM = DEFAULT_LAMBDA
T0 = 20_000.0  # days since the epoch (2024)


def _space(n_items: int, dims: int, seed: int) -> np.ndarray:
    """Unit vectors of ``n_items`` items in a space of ``dims`` dimensions."""
    v = np.random.default_rng(seed).normal(size=(n_items, dims))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _fold_in_batches(events: list[tuple[int, float, float]], batches: list[int], spaces: list[np.ndarray],
                     limit: int) -> tuple[list, Basis]:
    """Fold ``events`` (item, day offset, weight) in the given batch sizes into one profile per space, and the map."""
    profiles = [None] * len(spaces)
    basis: Basis | None = None
    at = 0
    for size in batches:
        chunk = events[at:at + size]
        at += size
        if not chunk:
            continue
        items = [e[0] for e in chunk]
        times = np.array([T0 + e[1] for e in chunk])
        weights = np.array([e[2] for e in chunk])
        old_t = profiles[0].last_updated if profiles[0] is not None else None
        profiles = [fold(p, times, weights, space[items], lam=LAM, model=f"m{i}")
                    for i, (p, space) in enumerate(zip(profiles, spaces, strict=True))]
        basis = fold_basis(basis, old_t, profiles[0].last_updated, [product_key(str(i)) for i in items], times,
                           weights, lam=LAM, limit=limit)
    return profiles, basis


def _vectors_of(basis: Basis, space: np.ndarray) -> np.ndarray:
    return space[[int(k[2:]) for k in basis.keys]]


EVENTS = st.lists(st.tuples(st.integers(0, 39), st.floats(-120.0, 120.0), st.sampled_from((0.3, 0.5, 0.7, 1.0))),
                  min_size=1, max_size=80)
BATCHES = st.lists(st.integers(1, 10), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(events=EVENTS, batches=BATCHES)
def test_rebuild_equals_the_fold_under_both_models_when_nothing_is_dropped(events, batches):
    spaces = [_space(40, 16, 1), _space(40, 6, 2)]  # the current model and another of another size
    batches = [*batches, len(events)]  # whatever the batching, every event is folded
    profiles, basis = _fold_in_batches(events, batches, spaces, limit=40)
    assert basis.residual == 0.0
    for profile, space in zip(profiles, spaces, strict=True):
        if profile.magnitude < 0.05 * sum(e[2] for e in events) * math.exp(-LAM * 240):
            continue  # the events nearly cancel: float32 rounding of the stored unit vector dominates
        got = rebuild(basis, _vectors_of(basis, space), profile.last_updated, profile.model)
        assert got.last_updated == profile.last_updated
        assert got.dimensions == profile.dimensions
        assert abs(got.magnitude - profile.magnitude) <= 1e-5 * profile.magnitude
        assert float(got.embedding.astype(np.float64) @ profile.embedding.astype(np.float64)) > 1 - 1e-5


@settings(max_examples=200, deadline=None)
@given(events=EVENTS, batches=BATCHES, limit=st.integers(1, 12))
def test_a_bounded_map_stays_within_its_stated_error(events, batches, limit):
    """Dropping items moves their mass to the residual: the rebuild is off by at most the residual (unit vectors),
    under the current model and another one."""
    spaces = [_space(40, 16, 3), _space(40, 6, 4)]
    profiles, basis = _fold_in_batches(events, [*batches, len(events)], spaces, limit=limit)
    assert len(basis.keys) <= limit
    for profile, space in zip(profiles, spaces, strict=True):
        kept = basis.weights @ _vectors_of(basis, space).astype(np.float64) if basis.keys else 0.0
        assert np.linalg.norm(profile.total - kept) <= basis.residual + 1e-5 * max(profile.magnitude, 1.0)


def test_repeated_items_share_one_entry_and_the_map_keeps_the_heaviest():
    times = np.array([T0, T0, T0 + 1, T0 + 2])
    keys = [product_key("a"), phrase_key("red shoes"), product_key("a"), product_key("b")]
    basis = fold_basis(None, None, T0 + 2, keys, times, np.array([1.0, 0.7, 1.0, 0.3]), lam=LAM, limit=2)
    assert basis.keys == ("p:a", "s:red shoes")
    assert basis.weights[0] == pytest.approx(math.exp(-2 * LAM) + math.exp(-LAM))
    assert basis.residual == pytest.approx(0.3)
    later = fold_basis(basis, T0 + 2, T0 + 32, [], np.array([]), np.array([]), lam=LAM, limit=2)
    assert later.residual == pytest.approx(0.3 * math.exp(-30 * LAM))  # the residual decays with the profile
    assert later.error_bound(2.0) == pytest.approx(later.residual / 2.0)


def test_a_profile_without_a_map_is_all_residual():
    basis = Basis.unmapped(3.5)
    assert basis.error_bound(3.5) == 1.0
    with pytest.raises(ValueError, match="nothing to rebuild"):
        rebuild(basis, np.zeros((0, 4)), T0, "m")


KEY_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=255)  # as the contract


@given(keys=st.lists(KEY_TEXT, max_size=30, unique=True), residual=st.floats(0, 1e9))
def test_the_stored_map_reads_back_exactly(keys, residual):
    keys = [phrase_key(k) if i % 2 else product_key(k) for i, k in enumerate(keys)]
    weights = np.random.default_rng(len(keys)).uniform(0, 10, len(keys))
    basis = Basis(tuple(keys), weights, residual)
    back = decode_basis(encode_basis(basis))
    assert back.keys == basis.keys and back.residual == residual
    assert np.array_equal(back.weights, weights)


@given(raw=st.binary(max_size=200))
def test_any_other_stored_value_is_refused_with_a_reason(raw):
    try:
        decode_basis(raw)
    except UnreadableBasis as exc:
        assert str(exc)


@given(keys=st.lists(KEY_TEXT, min_size=1, max_size=8, unique=True), data=st.data())
def test_a_damaged_map_is_refused_with_a_reason_or_read_as_a_valid_map(keys, data):
    """Bytes of a real map changed, cut or inserted anywhere (a header, a weight, a separator, a key's kind): read
    as a map that holds only what myshop writes, or refused with UnreadableBasis; never another exception."""
    raw = bytearray(encode_basis(Basis(tuple(product_key(k) for k in keys), np.ones(len(keys)), 0.5)))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        edit = data.draw(st.sampled_from(("set", "cut", "insert")))
        byte = data.draw(st.sampled_from((0, 1, 0x3A, 0x70, 0x73, 0x80, 0xC3, 0xFF)) | st.integers(0, 255))
        if edit == "insert":
            raw[at:at] = bytes([byte])
        elif at < len(raw):
            raw[at:at + 1] = b"" if edit == "cut" else bytes([byte])
    try:
        got = decode_basis(bytes(raw))
    except UnreadableBasis as exc:
        assert str(exc)
    else:
        assert len(got.keys) == len(got.weights) == len(set(got.keys))
        assert all(k[:2] in ("p:", "s:") and len(k) >= 3 and "\x00" not in k for k in got.keys)
        assert np.all(np.isfinite(got.weights) & (got.weights >= 0)) and got.residual >= 0


def test_a_key_holding_nul_is_not_stored():
    with pytest.raises(ValueError, match="NUL"):
        encode_basis(Basis(("p:a\x00p:b",), np.ones(1), 0.0))


def test_the_first_format_is_refused_as_another_format():
    entry = struct.pack("<dH", 1.0, 3) + b"p:1"  # format 1: weight, length and key, item after item
    with pytest.raises(UnreadableBasis, match="format 1, not 2"):
        decode_basis(struct.pack("<BHd", 1, 1, 0.0) + entry + bytes(4))


@pytest.mark.parametrize("raw", [None, "text", encode_basis(Basis(("x:1",), np.ones(1), 0.0)),
                                 encode_basis(Basis(("p:1",), np.array([-1.0]), 0.0)),
                                 encode_basis(Basis(("p:1",), np.ones(1), math.inf)),
                                 encode_basis(Basis(("p:1", "p:1"), np.ones(2), 0.0)),
                                 encode_basis(Basis(("p:1",), np.ones(1), 0.0)) + b"x",
                                 encode_basis(Basis(("p:1",), np.ones(1), 0.0))[:-1],
                                 encode_basis(Basis(("p:1", "p:2"), np.ones(2), 0.0)).replace(b"\x00p:2", b"\x00x:2"),
                                 encode_basis(Basis(("p:1", "p:2"), np.ones(2), 0.0)).replace(b"\x00", b"\x01"),
                                 encode_basis(Basis(("p:é",), np.ones(1), 0.0))[:-1] + b"\xff",
                                 encode_basis(Basis(("p:" + "x" * 1100,), np.ones(1), 0.0)),
                                 encode_basis(Basis(("p:1",), np.ones(1), 0.0)).replace(b"p:1", b"p:\x00"),
                                 encode_basis(Basis((), np.zeros(0), 0.0)) + b"p:1"])
def test_forged_maps_are_refused(raw):
    with pytest.raises(UnreadableBasis):
        decode_basis(raw)
