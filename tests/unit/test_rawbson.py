"""rawbson.py: the shop layout's array of doubles built and read with numpy is exactly what bson.encode writes and
what the plain decoder reads; anything else stored in ``vector`` is read (or refused, with the same reason) the
plain way."""

from __future__ import annotations

from datetime import UTC, datetime

import bson
import numpy as np
import pytest
from bson.binary import Binary
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.errors import InvalidDocument
from bson.int64 import Int64
from bson.regex import Regex
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from myshop_ops.base.layout import UnreadableProfile, read_profile
from myshop_ops.base.profile import VectorSpaceMismatch
from myshop_ops.base.rawbson import (
    DoubleArray,
    decode_with_doubles,
    double_array,
    raw_document,
    read_double_array,
    split_array,
)

T = datetime(2026, 11, 1, 12, 0, 7, tzinfo=UTC)
OPTS = CodecOptions(tz_aware=True, datetime_conversion=DatetimeConversion.DATETIME_AUTO,
                    unicode_decode_error_handler="replace")  # the store's profile reads
FINITE32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
VECTORS = arrays(np.float32, st.integers(1, 48), elements=FINITE32)


def fields(vector: object, n: int) -> dict:
    """A profile document as myshop writes it (shop layout), ``vector`` in the middle of the other fields."""
    return {"user_id": "u", "magnitude": 2.5, "model": "m", "dimensions": n, "myshop_version": 3, "vector": vector,
            "dimension_count": n, "last_updated": T, "version": 3, "recent_message_ids": Binary(b"\x01" * 64),
            "adopted": {"vector": Binary(b"\x27\x00", 9), "event_counts": {"search": 2}}, "event_count": 4}


def outcome(doc: dict, n: int) -> tuple:
    """What read_profile makes of ``doc``: the exact state read, or the exception and its message."""
    try:
        r = read_profile(doc, "m", n, now=T)
    except (UnreadableProfile, VectorSpaceMismatch) as exc:
        return type(exc).__name__, str(exc)
    p = r.profile
    return p.embedding.dtype.str, p.embedding.tobytes(), p.magnitude, p.last_updated, r.version, r.adopted


def fast_and_plain(raw: bytes, n: int) -> tuple[tuple, tuple]:
    return outcome(decode_with_doubles(raw, "vector", n, OPTS), n), outcome(bson.decode(raw, codec_options=OPTS), n)


@settings(max_examples=150, deadline=None)
@given(vec=VECTORS, at=st.integers(0, 12))
def test_raw_built_bytes_equal_bson_encode_and_the_raw_read_equals_the_plain_read(vec, at):
    n = len(vec)
    items = [(k, v) for k, v in fields(None, n).items() if k != "vector"]
    items.insert(at, ("vector", double_array(vec)))  # anywhere in the document
    doc = dict(items)
    built = raw_document(doc).raw
    plain = {k: vec.astype(np.float64).tolist() if k == "vector" else v for k, v in doc.items()}
    assert built == bson.encode(plain)  # what the shop's PHP reader gets: byte for byte the plain encoding
    rest, array = split_array(built, "vector")
    values = read_double_array(array, n)
    assert values.tobytes() == np.asarray(plain["vector"], dtype="<f8").tobytes()  # bit-exact
    assert bson.decode(rest, codec_options=OPTS) == {k: v for k, v in bson.decode(built, OPTS).items()
                                                     if k != "vector"}
    fast, slow = fast_and_plain(built, n)
    assert fast == slow


def test_special_doubles_at_1536_dimensions_round_trip_bit_exact():
    rng = np.random.default_rng(3)
    vec = rng.standard_normal(1536).astype(np.float32)
    f32 = np.finfo(np.float32)
    vec[:8] = [0.0, -0.0, f32.max, -f32.max, f32.tiny, f32.smallest_subnormal, np.inf, np.nan]
    array = double_array(vec).bson
    assert array == bson.encode({"v": vec.astype(np.float64).tolist()})[4 + 3:-1]
    assert read_double_array(array, 1536).tobytes() == vec.astype("<f8").tobytes()
    assert read_double_array(array, 1535) is None and read_double_array(array, 0) is None


def test_a_double_array_cannot_be_stored_as_anything_but_an_array():
    with pytest.raises(InvalidDocument):
        bson.encode({"vector": double_array(np.ones(4, np.float32))})


N = 16
GOOD = [0.25] * N


def spliced(array: bytes, **extra: object) -> bytes:
    """A stored profile whose ``vector`` element is ``array`` (BSON array bytes, written as they are)."""
    return raw_document({**fields(None, N), **extra, "vector": DoubleArray(array)}).raw


def array_of(values: list) -> bytes:
    return bson.encode({"v": values})[4 + 3:-1]


HOSTILE = {  # name: (the stored vector as BSON array bytes, what the read must say; None: read as the plain way)
    "mixed-types": (array_of([*GOOD[:-1], "x"]), "an array of arrays or mixed values"),
    "nan": (array_of([*GOOD[:-1], float("nan")]), "a NaN or infinite element"),
    "infinite": (array_of([float("inf"), *GOOD[1:]]), "a NaN or infinite element"),
    "nested": (array_of([GOOD]), "an array of arrays or mixed values"),
    "wrong-length": (array_of([*GOOD, 0.25]), "vector, expected m/16d"),
    "empty": (array_of([]), "(empty)"),
    "all-zero": (array_of([0.0] * N), "(zero)"),
    "int32-elements": (array_of([1] + [0] * (N - 1)), None),  # as the PHP driver writes whole numbers: readable
    "int64-elements": (array_of([Int64(1)] * N), None),
    "int64-huge": (array_of([Int64(2**60)] * N), "outside 1e-06..1e+06"),
    "mixed-int-double": (array_of([1, *GOOD[1:]]), None),
    "keys-out-of-order": (array_of(GOOD).replace(b"\x010\x00", b"\x01x\x00", 1), None),  # the plain way ignores keys
    "size-lies": (b"\x00\x00\x00\x00" + array_of(GOOD)[4:], None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_stored_arrays_are_read_the_plain_way_and_fail_with_its_reason(name):
    array, reason = HOSTILE[name]
    raw = spliced(array)
    try:
        slow = outcome(bson.decode(raw, codec_options=OPTS), N)
    except bson.errors.InvalidBSON:  # not BSON at all: the server never returns it; nor is it read any other way
        with pytest.raises(bson.errors.InvalidBSON):
            decode_with_doubles(raw, "vector", N, OPTS)
        return
    assert outcome(decode_with_doubles(raw, "vector", N, OPTS), N) == slow
    if reason is None:
        assert slow[0] == "<f4"
    else:
        assert slow[0] in ("UnreadableProfile", "VectorSpaceMismatch") and reason in slow[1]


def test_only_the_top_level_vector_is_taken_and_unwalkable_documents_are_decoded_whole():
    good = double_array(np.full(N, 0.25, np.float32))
    decoy = raw_document({**fields(None, N), "vector": "not a vector", "other": {"vector": GOOD}}).raw
    assert split_array(decoy, "vector") is None
    assert fast_and_plain(decoy, N)[0] == fast_and_plain(decoy, N)[1] == (
        "UnreadableProfile", "its vector is an unreadable vector (a str, not an array)")
    with_regex = raw_document({"note": Regex("^a"), **fields(good, N)}).raw
    assert split_array(with_regex, "vector") is None  # a type the walk does not size: the plain decoder reads it
    fast, slow = fast_and_plain(with_regex, N)
    assert fast == slow and fast[0] == "<f4"
