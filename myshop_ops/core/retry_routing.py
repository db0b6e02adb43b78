"""Retry routing: where a message goes when it cannot be applied now, a delay queue or `failed` with its story."""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from myshop_ops.adapters.amqp_fields import encodable
from myshop_ops.adapters.broker import H_PUBLISHED_AT, Topology, publish_time
from myshop_ops.adapters.config import redact
from myshop_ops.base.contract import loose_field

H_RETRY_COUNT = "x-retry-count"
H_FIRST_FAILURE = "x-first-failure-at"
H_LAST_FAILURE = "x-last-failure-at"
H_ERROR_CLASS = "x-error-class"
H_ERROR_MESSAGE = "x-error-message"
H_WORKER_HOST = "x-worker-host"
H_ORIGINAL_QUEUE = "x-original-queue"
H_HISTORY = "x-error-history"  # JSON list of {at, error_class, error_message}, the last 10 failures
H_FAILURE_ID = "x-failure-id"  # a new random id on every failed copy: its failed_messages record's key
H_IGNORED = "x-ignored-headers"  # what a delivery's headers held that was malformed and ignored (JSON list of text)
H_ORIGINAL_SIZE = "x-original-size"  # a failed copy of a body over the contract's limit: its size (the copy: a prefix)
MAX_ERROR_CHARS = 1000
MAX_RETRY_COUNT = 10  # WORKER_MAX_RETRIES' upper bound: a larger count was not written by a worker
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)  # a failure time before this, or after now, is not one of ours


@dataclass(frozen=True, slots=True)
class Copy:
    """A message to publish (and confirm) before the original delivery is acked."""

    exchange: str
    routing_key: str
    headers: dict
    failed: bool  # True: to the failed queue (and a failed_messages record)
    error_class: str
    error_message: str
    retry_count: int
    ignored: tuple[str, ...] = ()  # malformed headers of the delivery, ignored (see read_headers)


def retry_count(headers: dict | None) -> int | None:
    """The x-retry-count header: 0 when absent, None when it is no count a worker wrote (not an integer, a
    boolean, negative, over MAX_RETRY_COUNT)."""
    value = (headers or {}).get(H_RETRY_COUNT, 0)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and len(value) <= 2 and value.isdigit() and value.isascii():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_RETRY_COUNT:
        return value
    return None


def failure_time(value: object, now: datetime | None = None) -> datetime | None:
    """An x-first-failure-at / x-last-failure-at header as a time, or None unless it is an ISO-8601 string with
    a UTC offset between 2000 and now (plus a minute of clock skew)."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    if at.tzinfo is None or at.utcoffset() is None:
        return None
    return at if EARLIEST <= at <= (now or datetime.now(UTC)) + timedelta(minutes=1) else None


def read_headers(headers: dict | None, now: datetime | None = None) -> tuple[dict, list[str]]:
    """A delivery's headers as a worker may trust and publish them again, and what was ignored (one text each:
    the header's name and why). Our failure headers are checked for type, range and format; every other header
    is kept only when pika can encode it again. Never raises."""
    kept, dropped = encodable(dict(headers or {}))
    ignored = [f"{name}: not encodable" for name in dropped]
    if H_RETRY_COUNT in kept and retry_count(kept) is None:
        ignored.append(f"{H_RETRY_COUNT}: not a count 0..{MAX_RETRY_COUNT} ({_brief(kept.pop(H_RETRY_COUNT))})")
    if H_PUBLISHED_AT in kept and publish_time(kept[H_PUBLISHED_AT]) is None:
        ignored.append(f"{H_PUBLISHED_AT}: not epoch milliseconds, 2000..now ({_brief(kept.pop(H_PUBLISHED_AT))})")
    for name in (H_FIRST_FAILURE, H_LAST_FAILURE):
        if name in kept and failure_time(kept[name], now) is None:
            ignored.append(f"{name}: not an ISO-8601 time with offset, 2000..now ({_brief(kept.pop(name))})")
    if H_HISTORY in kept:
        history = _history(kept)
        raw = _loads(kept[H_HISTORY])
        if not isinstance(raw, list) or len(history) != min(len(raw), 10):
            ignored.append(f"{H_HISTORY}: malformed entries dropped")
        kept[H_HISTORY] = json.dumps(history)
    return kept, ignored


def _brief(value: object) -> str:
    return repr(value)[:40]


def route(
    topo: Topology, headers: dict | None, error: Exception, *, transient: bool, now: datetime | None = None,
    noted: Sequence[str] = (),
) -> Copy:
    """The copy of a message that failed with ``error``: next delay queue, or `failed` when unrecoverable
    or out of retries. Malformed headers are ignored (never trusted, never steering the route) and named in
    x-ignored-headers, after ``noted`` (what was unusable in the delivery's properties already)."""
    now = now or datetime.now(UTC)
    headers, ignored = read_headers(headers, now)
    ignored = [*noted, *ignored]
    headers.pop(H_FAILURE_ID, None)  # only a failed copy has one, its own
    count = retry_count(headers) or 0
    if ignored:
        headers[H_IGNORED] = json.dumps(ignored)[:MAX_ERROR_CHARS]
    stamp = now.isoformat()
    headers.setdefault(H_FIRST_FAILURE, stamp)
    headers[H_LAST_FAILURE] = stamp
    error_class = type(error).__name__
    message = redact(str(error))[:MAX_ERROR_CHARS]  # a provider's or database's words may quote a secret
    headers[H_ERROR_CLASS] = error_class
    headers[H_ERROR_MESSAGE] = message
    headers[H_WORKER_HOST] = socket.gethostname()
    headers[H_ORIGINAL_QUEUE] = topo.queue
    history = _history(headers)
    history.append({"at": stamp, "error_class": error_class, "error_message": message[:300]})
    headers[H_HISTORY] = json.dumps(history[-10:])
    if transient and count < len(topo.retry_delays_ms):
        headers[H_RETRY_COUNT] = count + 1
        return Copy("", topo.retry_queue(count + 1), headers, False, error_class, message, count + 1, tuple(ignored))
    if transient:
        message = f"gave up after {count} retries: {message}"[:MAX_ERROR_CHARS]
        headers[H_ERROR_MESSAGE] = message
    headers[H_RETRY_COUNT] = count
    headers[H_FAILURE_ID] = uuid.uuid4().hex
    return Copy(topo.failed_exchange, topo.failed_queue, headers, True, error_class, message, count, tuple(ignored))


def message_id_of(body: bytes, message_id: str | None) -> str:
    """A failed message's id: its AMQP message_id, or a hash of the body when it has none."""
    return message_id or "body-sha256:" + hashlib.sha256(body).hexdigest()


def failure_id_of(headers: dict | None) -> str | None:
    """The x-failure-id of a message in the failed queue (32 hex), None for one without (dead-lettered by RabbitMQ,
    or failed before failure ids existed: its record is found by message_id)."""
    value = (headers or {}).get(H_FAILURE_ID)
    return value if isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value) \
        else None


def failure_record(copy: Copy, body: bytes, message_id: str | None, now: datetime | None = None,
                   original_size: int | None = None) -> dict:
    """The failed_messages document of a failed copy, keyed by its failure id (two failed copies of one message id
    are two records); message_id is the AMQP id, or a body hash when it has none; ``original_size``: the size of
    a body over the contract's limit, of which ``body`` is a prefix."""
    extra = {} if original_size is None else {"original_size": original_size}
    return failure_record_fields(
        **extra,
        failure_id=copy.headers[H_FAILURE_ID],
        message_id=message_id_of(body, message_id),
        body=body,
        headers=copy.headers,
        error_class=copy.error_class,
        error_message=copy.error_message,
        retry_count=copy.retry_count,
        first_failure_at=failure_time(copy.headers[H_FIRST_FAILURE]) or now or datetime.now(UTC),
        last_failure_at=now or datetime.now(UTC),
        worker_host=copy.headers[H_WORKER_HOST],
        original_queue=copy.headers[H_ORIGINAL_QUEUE],
    )


def failure_record_fields(*, body: bytes, headers: dict, **fields) -> dict:
    """A failed_messages document: the given fields plus the body as text, its user and event type
    when readable, and the headers made BSON-safe."""
    text = body.decode("utf-8", errors="replace")
    doc = _loads(text)
    event_type = loose_field(doc, "event_type", "eventType")
    history = _history(headers)
    return _bson_safe({
        **fields,
        "history": history or [{"at": fields["last_failure_at"].isoformat(), "error_class": fields["error_class"],
                                "error_message": fields["error_message"]}],
        "user_id": _user_of(doc),
        "event_type": None if event_type is None else str(event_type)[:64],
        "body": text,
        "headers": {_field_name(k): (v if isinstance(v, str | int | float | bool) else str(v))
                    for k, v in headers.items()},
    })


def _field_name(key: object) -> str:
    """A header name as a MongoDB field name: NUL (never allowed), a leading `$` and `.` (operators and paths to
    MongoDB) written as escapes, so any header a publisher chose is stored, shown and never interpreted."""
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    text = text.replace("\\", "\\\\").replace("\x00", "\\x00").replace(".", "\\u002e")
    return "\\u0024" + text[1:] if text.startswith("$") else text


def body_user(body: bytes) -> str | None:
    """The user id a failed message's record holds for its body (None when the body names none)."""
    return _user_of(_loads(body.decode("utf-8", errors="replace")))


def _user_of(doc: object) -> str | None:
    user_id = loose_field(doc, "user_id", "userId")
    return None if user_id is None else _bson_safe(str(user_id)[:128])


def _loads(text: object) -> object:
    """JSON of a body or header, or None for anything unreadable (invalid, too deeply nested, not text)."""
    try:
        return json.loads(text) if isinstance(text, str | bytes) else None
    except (ValueError, RecursionError):
        return None


def _history(headers: dict) -> list[dict]:
    """The x-error-history header as a list of well-formed entries ({at, error_class, error_message}, all text):
    empty when missing or malformed, malformed entries dropped, at most the last 10."""
    history = _loads(headers.get(H_HISTORY) or "[]")
    if not isinstance(history, list):
        return []
    keys = ("at", "error_class", "error_message")
    return [{k: h[k][:MAX_ERROR_CHARS] for k in keys} for h in history[-10:]
            if isinstance(h, dict) and all(isinstance(h.get(k), str) for k in keys)]


def _bson_safe(value: object) -> object:
    """Strings BSON can store: lone surrogates (valid in JSON escapes, not in UTF-8) become "?"."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8") if not value.isascii() else value
    if isinstance(value, dict):
        return {_bson_safe(k): _bson_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bson_safe(v) for v in value]
    return value
