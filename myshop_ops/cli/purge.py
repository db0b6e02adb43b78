"""`myshop purge QUEUE`: drop a queue's ready messages, after the operator types the queue's name."""

from __future__ import annotations

import sys

import typer

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.store import Store
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_FAIL
from myshop_ops.cli.common import console, fail, operator_errors, print_json, settings, shown
from myshop_ops.tools.failed_queue import FailedBox

PURGE_HELP = """Purge a queue's ready messages (unacked ones stay with their consumers).

Shows how many messages would go, then asks you to type the queue name; --force skips the question, and
without a terminal --force is required. Purging the failed queue also deletes the failed_messages records
of the purged failures. --json prints {"queue", "ready", "consumers", "records", "dry_run", "purged",
"records_deleted"}."""


def purge(
    queue: str = typer.Argument(..., help="Queue to purge (e.g. the failed queue)."),
    force: bool = typer.Option(False, "--force", help="Do not ask; required without a terminal."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would be purged."),
    as_json: bool = typer.Option(False, "--json", help="JSON output (see above)."),
) -> None:
    s = settings()
    topo = Topology.from_settings(s)
    is_failed = queue == topo.failed_queue
    with operator_errors(s):
        conn = broker.connect(s.rabbitmq_dsn, name="myshop-purge")
        store = Store.from_settings(s) if is_failed else None
        try:
            depth = broker.queue_depth(conn, queue)
            if depth is None:
                fail(f"queue '{queue}' does not exist (queues of this deployment: {', '.join(topo.queues())})",
                     EXIT_CONFIG)
            ready, consumers = depth
            report = {"queue": queue, "ready": ready, "consumers": consumers,
                      "records": store.count_failures() if store else None, "dry_run": dry_run,
                      "purged": 0, "records_deleted": 0}
            plan = f"'{shown(queue)}' holds {ready} ready message(s)" + (
                f" and failed_messages {report['records']} record(s)" if store else "")
            if not as_json:
                console.print(("would purge: " if dry_run else "") + plan, highlight=False)
            if not dry_run:
                _confirm(queue, force)
                if store:
                    report["purged"], report["records_deleted"] = FailedBox(conn, store, topo).purge()
                else:
                    report["purged"] = broker.purge(conn, queue)
        finally:
            conn.close()
            if store:
                store.close()
    if as_json:
        print_json(report)
    elif not dry_run:
        console.print(f"purged {report['purged']} message(s) from '{shown(queue)}'"
                      + (f", deleted {report['records_deleted']} record(s)" if store else ""), highlight=False)


def _confirm(queue: str, force: bool) -> None:
    if force:
        return
    if not sys.stdin.isatty():
        fail(f"refusing to purge '{queue}' without a terminal: add --force", EXIT_CONFIG)
    if typer.prompt(f"Type the queue name ({queue}) to purge it") != queue:
        fail("the name did not match: nothing purged", EXIT_FAIL)
