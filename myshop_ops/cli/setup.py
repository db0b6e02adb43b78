"""`myshop setup-transports`, `messenger-config`, `setup-indexes`: idempotent, report what exists and was made."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import asdict

import pika.exceptions as pex
import typer
from rich.table import Table

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.config import Settings, mask_url
from myshop_ops.adapters.management import for_connection
from myshop_ops.adapters.store import Store
from myshop_ops.base.exit_codes import EXIT_FAIL
from myshop_ops.cli.common import console, err_console, fail, operator_errors, print_json, settings, shown
from myshop_ops.tools import transports
from myshop_ops.tools.transports import MigrationRefused


def setup_transports(
    queue: str = typer.Option(None, help="Main queue name (default RABBITMQ_QUEUE)."),
    migrate: bool = typer.Option(False, "--migrate", help="Also recreate a main queue of another type (or with "
                                 "declared arguments) and old retry queues, moving their messages; workers stopped."),
    as_json: bool = typer.Option(False, "--json", help="Print what was found and done as JSON (see above)."),
) -> None:
    """Declare the exchanges, queues, bindings and policies; adopt what exists (never redeclared).

    Given several nodes in RABBITMQ_DSN it goes on on another one when its connection is lost (a migration from
    where the broker says it stands; a message being moved when the node died is moved again and counted).
    --json prints {"steps": [{"kind", "name", "state", "detail", "level", "fix"}], "ok", "failover": {"count",
    "republished"}} (docs/CLI-JSON.md).
    """
    s = settings()
    topo = Topology.from_settings(s, queue)
    with operator_errors(s), _transports(s, topo) as transports:
        steps = transports.setup()
        if migrate:
            try:
                steps += transports.migrate(progress=lambda line: err_console.print(shown(line), highlight=False))
            except MigrationRefused as exc:
                fail(str(exc), EXIT_FAIL)
    warned = [st for st in steps if st.level != "ok"]
    failover = transports.failover
    if as_json:
        print_json({"steps": [asdict(st) for st in steps], "ok": not warned,
                    "failover": {"count": failover.failovers, "republished": failover.resent}})
        return
    table = Table("kind", "name", "state", "detail", title="RabbitMQ topology (idempotent)")
    for column in table.columns:
        column.overflow = "fold"
    for st in steps:
        style = {"created": "green", "set": "green", "recreated": "green", "adopted": "yellow"}.get(st.state)
        table.add_row(st.kind, shown(st.name), f"[{style}]{st.state}[/]" if style else st.state, shown(st.detail))
    console.print(table)
    for st in warned:
        console.print(f"[yellow]note:[/] {shown(st.kind)} {shown(st.name)}: {shown(st.detail)}"
                      + (f" (fix: {shown(st.fix)})" if st.fix else ""), highlight=False, soft_wrap=True)
    if line := failover.report():
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def messenger_config(
    no_auto_setup: bool = typer.Option(False, "--no-auto-setup", help="auto_setup: false (during --migrate)."),
    confirm_timeout: float = typer.Option(5.0, min=0.1, help="Seconds the shop waits for each publish confirm."),
) -> None:
    """Print the shop's messenger.yaml transport block matching the live topology."""
    s = settings()
    topo = Topology.from_settings(s)
    with operator_errors(s), _transports(s, topo) as live:
        arguments = live.main_queue_arguments()
    dsn = mask_url(broker.dsn_urls(s.rabbitmq_dsn)[0])
    sys.stdout.write(transports.messenger_config(topo, arguments, dsn, auto_setup=not no_auto_setup,
                                                 confirm_timeout=confirm_timeout))


@contextlib.contextmanager
def _transports(s: Settings, topo: Topology) -> Iterator[transports.Transports]:
    """The topology on the AMQP connection (failing over along RABBITMQ_DSN), with the management API of that same
    broker (checked: WrongBroker)."""
    failover = broker.Failover(s.rabbitmq_dsn, name="myshop-setup")
    conn = failover.connect()
    try:
        yield transports.Transports(conn, for_connection(s.rabbitmq_management_url, s.rabbitmq_dsn, conn), topo,
                                    failover)
    except (pex.AMQPError, ConnectionError) as exc:  # what Transports did not name: still one line
        raise broker.BrokerError(f"RabbitMQ at {broker.address(failover.connection or conn)} failed: "
                                 f"{type(exc).__name__} {exc} (run `myshop setup-transports` again: it is "
                                 "idempotent)") from None
    finally:
        failover.close()


def setup_indexes(as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (see above).")) -> None:
    """Create the MongoDB indexes of myshop's collections; idempotent.

    Indexes of user_embeddings, product_embeddings, failed_messages and user_erasures: each created, existing
    (also under another name with the same key and options), or failed with why. Exit 1 when one failed.
    --json prints {"indexes": [{"collection", "index", "state"}]}.
    """
    s = settings()
    with operator_errors(s):
        store = Store.from_settings(s)
        rows = store.setup_indexes()
        store.close()
    failed = [f"{c}.{i}" for c, i, st in rows if st.startswith("failed")]
    if as_json:
        print_json({"indexes": [{"collection": c, "index": i, "state": st} for c, i, st in rows]})
    else:
        table = Table("collection", "index", "state", title=f"MongoDB indexes in {s.mongodb_db}")
        for c, i, st in rows:
            style = "green" if st == "created" else "red" if st.startswith("failed") else None
            table.add_row(c, i, shown(st), style=style)
        console.print(table)
    if failed:
        fail(f"index(es) not created: {', '.join(failed)} (the state column says why); workers refuse to start "
             "without them")
