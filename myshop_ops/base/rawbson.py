"""The shop layout's ``vector`` (an array of doubles) as BSON bytes, built and read with numpy instead of a list of
Python floats (docs/PERFORMANCE.md): the bytes are exactly what ``bson.encode`` makes of the list, and a read
gives exactly the doubles ``bson.decode`` would.

A BSON array of n doubles is a fixed template for a given n: int32 size, then per element the type byte 0x01, the
index as a decimal C string and 8 little-endian bytes, then 0x00. Writing fills the 8-byte slots of a copy of the
template; reading checks every other byte against the template and gathers the slots. Anything else stored there
(integers as the PHP driver may write them, strings, nested arrays, another length, odd keys) is not that template:
the read says so (None) and the caller decodes the value the plain way.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import bson
import numpy as np
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

_INT32 = struct.Struct("<i")
_MAX_DIMENSIONS = 1 << 16  # templates are built for a configured dimension count: never for a stored length


@dataclass(frozen=True, slots=True)
class DoubleArray:
    """A vector already encoded as a BSON array of doubles (``bson``: the array's bytes, size to trailing 0x00).
    Only ``raw_document`` writes it: ``bson.encode`` refuses it, so it cannot be stored as anything else."""

    bson: bytes


@dataclass(frozen=True, slots=True)
class _Template:
    blank: bytes  # the array with every double 0.0
    # the elements by number of digits of their index: each run of equal-sized elements as (first index, end,
    # byte offset of its first double, element size), so a run's doubles are one strided view of the bytes
    runs: tuple[tuple[int, int, int, int], ...]


@lru_cache(maxsize=8)
def _template(n: int) -> _Template:
    body, runs = bytearray(), []
    for i in range(n):
        head = b"\x01" + str(i).encode() + b"\x00"
        if not runs or runs[-1][3] != len(head) + 8:  # the first index with one more digit
            runs.append([i, i, 4 + len(body) + len(head), len(head) + 8])
        runs[-1][1] = i + 1
        body += head + bytes(8)
    blank = _INT32.pack(4 + len(body) + 1) + bytes(body) + b"\x00"
    return _Template(blank, tuple((first, end, at, size) for first, end, at, size in runs))


def double_array(vec: np.ndarray) -> DoubleArray:
    """``vec`` as a BSON array of doubles: byte for byte ``bson.encode`` of ``vec.astype(float64).tolist()``."""
    values = np.asarray(vec, dtype="<f8").ravel()
    t = _template(len(values))
    buf = bytearray(t.blank)
    for first, end, at, size in t.runs:  # a strided copy of the doubles into their slots, one per key length
        np.ndarray((end - first,), "<f8", buf, at, (size,))[:] = values[first:end]
    return DoubleArray(bytes(buf))


def read_double_array(data: bytes, n: int) -> np.ndarray | None:
    """The float64 values of ``data`` (a BSON array's bytes) when it is exactly an array of ``n`` doubles keyed
    "0".."n-1" (bit-exact: NaN and infinities included, the caller judges them); None for anything else."""
    if not 0 < n <= _MAX_DIMENSIONS:
        return None
    t = _template(n)
    if len(data) != len(t.blank):
        return None
    frame = bytearray(data)
    values = np.empty(n, dtype="<u8")  # the doubles' bits, moved as integers: bit-exact whatever they hold
    for first, end, at, size in t.runs:
        run = np.ndarray((end - first,), "<u8", frame, at, (size,))
        values[first:end] = run
        run[:] = 0
    if frame != t.blank:  # a type byte, a key, the size or the terminator differs
        return None
    return values.view("<f8")


def raw_document(doc: Mapping[str, Any]) -> RawBSONDocument:
    """``doc`` as BSON, its DoubleArray values spliced in as arrays: the bytes ``bson.encode`` makes of ``doc`` with
    each DoubleArray replaced by its list of floats. pymongo sends a RawBSONDocument as it is."""
    parts: list[bytes] = [b""]  # the size, once the parts are known
    run: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, DoubleArray):
            if run:
                parts.append(bson.encode(run)[4:-1])
                run = {}
            parts += (b"\x04", key.encode(), b"\x00", value.bson)
        else:
            run[key] = value
    if run:
        parts.append(bson.encode(run)[4:-1])
    parts.append(b"\x00")
    parts[0] = _INT32.pack(4 + sum(map(len, parts)))
    return RawBSONDocument(b"".join(parts))


# Size of a top-level value after its key, by BSON type: fixed, or read from an int32 at the value (+ extra bytes).
_FIXED = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16, 0x7F: 0,
          0xFF: 0}
_SIZED = {0x02: 4, 0x03: 0, 0x04: 0, 0x05: 5, 0x0C: 16, 0x0D: 4, 0x0E: 4, 0x0F: 0}


def _value_end(data: bytes, kind: int, at: int) -> int | None:
    """Where a value of BSON type ``kind`` starting at ``at`` ends; None for a type this does not walk (regex)."""
    if kind in _FIXED:
        return at + _FIXED[kind]
    if kind in _SIZED and at + 4 <= len(data):
        size = _INT32.unpack_from(data, at)[0]
        return at + size + _SIZED[kind] if size >= 0 else None
    return None


def split_array(raw: bytes, name: str) -> tuple[bytes, bytes] | None:
    """(the document without its top-level field ``name``, that field's array bytes) when ``name`` is an array;
    None when it is missing or something else, or the document is not one this walks (the caller then decodes
    all of it)."""
    key = name.encode()
    at, end = 4, len(raw) - 1
    while at < end:
        kind = raw[at]
        key_end = raw.find(b"\x00", at + 1, end)
        if key_end < 0:
            return None
        value_end = _value_end(raw, kind, key_end + 1)
        if value_end is None or not key_end < value_end <= end:
            return None
        if kind == 0x04 and raw[at + 1:key_end] == key:
            rest = raw[4:at] + raw[value_end:end]
            return _INT32.pack(len(rest) + 5) + rest + b"\x00", raw[key_end + 1:value_end]
        at = value_end
    return None


def decode_with_doubles(raw: bytes, name: str, n: int, codec_options: CodecOptions) -> dict[str, Any]:
    """``bson.decode(raw)``, except that a top-level field ``name`` that is exactly an array of ``n`` doubles comes
    as its float64 ndarray (read in place, bit-exact) instead of a list of floats; any other value of ``name`` is
    decoded as everything else is."""
    parts = split_array(raw, name)
    values = None if parts is None else read_double_array(parts[1], n)
    if values is None:
        return bson.decode(raw, codec_options=codec_options)
    doc = bson.decode(parts[0], codec_options=codec_options)
    doc[name] = values
    return doc
