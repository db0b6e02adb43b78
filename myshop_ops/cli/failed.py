"""`myshop failed show | retry | remove`."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from datetime import datetime

import typer
from rich.table import Table

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.store import Store
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_FAIL
from myshop_ops.base.printable import printable
from myshop_ops.cli.common import console, fail, operator_errors, print_json, settings, shown
from myshop_ops.tools.failed_queue import Drift, FailedBox, Outcome, Record, parse_duration
from myshop_ops.tools.failed_record import UnreadableRecord


@contextlib.contextmanager
def _box() -> Iterator[FailedBox]:
    s = settings()
    with operator_errors(s):
        store = Store.from_settings(s)
        failover = broker.Failover(s.rabbitmq_dsn, name="myshop-failed")
        try:
            yield FailedBox(failover.connect(), store, Topology.from_settings(s), failover)
        finally:
            failover.close()
            store.close()


def _drift_line(d: Drift) -> str | None:
    parts = []
    if d.recorded_from_queue:
        parts.append(f"{len(d.recorded_from_queue)} message(s) were in the queue without a record "
                     "(dead-lettered by RabbitMQ); recorded now")
    if d.orphan_records:
        parts.append(f"{len(d.orphan_records)} record(s) have no message left in the queue "
                     f"(`myshop failed remove {d.orphan_records[0]}` clears one)")
    return "; ".join(parts) or None


def show(
    message_id: str = typer.Argument(None, help="Show one message in full: its failure id, or its message id "
                                                "(every failed copy of it)."),
    max_rows: int = typer.Option(50, "--max", min=1, help="Rows to list."),
    stats: bool = typer.Option(False, "--stats", help="Counts by error class."),
    text: str = typer.Option(None, "--filter", help="Only messages whose error, class, user or id contains TEXT."),
    since: str = typer.Option(None, "--since", help="Only failures in the last DURATION (30m, 12h, 7d)."),
    as_json: bool = typer.Option(False, "--json", help="JSON output (see above)."),
) -> None:
    """Show failed messages (from the failed_messages index, checked against the failed queue).

    --json prints {"queue_count", "record_count", "drift": {"recorded_from_queue": [ID], "orphan_records": [ID]},
    "messages": [RECORD]}; with --stats {"queue_count", "by_error_class": {CLASS: n}}; with an ID its RECORD, or
    [RECORD] for several failed copies. RECORD: {"message_id", "failure_id", "user_id", "event_type",
    "error_class", "error_message", "worker_host", "original_queue", "body", "retry_count", "original_size",
    "first_failure_at", "last_failure_at", "headers", "history": [{"at", "error_class", "error_message"}]}, or
    {"key", "unreadable"} for a record that cannot be read. Times in ISO 8601; null means unknown.
    """
    try:
        window = parse_duration(since) if since else None
    except ValueError as exc:
        fail(f"--since: {exc}", EXIT_CONFIG)
    with _box() as box:
        drift = box.check()
        if message_id:
            _show_one(box.matching(message_id), message_id, as_json)
        elif stats:
            _show_stats(box.stats(), drift, as_json)
        else:
            _show_list(box.records(text=text, since=window, limit=max_rows), drift, as_json)


def _show_one(recs: list[Record], message_id: str, as_json: bool) -> None:
    if not recs:
        fail(f"no failed message with id {message_id} (list them with `myshop failed show`)")
    if as_json:
        print_json(recs[0].as_json() if len(recs) == 1 else [r.as_json() for r in recs])
        return
    for rec in recs:
        _print_one(rec)


def _show_stats(rows: list[tuple[str, int]], drift: Drift, as_json: bool) -> None:
    if as_json:
        print_json({"queue_count": drift.queue_count, "by_error_class": {str(cls): n for cls, n in rows}})
        return
    table = Table("error class", "messages", title=f"failed messages: {sum(n for _, n in rows)}")
    for cls, n in rows:
        table.add_row(shown(cls), str(n))
    console.print(table)


def _show_list(records: list[Record], drift: Drift, as_json: bool) -> None:
    if as_json:
        print_json({"queue_count": drift.queue_count, "record_count": drift.record_count,
                    "drift": {"recorded_from_queue": drift.recorded_from_queue,
                              "orphan_records": drift.orphan_records},
                    "messages": [r.as_json() for r in records]})
        return
    table = Table("failure id", "message id", "user", "type", "error", "retries", "failed at",
                  title=f"failed messages: {drift.queue_count} in queue (showing {len(records)})")
    for r in records:
        if isinstance(r, UnreadableRecord):
            table.add_row(shown(r.key or "-"), "-", "-", "-", f"[red]unreadable record:[/] {shown(r.reason)}", "-", "-")
            continue
        table.add_row(shown(r.failure_id or "-"), shown(r.message_id[:16]), shown(r.user_id or "-"),
                      shown(r.event_type or "-"), shown(f"{r.error_class or '?'}: {r.error_message[:80]}"),
                      str(r.retry_count), _when(r.last_failure_at))
    console.print(table)
    if (line := _drift_line(drift)) is not None:
        console.print(f"[yellow]drift:[/] {shown(line)}", highlight=False)


def _when(at: datetime | None) -> str:
    return "-" if at is None else at.strftime("%Y-%m-%d %H:%M:%S")


def _print_one(rec: Record) -> None:
    """One record in full. Every field is data (from a message or its headers): shown escaped, never as markup; a
    record that cannot be read is shown by its key, with why."""
    if isinstance(rec, UnreadableRecord):
        console.print(f"[bold]{shown(rec.key or '(no text id)')}[/] [red]unreadable record:[/] {shown(rec.reason)}",
                      highlight=False)
        return
    console.print(f"[bold]{shown(rec.message_id)}[/] (failure {shown(rec.failure_id or '-')})  "
                  f"{shown(rec.error_class or '?')}: {shown(rec.error_message)}", highlight=False)
    console.print(shown(f"user {rec.user_id}  type {rec.event_type}  retries {rec.retry_count}  "
                        f"first {_when(rec.first_failure_at)}  last {_when(rec.last_failure_at)}  "
                        f"host {rec.worker_host}  queue {rec.original_queue}"), highlight=False)
    try:
        body = json.dumps(json.loads(rec.body), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        body = rec.body
    console.print("[bold]body[/]")
    for line in body.splitlines():
        console.print(printable(line), markup=False, highlight=False)
    console.print("[bold]headers[/]")
    for k, v in sorted(rec.headers.items()):
        console.print(printable(f"  {k}: {v}"), markup=False, highlight=False)
    console.print("[bold]history[/]")
    for h in rec.history:
        console.print(printable(f"  {h.at}  {h.error_class}: {h.error_message}"), markup=False, highlight=False)


def _confirm(action: str, ids: list[str] | None, force: bool) -> None:
    if force:
        return
    what = "ALL failed messages" if ids is None else f"{len(ids)} failed message(s)"
    if not sys.stdin.isatty():
        fail(f"refusing to {action} {what} without a terminal: add --force", EXIT_CONFIG)
    if not typer.confirm(f"{action.capitalize()} {what}?"):
        raise typer.Exit(EXIT_FAIL)


def _targets(ids: list[str], all_: bool) -> list[str] | None:
    if all_ == bool(ids):
        fail("give message ids or --all (not both)", EXIT_CONFIG)
    return None if all_ else ids


def retry(
    ids: list[str] = typer.Argument(None, help="Failure ids, or message ids (every failed copy)."),
    all_: bool = typer.Option(False, "--all", help="Retry every failed message."),
    force: bool = typer.Option(False, "--force", help="Do not ask for confirmation."),
) -> None:
    """Republish failed messages to the main queue, then remove them from `failed`.

    Each is published again (confirmed) with its retry count reset, then acked out of the failed queue and its
    record deleted from failed_messages; asks first unless --force.
    """
    targets = _targets(ids or [], all_)
    _confirm("retry", targets, force)
    with _box() as box:
        outcome = box.retry(targets)
    _report("retried", outcome, box.failover)


def remove(
    ids: list[str] = typer.Argument(None, help="Failure ids, or message ids (every failed copy)."),
    all_: bool = typer.Option(False, "--all", help="Remove every failed message."),
    force: bool = typer.Option(False, "--force", help="Do not ask for confirmation."),
) -> None:
    """Delete failed messages from the failed queue and the failed_messages collection."""
    targets = _targets(ids or [], all_)
    _confirm("remove", targets, force)
    with _box() as box:
        outcome = box.remove(targets)
    _report("removed", outcome)


def _report(verb: str, outcome: Outcome, failover: broker.Failover | None = None) -> None:
    console.print(f"{verb} {len(outcome.done)} message(s)", highlight=False)
    if failover is not None and (line := failover.report()):
        console.print(line, highlight=False, markup=False)
    if outcome.missing:
        fail(f"not found in the failed queue or its records: {', '.join(outcome.missing)} "
             "(list them with `myshop failed show`)")
