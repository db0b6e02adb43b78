"""A message as the operator tools read it from a queue (`failed`, `<queue>.unrouted`): its properties and headers
parsed once, here, by total parsers. Publishers choose every one of them: any AMQP type (bytes that are no UTF-8,
integers past 64 bits, lists, tables, timestamps out of range), any shape (a forged ``x-death`` or
``x-first-death-reason``; RabbitMQ keeps the latter when it dead-letters). Nothing behind this module reads a raw
value: the raw headers are kept only to be published again, and then only those pika can encode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pika.spec import BasicProperties

from myshop_ops.adapters.amqp_fields import encodable
from myshop_ops.adapters.broker import published_at
from myshop_ops.core.retry_routing import (
    H_ERROR_CLASS,
    H_ERROR_MESSAGE,
    H_ORIGINAL_QUEUE,
    H_WORKER_HOST,
    failure_id_of,
    message_id_of,
    retry_count,
)

MAX_TEXT = 1000  # a header read as text is cut here
H_FIRST_DEATH_REASON = "x-first-death-reason"
_INT64 = (-(2**63), 2**63 - 1)


def text_of(value: object, limit: int = MAX_TEXT) -> str | None:
    """A property or header value as text: a string as it is, bytes decoded (bytes that are no UTF-8 as ``\\x``
    escapes), at most ``limit`` characters; None for any other type. Never raises."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "backslashreplace")
    return value[:limit] if isinstance(value, str) else None


def stored_value(value: object) -> str | int | float | bool | None:
    """A header value as a failed_messages record keeps and shows it: text, a boolean, a 64-bit integer or a
    float as is (what BSON stores); bytes decoded as by :func:`text_of`; anything else as its text."""
    if value is None or isinstance(value, bool | float | str):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    return text_of(value, 1_000_000) if isinstance(value, bytes | bytearray) else str(value)


def stored_headers(headers: dict) -> dict[str, object]:
    """Every header with a text name and a stored value (a name that is bytes decoded, as by :func:`text_of`)."""
    return {text_of(k) if isinstance(k, bytes) else str(k): stored_value(v) for k, v in headers.items()}


def republishable(headers: dict, drop: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """The headers to publish a message with again (less ``drop``), and the names of those pika cannot encode
    (left out)."""
    return encodable({k: v for k, v in headers.items() if k not in drop})


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """One message of a queue, parsed. ``headers`` is what the broker delivered, kept only to be published again
    (through :func:`republishable`); every field the tools read is a parsed one."""

    amqp_id: str | None  # the AMQP message_id as text
    body: bytes
    headers: dict = field(repr=False)
    content_type: str | None = None
    failure_id: str | None = None  # a worker-written failed copy's x-failure-id
    retry_count: int | None = 0  # None: the header is no count a worker wrote
    error_class: str | None = None
    error_message: str | None = None
    worker_host: str | None = None
    original_queue: str | None = None
    death_reason: str | None = None  # x-first-death-reason: why RabbitMQ dead-lettered it (or a forgery)
    published_at: float | None = None  # epoch seconds

    @classmethod
    def read(cls, props: BasicProperties, body: bytes) -> QueuedMessage:
        """Parse a delivery's properties and headers; any value of any type gives a message, never an error."""
        raw = props.headers if isinstance(props.headers, dict) else {}
        body = bytes(body or b"")
        h = {k: v for k, v in raw.items() if isinstance(k, str)}  # a name that is no UTF-8 names none of ours
        return cls(
            amqp_id=text_of(props.message_id, 255),
            body=body,
            headers=dict(raw),
            content_type=text_of(props.content_type, 255),
            failure_id=failure_id_of(h),
            retry_count=retry_count(h),
            error_class=text_of(h.get(H_ERROR_CLASS), 255),
            error_message=text_of(h.get(H_ERROR_MESSAGE)),
            worker_host=text_of(h.get(H_WORKER_HOST), 255),
            original_queue=text_of(h.get(H_ORIGINAL_QUEUE), 255),
            death_reason=text_of(h.get(H_FIRST_DEATH_REASON), 255),
            published_at=published_at(props),
        )

    @property
    def message_id(self) -> str:
        """The AMQP message_id, or a hash of the body when it has none."""
        return message_id_of(self.body, self.amqp_id)

    @property
    def key(self) -> str:
        """Its record's key: the failure id, or the message id for a message without one."""
        return self.failure_id or self.message_id

    def chosen(self, ids: set[str] | None) -> bool:
        """Whether ``ids`` (None: all) name it, by failure id or message id (which names every copy)."""
        return ids is None or self.key in ids or self.message_id in ids
