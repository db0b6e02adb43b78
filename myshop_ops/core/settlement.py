"""Settlement of a processed batch, decided without I/O: which deliveries need a copy (to the next delay queue or to
`failed`, with its failed_messages record) and which acks end the batch. The worker carries it out in that order:
every copy confirmed, the records written, then the acks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from myshop_ops.adapters.broker import Topology
from myshop_ops.core.pipeline import Item, Status
from myshop_ops.core.retry_routing import H_ORIGINAL_SIZE, Copy, failure_record, route

if TYPE_CHECKING:
    from myshop_ops.core.worker import Delivery


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One copy to publish before the batch is acked."""

    delivery: Delivery
    item: Item
    copy: Copy
    message_id: str | None  # what the copy is published with: the delivery's id, else the event's, else a body hash
    record: dict | None  # the failed_messages document of a failed copy


@dataclass(frozen=True, slots=True)
class Settlement:
    copies: list[Outgoing]
    acks: list[tuple[int, bool]]  # (delivery tag, multiple), in order


def settle(topology: Topology, batch: Sequence[Delivery], items: Sequence[Item], *, ack_each: bool,
           now: datetime | None = None, lowest_open: int | None = None) -> Settlement:
    """What ``batch`` (whose outcomes are ``items``, in the same order) becomes: a copy for each retry or failed
    item, routed by ``retry_routing.route``; one multiple ack of the highest tag, or with ``ack_each`` (held deliveries
    of the batching window interleave with others) one ack per delivery. ``lowest_open``: the lowest tag of a
    delivery left unacked outside the batch (kept for later: its user is claimed by another worker); the multiple
    ack stops below it, the batch's tags above it are acked one by one."""
    copies = []
    for delivery, item in zip(batch, items, strict=True):
        if item.status not in (Status.RETRY, Status.FAILED):
            continue
        props = delivery.properties
        copy = route(topology, props.headers, item.error, transient=item.status == Status.RETRY, now=now,
                     noted=props.ignored)
        message_id = props.message_id or (item.event.message_id if item.event else None)
        original_size = delivery.size if delivery.oversize else None
        if original_size is not None:
            copy.headers[H_ORIGINAL_SIZE] = original_size
        record = failure_record(copy, delivery.body, message_id, now, original_size) if copy.failed else None
        copies.append(Outgoing(delivery, item, copy, record["message_id"] if record else message_id, record))
    acks = [(d.tag, False) for d in batch] if ack_each else _acks(sorted(d.tag for d in batch), lowest_open)
    return Settlement(copies, acks)


def _acks(tags: list[int], lowest_open: int | None) -> list[tuple[int, bool]]:
    """One multiple ack for the (ascending) ``tags`` below ``lowest_open``, one ack each for the others."""
    below = sum(1 for t in tags if lowest_open is None or t < lowest_open)
    return ([(tags[below - 1], True)] if below else []) + [(t, False) for t in tags[below:]]
