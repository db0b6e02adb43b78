"""Where a message goes when it cannot be applied now: a delay queue, or `failed` with its story in headers."""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass
from datetime import UTC, datetime

from myshop_ops.broker import Topology

H_RETRY_COUNT = "x-retry-count"
H_FIRST_FAILURE = "x-first-failure-at"
H_LAST_FAILURE = "x-last-failure-at"
H_ERROR_CLASS = "x-error-class"
H_ERROR_MESSAGE = "x-error-message"
H_WORKER_HOST = "x-worker-host"
H_ORIGINAL_QUEUE = "x-original-queue"
H_HISTORY = "x-error-history"  # JSON list of {at, error_class, error_message}, the last 10 failures
MAX_ERROR_CHARS = 1000


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


def retry_count(headers: dict | None) -> int:
    try:
        return int((headers or {}).get(H_RETRY_COUNT, 0))
    except (TypeError, ValueError):
        return 0


def route(
    topo: Topology, headers: dict | None, error: Exception, *, transient: bool, now: datetime | None = None
) -> Copy:
    """The copy of a message that failed with ``error``: next delay queue, or `failed` when unrecoverable
    or out of retries."""
    now = now or datetime.now(UTC)
    headers = dict(headers or {})
    count = retry_count(headers)
    stamp = now.isoformat()
    headers.setdefault(H_FIRST_FAILURE, stamp)
    headers[H_LAST_FAILURE] = stamp
    error_class = type(error).__name__
    message = str(error)[:MAX_ERROR_CHARS]
    headers[H_ERROR_CLASS] = error_class
    headers[H_ERROR_MESSAGE] = message
    headers[H_WORKER_HOST] = socket.gethostname()
    headers[H_ORIGINAL_QUEUE] = topo.queue
    history = _history(headers)
    history.append({"at": stamp, "error_class": error_class, "error_message": message[:300]})
    headers[H_HISTORY] = json.dumps(history[-10:])
    if transient and count < len(topo.retry_delays_ms):
        headers[H_RETRY_COUNT] = count + 1
        return Copy("", topo.retry_queue(count + 1), headers, False, error_class, message, count + 1)
    if transient:
        message = f"gave up after {count} retries: {message}"[:MAX_ERROR_CHARS]
        headers[H_ERROR_MESSAGE] = message
    headers[H_RETRY_COUNT] = count
    return Copy(topo.failed_exchange, topo.failed_queue, headers, True, error_class, message, count)


def message_id_of(body: bytes, message_id: str | None) -> str:
    """A failed message's id: its AMQP message_id, or a hash of the body when it has none."""
    return message_id or "body-sha256:" + hashlib.sha256(body).hexdigest()


def failure_record(copy: Copy, body: bytes, message_id: str | None, now: datetime | None = None) -> dict:
    """The failed_messages document of a failed copy (keyed by message_id, or a body hash when it has none)."""
    return failure_record_fields(
        message_id=message_id_of(body, message_id),
        body=body,
        headers=copy.headers,
        error_class=copy.error_class,
        error_message=copy.error_message,
        retry_count=copy.retry_count,
        first_failure_at=datetime.fromisoformat(copy.headers[H_FIRST_FAILURE]),
        last_failure_at=now or datetime.now(UTC),
        worker_host=copy.headers[H_WORKER_HOST],
        original_queue=copy.headers[H_ORIGINAL_QUEUE],
    )


def failure_record_fields(*, body: bytes, headers: dict, **fields) -> dict:
    """A failed_messages document: the given fields plus the body as text, its user and event type
    when readable, and the headers made BSON-safe."""
    text = body.decode("utf-8", errors="replace")
    user_id = event_type = None
    doc = _loads(text)
    if isinstance(doc, dict):
        user_id = doc.get("user_id", doc.get("userId"))
        event_type = doc.get("event_type", doc.get("eventType"))
    history = _history(headers)
    return _bson_safe({
        **fields,
        "history": history or [{"at": fields["last_failure_at"].isoformat(), "error_class": fields["error_class"],
                                "error_message": fields["error_message"]}],
        "user_id": None if user_id is None else str(user_id)[:128],
        "event_type": None if event_type is None else str(event_type)[:64],
        "body": text,
        "headers": {k: (v if isinstance(v, str | int | float | bool) else str(v)) for k, v in headers.items()},
    })


def _loads(text: object) -> object:
    """JSON of a body or header, or None for anything unreadable (invalid, too deeply nested, not text)."""
    try:
        return json.loads(text) if isinstance(text, str | bytes) else None
    except (ValueError, RecursionError):
        return None


def _history(headers: dict) -> list:
    """The x-error-history header as a list of entries (empty when missing or malformed)."""
    history = _loads(headers.get(H_HISTORY) or "[]")
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


def _bson_safe(value: object) -> object:
    """Strings BSON can store: lone surrogates (valid in JSON escapes, not in UTF-8) become "?"."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8") if not value.isascii() else value
    if isinstance(value, dict):
        return {_bson_safe(k): _bson_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bson_safe(v) for v in value]
    return value
