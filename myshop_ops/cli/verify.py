"""`myshop verify --events FILE.jsonl`: compare stored profiles with a recomputation from the events."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pika.exceptions as pex
import typer
from rich.table import Table

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import BrokerError, Topology
from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.embeddings import PhraseEmbedder, make_provider
from myshop_ops.adapters.management import Management, ManagementError, WrongBroker, for_connection
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import MAX_BODY_BYTES
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_FAIL
from myshop_ops.cli.common import console, fail, operator_errors, print_json, settings, shown
from myshop_ops.tools.lines import bounded_lines, open_regular
from myshop_ops.tools.migration import active_settings
from myshop_ops.tools.stats import wait_settled
from myshop_ops.tools.verify import COSINE_MIN, Verification, verify

VERIFY_HELP = f"""Compare every stored profile with a recomputation from recorded events (the file written by
`generate-test-events --record`, or any JSON-lines export of the stream): lost, duplicated, diverging (cosine <
{COSINE_MIN}, magnitude, last_updated or per-type counts off) and unverifiable users. A profile is OK only when it
equals the recomputation. Events recorded in failed_messages are expected to be missing. Search phrases are embedded
again (through the shared cache); a user whose phrases the provider cannot embed is unverifiable, with its error. A
profile adopted from the shop's is recomputed from the prior its adoption record holds (trusted as recorded) and the
file's events, and compared the same way; a record without a prior, unreadable or contradicting the profile is
unverifiable, as is a profile the shop's PHP workers rewrote after myshop, with the reason. Messages still queued or
unacked are waited for (--wait); users short of events while some remain are pending, not lost. A regular file of
any size, in bounded memory (a scratch database in $TMPDIR, under the file's size). If a dependency fails mid-way,
the report of the users checked so far is printed ("complete": false), then one line. Exit 1 unless all is OK, also
when nothing could be checked (no valid event, or none with a product vector outside failed_messages); 3 when a
dependency failed.
--json prints {{"ok", "complete", "reason" (why nothing was checked, else null), "lines", "invalid_lines", "events",
"duplicates_in_file", "skipped_no_product", "in_failed", "in_flight", "users", "users_pending", "users_ok",
"users_lost", "users_duplicated", "users_diverging", "users_unverifiable", "users_adopted", "events_lost",
"events_duplicated", "problems": [{{"user_id", "status", "expected_events", "stored_events", "cosine",
"magnitude_error", "adopted", "reason"}}]}}."""


def run_verify(
    events: Path = typer.Option(..., "--events", help="JSON lines of the published events."),
    max_problems: int = typer.Option(20, "--max-problems", min=0,
                                     help="Problem users to list (at most 1000 are kept; all are counted)."),
    wait: float = typer.Option(60.0, "--wait", min=0, help="Seconds to wait for the main and retry queues to "
                               "settle first (messages still queued or unacked are not losses)."),
    as_json: bool = typer.Option(False, "--json", help="JSON output (see above)."),
) -> None:
    s = settings(embeds=True)
    try:
        handle = open_regular(events)
    except OSError as exc:
        fail(f"--events {events}: {exc.strerror or exc}", EXIT_CONFIG)
    report = Verification()
    with operator_errors(s), handle:
        topo = Topology.from_settings(s)
        in_flight = _in_flight(s, topo, wait, management=True)
        store = Store.from_settings(s)
        def checked_with() -> tuple[Settings, PhraseEmbedder]:  # during a model migration: the live profiles' model
            live = active_settings(s, store)
            return live, PhraseEmbedder(make_provider(live), RedisState.from_settings(live), ttl=live.cache_ttl)

        try:
            lines = (line for _, line, _ in bounded_lines(handle, MAX_BODY_BYTES))  # longer: invalid, never held
            verify(s, lines, store, checked_with, report)
            report.unsettled(in_flight or _in_flight(s, topo, 0, management=False))  # and what came in meanwhile
        except BaseException as exc:  # a dependency failed mid-way: what was checked so far, then its one line
            report.complete = False
            _show(report, as_json, max_problems, events)
            _local_failure(exc, events)
            raise
        finally:
            store.close()
    _show(report, as_json, max_problems, events)
    if not report.ok:
        raise typer.Exit(EXIT_FAIL)


def _local_failure(exc: BaseException, events: Path) -> None:
    """One line for a failure of this machine's own files: the events file, or the scratch database."""
    if isinstance(exc, sqlite3.Error | OSError):
        fail(f"reading --events {events} into the scratch database in {tempfile.gettempdir()} failed: "
             f"{type(exc).__name__}: {exc} (free space there, or set TMPDIR)", EXIT_CONFIG)


def _management(s: Settings, conn) -> Management | None:
    """The management API of the broker ``conn`` reached, for the unacked count; None when it cannot answer (ready
    counts only). Another broker stops the command (WrongBroker)."""
    try:
        return for_connection(s.rabbitmq_management_url, s.rabbitmq_dsn, conn)
    except WrongBroker:
        raise
    except ManagementError:
        return None


def _in_flight(s: Settings, topo: Topology, wait: float, *, management: bool) -> int:
    """Messages still queued or unacked, after waiting up to ``wait`` seconds for them to settle. The broker
    connection lives only as long as this count: none is held while the events are recomputed."""
    conn = broker.connect(s.rabbitmq_dsn, name="myshop-verify")
    try:
        return wait_settled(conn, topo, _management(s, conn) if management else None, wait)
    except (pex.AMQPError, OSError) as exc:
        raise BrokerError(f"RabbitMQ failed while counting the messages in flight: {type(exc).__name__} {exc}"
                          " (is RabbitMQ running? check RABBITMQ_DSN)") from None
    finally:
        if conn.is_open:
            conn.close()


def _show(report: Verification, as_json: bool, max_problems: int, events: Path) -> None:
    if as_json:
        print_json(report.as_json(max_problems))
    elif report.nothing_checked:
        fail(f"--events {events}: {report.nothing_checked}", EXIT_FAIL)
    elif report.users or report.complete:
        _render(report, max_problems)


def _title(report: Verification, d: dict) -> str:
    if report.ok:
        return "[green]OK[/]"
    if not report.complete:
        return "[bold red]INCOMPLETE[/] (checked so far)"
    if d["users_lost"] or d["users_duplicated"] or d["users_diverging"]:
        return "[bold red]MISMATCH[/]"
    return "[yellow]NOT SETTLED[/]" if report.in_flight else "[yellow]UNVERIFIABLE[/]"


def _render(report: Verification, max_problems: int) -> None:
    d = report.as_json(max_problems)
    table = Table("events", "users", "ok", "lost (users/events)", "duplicated (users/events)", "diverging",
                  "unverifiable", "in failed", "no product", title="verification: " + _title(report, d))
    table.add_row(str(d["events"]), str(d["users"]), str(d["users_ok"]), f"{d['users_lost']}/{d['events_lost']}",
                  f"{d['users_duplicated']}/{d['events_duplicated']}", str(d["users_diverging"]),
                  str(d["users_unverifiable"]), str(d["in_failed"]), str(d["skipped_no_product"]))
    for column in table.columns:
        column.overflow = "fold"  # a narrow terminal wraps a header, never cuts it
    console.print(table)
    if d["in_flight"]:
        console.print(f"{d['in_flight']} message(s) still queued or unacked: {d['users_pending']} user(s) short of "
                      "events may only be waiting; run verify again once `myshop stats` shows the queues drained",
                      highlight=False)
    if d["invalid_lines"] or d["duplicates_in_file"]:
        console.print(f"{d['lines']} lines: {d['invalid_lines']} invalid, {d['duplicates_in_file']} duplicate "
                      "events (each counted once)", highlight=False)
    if d["users_adopted"]:
        console.print(f"{d['users_adopted']} user(s) adopted from the shop's profiles: recomputed from the prior "
                      "their adoption record holds (trusted as recorded) and the file's events", highlight=False)
    for p in d["problems"]:
        if p["status"] in ("unverifiable", "diverging") and p["reason"]:
            console.print(f"  {p['status']:<12} {shown(p['user_id'])}: {shown(p['reason'])}", highlight=False)
            continue
        console.print(f"  {p['status']:<10} {shown(p['user_id'])}: expected {p['expected_events']} events, stored "
                      f"{p['stored_events']}" + (f", cosine {p['cosine']:.6f}" if p["cosine"] is not None else ""),
                      highlight=False)
    if d["users_duplicated"]:
        console.print("duplicated = more events stored than the file holds: events applied twice, or events of "
                      "these users that are not in the file (verify needs every event of the users it checks)",
                      highlight=False)
