"""The event message contract v1 (SPEC section 2): parse, validate, serialise, message ids.

:func:`parse` is the consumer side. It accepts the snake_case keys and the PHP app's camelCase
aliases, checks every rule and raises :class:`InvalidMessage` listing every broken rule, one line
each; it never raises anything else, whatever the body. :func:`make_event` is the producer side
and :func:`serialise` writes the canonical snake_case body, so ``parse(serialise(e)) == e``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

EVENT_TYPES: tuple[str, ...] = ("search", "product_view", "product_click", "product_purchase")
DEFAULT_WEIGHTS: dict[str, float] = {
    "product_purchase": 1.0,
    "search": 0.7,
    "product_click": 0.5,
    "product_view": 0.3,
}
MAX_BODY_BYTES = 64 * 1024
MAX_METADATA_BYTES = 4 * 1024
FUTURE_TOLERANCE = timedelta(minutes=5)
CONTRACT_VERSION = "1.0"

MAX_ID_CHARS = 128
MAX_PHRASE_CHARS = 255

_HEX64 = re.compile(r"[0-9a-f]{64}")
_VERSION_1X = re.compile(r"1\.[0-9]+")
_MISSING: Any = object()  # key absent
_CONFLICT: Any = object()  # snake and camel keys disagree (already reported)
_COMPACT = (",", ":")
_TYPES_TEXT = " / ".join(EVENT_TYPES)


class InvalidMessage(ValueError):
    """Unrecoverable: the body breaks the contract. ``errors`` holds one line per broken rule."""

    errors: list[str]

    def __init__(self, errors: Iterable[str] | str) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "; ".join(self.errors)


@dataclass(frozen=True, slots=True)
class Event:
    """A valid v1 event. ``occurred_at`` is aware UTC; ``search_phrase`` is trimmed."""

    user_id: str
    event_type: str
    search_phrase: str | None
    product_id: str | None
    occurred_at: datetime
    message_id: str
    metadata: dict | None = field(default=None, hash=False)
    version: str = CONTRACT_VERSION

    @property
    def key(self) -> str:
        """The duplicate-detection key: the message id scoped to its user.

        Producers' ids are not unique across users (the shop hashes the user id with ``%d``, so two users'
        events in the same second can share an id): a duplicate is the same id for the same user."""
        return event_key(self.message_id, self.user_id)

    @property
    def reference(self) -> str:
        """The search phrase for ``search``, the product id otherwise."""
        ref = self.search_phrase if self.event_type == "search" else self.product_id
        return ref or ""


def event_key(message_id: str, user_id: str) -> str:
    """``Event.key`` of a message id and a user id (the id is fixed-length hex, so the key is unambiguous)."""
    return f"{message_id}:{user_id}"


def _utc_text(when: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffff+00:00`` of an aware datetime."""
    if when.utcoffset() is None:
        raise InvalidMessage("occurred_at: naive time, a UTC offset is required")
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def message_id(user_id: str, event_type: str, reference: str, occurred_at: datetime) -> str:
    """sha256 hex of ``user_id|event_type|reference|occurred_at`` (UTC, microseconds, ``+00:00``).

    The user id is hashed as its string form (the PHP reference hashed an int, a known defect).
    """
    key = f"{user_id}|{event_type}|{reference}|{_utc_text(occurred_at)}"
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


# ----------------------------------------------------------------------------- validation helpers


def json_kind(value: Any) -> str:
    """The JSON kind of a value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ids and phrases reach terminals (failed show, verify, logs): C0, DEL, C1 (the 8-bit CSI \x9b), line separators and
# bidirectional overrides are refused here (a phrase may hold tabs and newlines: shown escaped)
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _short(text: str) -> str:
    """A bounded repr of a string for error messages."""
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "..."


def _unicode_ok(text: str) -> bool:
    """False when the string holds a lone surrogate (possible via JSON ``\\ud800`` escapes)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def loose_field(doc: object, snake: str, camel: str) -> Any:
    """What a body not (yet) parsed holds under a field, for a look without validation (the batching window's
    user, a failed message's record): the snake_case key's value when that key is present (even null), else its
    camelCase alias's; None when neither is, or ``doc`` is no JSON object. :func:`parse` decides what is valid."""
    return doc.get(snake, doc.get(camel)) if isinstance(doc, dict) else None


def _get(data: dict[str, Any], snake: str, camel: str, errors: list[str]) -> Any:
    """The value under the snake_case key or its camelCase alias; conflicting values are an error (the strict
    reading :func:`parse` makes; :func:`loose_field` is the lenient one)."""
    value = data.get(snake, _MISSING)
    alias = data.get(camel, _MISSING)
    if alias is _MISSING:
        return value
    if value is _MISSING or (type(value) is type(alias) and value == alias):
        return alias
    errors.append(f"{snake}: {snake} and {camel} are both given with different values")
    return _CONFLICT


def _ident(name: str, value: Any, errors: list[str]) -> str | None:
    """A string id of 1..128 characters; a (non-bool) integer becomes its decimal string."""
    if value is _CONFLICT:
        return None
    if value is _MISSING or value is None:
        errors.append(f"{name}: required, a string of 1..{MAX_ID_CHARS} characters or an integer")
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            value = str(value)
        except ValueError:  # beyond sys.get_int_max_str_digits(): far too long anyway
            errors.append(f"{name}: must be a string of 1..{MAX_ID_CHARS} characters (integer too large)")
            return None
    if not isinstance(value, str):
        kind = json_kind(value)
        errors.append(f"{name}: must be a string of 1..{MAX_ID_CHARS} characters or an integer (got {kind})")
        return None
    if not 1 <= len(value) <= MAX_ID_CHARS:
        errors.append(f"{name}: must be a string of 1..{MAX_ID_CHARS} characters (got {len(value)})")
        return None
    if not _unicode_ok(value):
        errors.append(f"{name}: not valid Unicode (lone surrogate)")
        return None
    if (bad := CONTROL.search(value)) is not None:
        errors.append(f"{name}: must not contain control characters (U+{ord(bad.group()):04X} at {bad.start()})")
        return None
    return value


def _phrase(value: Any, errors: list[str]) -> str | None:
    """A search phrase: 1..255 characters after trimming."""
    if not isinstance(value, str):
        errors.append(f"search_phrase: must be a string of 1..{MAX_PHRASE_CHARS} characters (got {json_kind(value)})")
        return None
    value = value.strip()
    if not 1 <= len(value) <= MAX_PHRASE_CHARS:
        errors.append(f"search_phrase: must be 1..{MAX_PHRASE_CHARS} characters after trimming (got {len(value)})")
        return None
    if not _unicode_ok(value):
        errors.append("search_phrase: not valid Unicode (lone surrogate)")
        return None
    if (bad := CONTROL.search(value.replace("\t", " ").replace("\n", " ").replace("\r", " "))) is not None:
        errors.append(f"search_phrase: must not contain control characters (U+{ord(bad.group()):04X} at {bad.start()})")
        return None
    return value


def _occurred_at(value: Any, now: datetime | None, errors: list[str]) -> datetime | None:
    """An ISO-8601 time with a UTC offset, at most 5 minutes after ``now``, converted to UTC."""
    if value is _CONFLICT:
        return None
    if value is _MISSING or value is None:
        errors.append("occurred_at: required, an ISO-8601 time with a UTC offset")
        return None
    if not isinstance(value, str):
        errors.append(f"occurred_at: must be an ISO-8601 string with a UTC offset (got {json_kind(value)})")
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        errors.append(f"occurred_at: not an ISO-8601 time (got {_short(value)})")
        return None
    if when.utcoffset() is None:
        errors.append("occurred_at: naive time, a UTC offset is required")
        return None
    try:
        when = when.astimezone(UTC)
    except OverflowError:
        errors.append(f"occurred_at: out of range once converted to UTC (got {_short(value)})")
        return None
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    if when - now > FUTURE_TOLERANCE:
        errors.append(f"occurred_at: more than 5 minutes in the future (got {when.isoformat()})")
        return None
    return when


def _metadata(value: Any, errors: list[str]) -> dict | None:
    """An optional JSON object of at most 4 KiB once compactly serialised. ``[]`` is an empty object: PHP's
    json_encode writes an empty array (the shop's ``array $metadata = []``) that way."""
    if value is _MISSING or value is None:
        return None
    if isinstance(value, list) and not value:
        return {}
    if not isinstance(value, dict):
        errors.append(f"metadata: must be a JSON object or null (got {json_kind(value)})")
        return None
    try:
        text = json.dumps(value, separators=_COMPACT, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        errors.append("metadata: must hold only JSON values (no NaN/Infinity, string keys)")
        return None
    if len(text) > MAX_METADATA_BYTES:
        errors.append(f"metadata: at most {MAX_METADATA_BYTES} bytes serialised (got {len(text)})")
        return None
    # \uXXXX escapes of surrogates only appear for non-BMP characters or lone surrogates.
    if "\\ud" in text and not _unicode_ok(json.dumps(value, ensure_ascii=False)):
        errors.append("metadata: not valid Unicode (lone surrogate)")
        return None
    return value


def _shown(value: Any) -> str:
    """A wrong value for an error message: a string bounded and quoted, anything else its JSON kind."""
    return _short(value) if isinstance(value, str) else json_kind(value)


def _event_type(value: Any, errors: list[str]) -> str | None:
    """One of EVENT_TYPES."""
    if value is _CONFLICT:
        return None
    if value is _MISSING or value is None:
        errors.append(f"event_type: required, one of {_TYPES_TEXT}")
        return None
    if isinstance(value, str) and value in EVENT_TYPES:
        return value
    errors.append(f"event_type: must be one of {_TYPES_TEXT} (got {_shown(value)})")
    return None


def _search_phrase(value: Any, event_type: str | None, errors: list[str]) -> str | None:
    """The search phrase: required for ``search``, null or absent for the other types."""
    if value is _CONFLICT:
        return None
    if value is _MISSING or value is None:
        if event_type == "search":
            errors.append(f"search_phrase: required for search, 1..{MAX_PHRASE_CHARS} characters")
        return None
    if event_type is not None and event_type != "search":
        errors.append(f"search_phrase: must be null or absent for {event_type}")
        return None
    return _phrase(value, errors)


def _product_id(value: Any, event_type: str | None, errors: list[str]) -> str | None:
    """The product id: required for the product types, null or absent for ``search``."""
    if value is _CONFLICT:
        return None
    if value is _MISSING or value is None:
        if event_type is not None and event_type != "search":
            _ident("product_id", None, errors)  # reports "required"
        return None
    if event_type == "search":
        errors.append("product_id: must be null or absent for search")
        return None
    return _ident("product_id", value, errors)


def _message_id(value: Any, errors: list[str]) -> str | None:
    """64 lowercase hex characters."""
    if value is _CONFLICT:
        return None
    if value is _MISSING or value is None:
        errors.append("message_id: required, 64 lowercase hex characters")
        return None
    if isinstance(value, str) and _HEX64.fullmatch(value):
        return value
    got = f"{len(value)} characters" if isinstance(value, str) else json_kind(value)
    errors.append(f"message_id: must be 64 lowercase hex characters (got {got})")
    return None


def _version(value: Any, errors: list[str]) -> str | None:
    """``1.x``; absent or null is CONTRACT_VERSION."""
    if value is None:
        return CONTRACT_VERSION
    if isinstance(value, str) and _VERSION_1X.fullmatch(value):
        return value
    errors.append(f'version: must be "1.x" such as "1.0" (got {_shown(value)})')
    return None


def _validate(data: dict[str, Any], now: datetime | None, errors: list[str], *, with_id: bool = True) -> Any:
    """Check every field rule, appending to ``errors``; returns the field values (meaningful if no errors)."""
    user_id = _ident("user_id", _get(data, "user_id", "userId", errors), errors)
    event_type = _event_type(_get(data, "event_type", "eventType", errors), errors)
    phrase = _search_phrase(_get(data, "search_phrase", "searchPhrase", errors), event_type, errors)
    product_id = _product_id(_get(data, "product_id", "productId", errors), event_type, errors)
    occurred_at = _occurred_at(_get(data, "occurred_at", "occurredAt", errors), now, errors)
    metadata = _metadata(data.get("metadata"), errors)
    mid = _message_id(_get(data, "message_id", "messageId", errors), errors) if with_id else None
    version = _version(data.get("version"), errors)
    return user_id, event_type, phrase, product_id, occurred_at, mid, metadata, version


# ------------------------------------------------------------------------------------- public API


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)  # made once: json.loads(..., hook) builds one per call


def _str_text(body: str) -> str:
    """A str body checked: at most MAX_BODY_BYTES once UTF-8 encoded, no lone surrogate."""
    if len(body) > MAX_BODY_BYTES:  # every character is at least one byte
        raise InvalidMessage(f"body: larger than {MAX_BODY_BYTES} bytes")
    if not body.isascii():
        try:
            size = len(body.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidMessage("body: not valid UTF-8 (lone surrogate)") from None
        if size > MAX_BODY_BYTES:
            raise InvalidMessage(f"body: larger than {MAX_BODY_BYTES} bytes (got {size})")
    return body


def _bytes_text(body: Any) -> str:
    """The text of a bytes-like body of at most MAX_BODY_BYTES bytes, strictly UTF-8 decoded."""
    if isinstance(body, bytearray | memoryview):
        body = bytes(body)
    elif not isinstance(body, bytes):
        raise InvalidMessage(f"body: must be bytes or str (got {type(body).__name__})")
    if len(body) > MAX_BODY_BYTES:
        raise InvalidMessage(f"body: larger than {MAX_BODY_BYTES} bytes (got {len(body)})")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"body: not valid UTF-8 (at byte {exc.start})") from None


def _decode(body: Any) -> dict[str, Any]:
    """Size check, strict UTF-8 and JSON decoding of a body into its top-level object."""
    text = _str_text(body) if isinstance(body, str) else _bytes_text(body)
    try:
        data = _JSON.decode(text)
    except RecursionError:
        raise InvalidMessage("body: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers past the digit limit
        reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise InvalidMessage(f"body: not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise InvalidMessage(f"body: must be a JSON object (got {json_kind(data)})")
    return data


def parse(body: bytes | str, *, now: datetime | None = None) -> Event:
    """Validate a v1 body (``now`` bounds future times; default: the current time).

    Raises :class:`InvalidMessage` with every broken rule, and nothing else, for any input.
    """
    data = _decode(body)
    errors: list[str] = []
    try:
        fields = _validate(data, now, errors)
    except RecursionError:  # comparing or re-serialising pathological nesting
        raise InvalidMessage("body: JSON nested too deeply") from None
    if errors:
        raise InvalidMessage(errors)
    user_id, event_type, phrase, product_id, occurred_at, mid, metadata, version = fields
    return Event(user_id, event_type, phrase, product_id, occurred_at, mid, metadata, version)


def make_event(
    user_id: str | int,
    event_type: str,
    reference: str | int,
    occurred_at: datetime | None = None,
    metadata: dict | None = None,
) -> Event:
    """Build a valid event (``occurred_at`` defaults to now, UTC) with its message id.

    Applies the same rules as :func:`parse`; raises :class:`InvalidMessage` on bad input.
    """
    when: Any = datetime.now(UTC) if occurred_at is None else occurred_at
    data: dict[str, Any] = {
        "user_id": user_id,
        "event_type": event_type,
        "occurred_at": when.isoformat() if isinstance(when, datetime) else when,
        "metadata": metadata,
    }
    if event_type == "search":
        data["search_phrase"] = reference
    elif isinstance(event_type, str) and event_type in EVENT_TYPES:
        data["product_id"] = reference
    errors: list[str] = []
    uid, etype, phrase, product_id, when, _, meta, _ = _validate(data, None, errors, with_id=False)
    if errors:
        raise InvalidMessage(errors)
    if meta is not None:  # canonical JSON form: tuples -> lists, non-string keys -> strings
        meta = json.loads(json.dumps(meta, separators=_COMPACT))
    ref = phrase if etype == "search" else product_id
    mid = message_id(uid, etype, ref, when)
    return Event(uid, etype, phrase, product_id, when, mid, meta, CONTRACT_VERSION)


def serialise(event: Event) -> bytes:
    """The canonical compact snake_case UTF-8 JSON body of an event (times in UTC, microseconds)."""
    body = {
        "message_id": event.message_id,
        "version": event.version,
        "user_id": event.user_id,
        "event_type": event.event_type,
        "search_phrase": event.search_phrase,
        "product_id": event.product_id,
        "occurred_at": _utc_text(event.occurred_at),
        "metadata": event.metadata,
    }
    return json.dumps(body, separators=_COMPACT, ensure_ascii=False).encode("utf-8")
