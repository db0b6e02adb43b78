"""Total parsers for values that come from outside as raw Python objects: AMQP properties and headers (as pika
decodes them, or as any stand-in hands them over) and Redis replies. Each returns a clean value, or nothing and a
reason; none raises.

What a delivery's properties become (``read_properties``), and what is kept:

- ``message_id``: text of 1..255 UTF-8 bytes without control characters or lone surrogates. Anything else (bytes:
  pika's form of a non-UTF-8 id, another type, too long, control characters) is dropped with a reason, and the
  message is known by its body's own id instead. An empty id is absent.
- ``content_type``: the same rules (it is published again on retry and failed copies).
- ``timestamp``: an integer 0..2**64-1 (seconds, as AMQP defines it); anything else is dropped with a reason.
- ``headers``: a dict with text keys of what pika can decode: text, bytes, int, float, bool, None, Decimal (finite),
  datetime, and lists and tables of those, nested at most MAX_DEPTH deep. A header with another key type or a
  value of another type anywhere inside it is dropped whole, with a reason. Header semantics (our x-* headers'
  ranges and formats, re-encodability) are checked later, where they are used (core/retry_routing.py).
- nothing else (priority, expiration, reply_to, correlation_id, ...): the worker does not use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from myshop_ops.base.contract import CONTROL
from myshop_ops.base.printable import printable

MAX_TEXT_BYTES = 255  # an AMQP short string's bound, UTF-8 encoded: what pika can publish again
MAX_DEPTH = 8  # nesting of lists and tables in one header
MAX_COUNT_DIGITS = 18  # a counter Redis's INCR wrote fits int64
TIMESTAMP_MAX = 2**64 - 1

HeaderValue = str | bytes | int | float | bool | Decimal | datetime | list | dict | None
_SCALARS = (str, bytes, int, float, bool, datetime, type(None))


@dataclass(frozen=True, slots=True)
class Properties:
    """A delivery's AMQP properties, parsed once when it arrives; ``ignored`` says what was unusable and why."""

    message_id: str | None = None
    content_type: str | None = None
    timestamp: int | None = None
    headers: dict[str, HeaderValue] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()


def brief(value: object) -> str:
    """A bounded repr of a raw value for a reason (repr escapes control characters)."""
    try:
        text = repr(value)
    except Exception:  # a stand-in's object whose repr fails: its type still says enough
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


def text_value(value: object) -> tuple[str | None, str | None]:
    """An AMQP short-string property as text (None for absent or empty), or None and why it is unusable."""
    if value is None or (isinstance(value, str) and not value):
        return None, None
    if isinstance(value, bytes):
        return None, f"not UTF-8 ({brief(value)})"
    if not isinstance(value, str):
        return None, f"not text ({type(value).__name__})"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return None, f"not valid Unicode ({brief(value)})"
    if size > MAX_TEXT_BYTES:
        return None, f"longer than {MAX_TEXT_BYTES} bytes ({size})"
    if CONTROL.search(value):
        return None, f"holds control characters ({brief(value)})"
    return value, None


def timestamp_value(value: object) -> tuple[int | None, str | None]:
    """The AMQP timestamp property (epoch seconds, 64-bit unsigned), or None and why it is unusable."""
    if value is None:
        return None, None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= TIMESTAMP_MAX:
        return value, None
    return None, f"not epoch seconds ({brief(value)})"


def header_value(value: object, depth: int = 0) -> tuple[HeaderValue, str | None]:
    """A header value of a type pika decodes (lists and tables cleaned inside), or None and why it is not."""
    if depth > MAX_DEPTH:
        return None, f"nested deeper than {MAX_DEPTH}"
    if isinstance(value, _SCALARS):
        return value, None
    if isinstance(value, Decimal):
        return (value, None) if value.is_finite() else (None, f"not a finite decimal ({brief(value)})")
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            clean, why = header_value(item, depth + 1)
            if why:
                return None, why
            items.append(clean)
        return items, None
    if isinstance(value, dict):
        table, why = header_table(value, depth + 1)
        return (None, why) if why else (table, None)
    return None, f"a value of type {type(value).__name__}"


def header_table(raw: dict, depth: int) -> tuple[dict, str | None]:
    """A nested table, all or nothing: the first unusable key or value makes it unusable."""
    table = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            return {}, f"a key that is not text ({brief(key)})"
        clean, why = header_value(value, depth)
        if why:
            return {}, why
        table[key] = clean
    return table, None


def clean_headers(raw: object) -> tuple[dict[str, HeaderValue], list[str]]:
    """A delivery's headers table as a dict of clean values, and one reason per header dropped."""
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        return {}, [f"headers: not a table ({type(raw).__name__})"]
    kept, ignored = {}, []
    for key, value in raw.items():
        if not isinstance(key, str):
            ignored.append(f"{brief(key)}: a header name that is not text")
            continue
        clean, why = header_value(value, 1)
        if why:
            ignored.append(f"{printable(key)[:64]}: {why}")
            continue
        kept[key] = clean
    return kept, ignored


def read_properties(raw: object) -> Properties:
    """A delivery's properties (pika's BasicProperties, or any object with those attributes) as a clean record."""
    ignored = []
    values = {}
    for name in ("message_id", "content_type"):
        values[name], why = text_value(getattr(raw, name, None))
        if why:
            ignored.append(f"{name}: {why}")
    timestamp, why = timestamp_value(getattr(raw, "timestamp", None))
    if why:
        ignored.append(f"timestamp: {why}")
    headers, dropped = clean_headers(getattr(raw, "headers", None))
    return Properties(timestamp=timestamp, headers=headers, ignored=(*ignored, *dropped), **values)


def count_value(raw: object) -> int:
    """A counter read back from Redis (bytes of decimal digits): 0 when absent or anything else."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    if isinstance(text, str) and 0 < len(text) <= MAX_COUNT_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return 0


def epoch_value(raw: object) -> float | None:
    """Epoch seconds read back from Redis (bytes of a float's repr): None when absent or anything else."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    if not isinstance(text, str) or len(text) > 64:
        return None
    try:
        at = float(text)
    except ValueError:
        return None
    return at if math.isfinite(at) else None
