"""`myshop setup-transports` and `myshop setup-indexes`: idempotent, report what exists and what was made."""

from __future__ import annotations

import typer
from rich.table import Table

from myshop_ops import broker
from myshop_ops.broker import Topology
from myshop_ops.cli.common import console, operator_errors, print_json, settings
from myshop_ops.store import Store


def setup_transports(
    queue: str = typer.Option(None, help="Main queue name (default RABBITMQ_QUEUE)."),
    as_json: bool = typer.Option(False, "--json", help="Print the declared objects as JSON."),
) -> None:
    """Declare the exchanges and queues (main, retry delay queues, failed). A mismatching queue is reported,
    never redeclared."""
    s = settings()
    topo = Topology.from_settings(s, queue)
    with operator_errors(s):
        conn = broker.connect(s.rabbitmq_dsn, name="myshop-setup")
        try:
            declared = broker.declare(conn, topo)
        finally:
            conn.close()
    rows = [{"kind": k, "name": n, "arguments": _args(topo, k, n)} for k, n in declared]
    if as_json:
        print_json({"declared": rows})
        return
    table = Table("kind", "name", "arguments", title="RabbitMQ topology (declared, idempotent)")
    for r in rows:
        table.add_row(r["kind"], r["name"], ", ".join(f"{k}={v}" for k, v in r["arguments"].items()))
    console.print(table)


def _args(topo: Topology, kind: str, name: str) -> dict:
    if kind == "exchange":
        return {"type": "direct", "durable": True}
    if name == topo.queue:
        return topo.main_arguments()
    if name == topo.failed_queue:
        return {"x-queue-type": "classic"}
    return topo.retry_arguments(int(name.rsplit(".", 1)[1]))


def setup_indexes(as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Create the MongoDB indexes (user_embeddings, product_embeddings, failed_messages); idempotent."""
    s = settings()
    with operator_errors(s):
        store = Store(s.mongodb_url, s.mongodb_db)
        rows = store.setup_indexes()
        store.close()
    if as_json:
        print_json({"indexes": [{"collection": c, "index": i, "state": st} for c, i, st in rows]})
        return
    table = Table("collection", "index", "state", title=f"MongoDB indexes in {s.mongodb_db}")
    for c, i, st in rows:
        table.add_row(c, i, f"[green]{st}[/]" if st == "created" else st)
    console.print(table)
