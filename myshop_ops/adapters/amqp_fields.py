"""AMQP header values as any publisher may send them: decoded without raising, re-published only when encodable.

pika decodes a timestamp header (``T``) with ``datetime.fromtimestamp``: a value past the platform's range raised
``OverflowError`` inside the connection and closed it, so one message crash-looped every consumer of its queue and
broke every tool that walks it. Importing this module makes that decoding total (out of range: the raw number of
seconds, an ``int``), once per process.
"""

from __future__ import annotations

import struct

import pika.data
import pika.exceptions

_WIDTH = {b"T": 8, b"f": 4, b"d": 8}  # kinds whose decoding can raise on a hostile value, and their sizes


def _decode_value(encoded: bytes, offset: int, _decode=pika.data.decode_value):
    kind = encoded[offset:offset + 1]
    try:
        return _decode(encoded, offset)
    except (OverflowError, ValueError, OSError):
        if kind not in _WIDTH:
            raise
    fmt = {b"T": ">Q", b"f": ">f", b"d": ">d"}[kind]
    (raw,) = struct.unpack_from(fmt, encoded, offset + 1)
    return (raw if kind == b"T" else None), offset + 1 + _WIDTH[kind]


if getattr(pika.data.decode_value, "__module__", "") != __name__:
    pika.data.decode_value = _decode_value


def encodable(headers: dict) -> tuple[dict, list[str]]:
    """The headers pika can publish again, and the names of those it cannot (value out of range, not a string
    key, a name over 255 bytes)."""
    kept, dropped = {}, []
    for key, value in headers.items():
        try:
            if not isinstance(key, str):
                raise TypeError("not a string key")
            pika.data.encode_table([], {key: value})
        except (struct.error, TypeError, ValueError, OverflowError, pika.exceptions.AMQPError):
            dropped.append(key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key))
            continue
        kept[key] = value
    return kept, dropped
