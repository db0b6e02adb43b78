"""A failed_messages document as the failed tools use it: parsed once, as it is read, by one total parser.

Records are written by the workers but readable and writable by anyone with MongoDB access: any field may hold any
BSON type. ``read_record`` returns a clean typed ``FailedRecord``, or an ``UnreadableRecord`` with its key (when it
has one) and why; it never raises. Nothing behind it sees a raw field."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime

from bson.objectid import ObjectId

from myshop_ops.base.layout import to_datetime

_TEXT = ("error_class", "error_message", "worker_host", "original_queue", "body")
_OPTIONAL_TEXT = ("user_id", "event_type")
_HEADER_VALUE = (str, int, float, bool)


class Unreadable(ValueError):
    """Why a stored field cannot be read."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at: str
    error_class: str
    error_message: str


@dataclass(frozen=True, slots=True)
class FailedRecord:
    """A readable record. Fields a record of an older version lacks have their empty value."""

    message_id: str
    failure_id: str | None = None
    user_id: str | None = None
    event_type: str | None = None
    error_class: str = ""
    error_message: str = ""
    worker_host: str = ""
    original_queue: str = ""
    body: str = ""
    retry_count: int = 0
    original_size: int | None = None  # a body over the contract's limit: its size (``body`` is a prefix of it)
    first_failure_at: datetime | None = None
    last_failure_at: datetime | None = None
    headers: dict[str, str | int | float | bool] = field(default_factory=dict)
    history: tuple[HistoryEntry, ...] = ()
    doc_id: ObjectId | None = None  # the document's _id (deletes exactly this document)

    @property
    def key(self) -> str:
        """Its key: the failure id, or the message id for a record without one."""
        return self.failure_id or self.message_id

    def as_json(self) -> dict:
        """The record as JSON values (times in ISO 8601), without its document's _id."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "doc_id"}
        out.update(first_failure_at=_iso(self.first_failure_at), last_failure_at=_iso(self.last_failure_at),
                   history=[{"at": h.at, "error_class": h.error_class, "error_message": h.error_message}
                            for h in self.history])
        return out


@dataclass(frozen=True, slots=True)
class UnreadableRecord:
    """A record that cannot be read: its key (None: neither id is text) and why."""

    key: str | None
    reason: str
    doc_id: ObjectId | None = None

    def as_json(self) -> dict:
        return {"key": self.key, "unreadable": self.reason}


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def kind(value: object) -> str:
    """A stored value's type, for a reason."""
    return "null" if value is None else type(value).__name__


def record_key(doc: object) -> str | None:
    """A stored record's key (its failure id, else its message id) when that is text; None otherwise."""
    if not isinstance(doc, dict):
        return None
    failure_id, message_id = doc.get("failure_id"), doc.get("message_id")
    if isinstance(failure_id, str) and failure_id:
        return failure_id
    return message_id if isinstance(message_id, str) and failure_id in (None, "") else None


def read_record(doc: object) -> FailedRecord | UnreadableRecord:
    """The record a failed_messages document holds, or why it cannot be read (never raises)."""
    doc_id = doc.get("_id") if isinstance(doc, dict) else None
    doc_id = doc_id if isinstance(doc_id, ObjectId) else None
    try:
        return _read(doc, doc_id)
    except Unreadable as exc:
        return UnreadableRecord(record_key(doc), str(exc), doc_id)


def _read(doc: object, doc_id: ObjectId | None) -> FailedRecord:
    if not isinstance(doc, dict):
        raise Unreadable(f"the record is a {kind(doc)}, not a document")
    message_id = doc.get("message_id")
    if not isinstance(message_id, str):
        raise Unreadable(f"message_id is {kind(message_id)}, not text")
    failure_id = doc.get("failure_id")
    if failure_id is not None and not isinstance(failure_id, str):
        raise Unreadable(f"failure_id is {kind(failure_id)}, not text")
    text = {name: _text(doc, name, "") for name in _TEXT}
    return FailedRecord(
        message_id=message_id, failure_id=failure_id or None, **text,
        **{name: _text(doc, name, None) for name in _OPTIONAL_TEXT},
        retry_count=_count(doc, "retry_count", 0), original_size=_count(doc, "original_size", None),
        first_failure_at=_time(doc, "first_failure_at"), last_failure_at=_time(doc, "last_failure_at"),
        headers=_headers(doc.get("headers")), history=_history(doc.get("history")), doc_id=doc_id,
    )


def _text(doc: dict, name: str, missing: str | None) -> str | None:
    value = doc.get(name)
    if value is None:
        return missing
    if not isinstance(value, str):
        raise Unreadable(f"{name} is {kind(value)}, not text")
    return value


def _count(doc: dict, name: str, missing: int | None) -> int | None:
    value = doc.get(name)
    if value is None:
        return missing
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Unreadable(f"{name} is {kind(value)} {str(value)[:40]}, not a count")
    return value


def _time(doc: dict, name: str) -> datetime | None:
    value = doc.get(name)
    when = to_datetime(value)
    if when is None and value is not None:
        raise Unreadable(f"{name} is {kind(value)}, not a time")
    return when


def _headers(value: object) -> dict[str, str | int | float | bool]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Unreadable(f"headers is {kind(value)}, not a document")
    for name, v in value.items():
        if not isinstance(v, _HEADER_VALUE):
            raise Unreadable(f"header {str(name)[:40]!r} is {kind(v)}")
    return dict(value)


def _history(value: object) -> tuple[HistoryEntry, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise Unreadable(f"history is {kind(value)}, not a list")
    entries = []
    for i, h in enumerate(value):
        if not isinstance(h, dict):
            raise Unreadable(f"history[{i}] is {kind(h)}, not a document")
        at, cls, msg = h.get("at"), h.get("error_class"), h.get("error_message")
        if not all(isinstance(v, str) for v in (at, cls, msg)):
            raise Unreadable(f"history[{i}] holds a field that is not text")
        entries.append(HistoryEntry(at, cls, msg))
    return tuple(entries)
