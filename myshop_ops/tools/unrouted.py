"""What the main exchange could not route: its alternate exchange keeps it in ``<queue>.unrouted``.

A producer publishing with a routing key no binding matches (a renamed key, a missing binding) would otherwise
lose every message without an error on either side. Here they wait, are counted by `stats`, alerted on, listed by
`myshop unrouted show` and moved to the main queue by `myshop unrouted republish` once the cause is fixed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pika.adapters.blocking_connection import BlockingConnection

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Failover, Topology
from myshop_ops.base.contract import loose_field
from myshop_ops.tools.queued import QueuedMessage, text_of

PREVIEW_CHARS = 200


@dataclass(frozen=True, slots=True)
class UnroutedMessage:
    routing_key: str
    message_id: str | None  # the body's id (snake or camel key), else the AMQP property
    user_id: str | None
    event_type: str | None
    published_at: float | None  # epoch seconds
    body: str  # the start of the body, as text


def peek(connection: BlockingConnection, topo: Topology, limit: int) -> tuple[int, list[UnroutedMessage]]:
    """(messages waiting, the first ``limit`` of them); nothing is consumed (each goes back in its place)."""
    ch = connection.channel()
    try:
        total = ch.queue_declare(topo.unrouted, passive=True).method.message_count
        out = []
        for _ in range(min(limit, total)):
            method, props, body = ch.basic_get(topo.unrouted, auto_ack=False)
            if method is None:
                break
            out.append(_describe(text_of(method.routing_key, 255) or "", QueuedMessage.read(props, body)))
    finally:
        ch.close()  # unacked: back in the queue, in order
    return total, out


def republish(connection: BlockingConnection, topo: Topology, failover: Failover | None = None) -> int:
    """Move every waiting message into the main queue (straight to it, whatever its routing key); returns how many.
    With ``failover`` (whose connection ``connection`` is), a lost connection is replaced and the move goes on."""
    return broker.move(connection, topo.unrouted, topo.queue, failover=failover)


def _describe(routing_key: str, msg: QueuedMessage) -> UnroutedMessage:
    text = msg.body.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None

    def field(snake: str, camel: str) -> str | None:
        value = loose_field(doc, snake, camel)
        return None if value is None or isinstance(value, dict | list) else str(value)[:128]

    return UnroutedMessage(routing_key, field("message_id", "messageId") or msg.amqp_id, field("user_id", "userId"),
                           field("event_type", "eventType"),
                           msg.published_at, text[:PREVIEW_CHARS])
