"""`myshop unrouted show|republish`: messages the main exchange matched to no binding."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime

import typer
from rich.table import Table

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.cli.common import console, operator_errors, print_json, settings, shown
from myshop_ops.tools import unrouted


def show(
    limit: int = typer.Option(20, "--max", min=1, max=1000, help="How many to list."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON (see above)."),
) -> None:
    """List messages that matched no binding of the main exchange (nothing is consumed).

    --json prints {"queue", "total", "messages": [{"routing_key", "message_id", "user_id", "event_type",
    "published_at", "body" (its first 200 characters)}]}.
    """
    s = settings()
    topo = Topology.from_settings(s)
    with operator_errors(s):
        conn = broker.connect(s.rabbitmq_dsn, name="myshop-unrouted")
        try:
            total, messages = unrouted.peek(conn, topo, limit)
        finally:
            conn.close()
    if as_json:
        print_json({"queue": topo.unrouted, "total": total, "messages": [asdict(m) for m in messages]})
        return
    table = Table("routing key", "published", "message id", "user", "event", title=f"{total} in {shown(topo.unrouted)}")
    for m in messages:
        when = datetime.fromtimestamp(m.published_at, UTC).isoformat(timespec="seconds") if m.published_at else "?"
        table.add_row(*(shown(v or "-") for v in (m.routing_key, when, m.message_id, m.user_id,
                                                                  m.event_type)))
    console.print(table)
    if total:
        console.print(f"bindings of {topo.exchange} -> {topo.queue}: {', '.join(topo.routing_keys)} "
                      "(RABBITMQ_BINDING_KEYS); once fixed: myshop unrouted republish", highlight=False, markup=False)


def republish() -> None:
    """Move every unrouted message into the main queue (confirmed, then acked: none lost)."""
    s = settings()
    topo = Topology.from_settings(s)
    with operator_errors(s):
        failover = broker.Failover(s.rabbitmq_dsn, name="myshop-unrouted")
        try:
            moved = unrouted.republish(failover.connect(), topo, failover)
        finally:
            failover.close()
    console.print(f"moved {moved} message(s) from {topo.unrouted} to {topo.queue}", highlight=False, markup=False)
    if line := failover.report():
        console.print(line, highlight=False, markup=False)

