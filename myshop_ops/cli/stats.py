"""`myshop stats`: queue depths, consumers, rates and the failed count, once or refreshed in place."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.config import mask_text
from myshop_ops.adapters.management import Management, ManagementError, WrongBroker, for_connection
from myshop_ops.adapters.metrics import DEFAULT_HOST, QueueExporter, serve
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_FAIL
from myshop_ops.cli.common import console, err_console, fail, operator_errors, settings, shown
from myshop_ops.tools.stats import CRITICAL_DEPTH, WARN_DEPTH, Report, UnknownQueue, collect, export

STATS_HELP = f"""Queue depths, consumers, rates and the failed count.

Levels: warn above {WARN_DEPTH} ready, critical above {CRITICAL_DEPTH}; warn when messages wait with no consumer;
warn when the failed queue holds more than 1% of the messages processed (needs RABBITMQ_MANAGEMENT_URL, which
also adds unacked counts and publish/deliver rates). On a RabbitMQ cluster (with the management API) the main
quorum queue's members: warn with a member down, critical when its quorum is lost, the quorum-critical nodes
(none may be restarted now) named; critical while a memory or disk alarm blocks every publisher. Exit code 1
when any queue is critical (for cron and monitoring). --json prints {{"level", "management", "failed_records",
"alarms": [{{"node", "kind"}}], "queues": [{{"name", "role", "ready", "consumers", "unacked", "publish_rate",
"deliver_rate", "acked_total", "level", "notes", "members": null | {{"members", "online", "leader", "down",
"quorum_critical", "majority"}}}}]}} (one object per refresh with --watch); null means unknown."""

_COLOURS = {"ok": "green", "warn": "yellow", "critical": "bold red"}


def _fmt(value: float | int | None, rate: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}/s" if rate else str(value)


def render(report: Report) -> Group:
    table = Table(title=f"queues: {report.level.upper()}", title_style=_COLOURS[report.level])
    table.add_column("queue", no_wrap=True)
    for col in ("ready", "unacked", "consumers", "in/s", "out/s"):
        table.add_column(col, justify="right", min_width=len(col))
    table.add_column("level", min_width=5)
    main = next((q.name for q in report.queues if q.role == "main"), None)
    for q in report.queues:
        name = f"  ↳ {q.name[len(main):]}" if main and q.role == "retry" and q.name.startswith(main) else q.name
        table.add_row(shown(name), _fmt(q.ready), _fmt(q.unacked), _fmt(q.consumers), _fmt(q.publish_rate, True),
                      _fmt(q.deliver_rate, True), f"[{_COLOURS[q.level]}]{q.level}[/]")
    if report.failed_records is not None:
        table.caption = f"failed_messages records: {report.failed_records}"
    table.caption = ((table.caption + " · ") if table.caption else "") + (
        "unacked and rates: management API samples (every few seconds, not exact)" if report.management else
        "unacked and rates need RABBITMQ_MANAGEMENT_URL")
    notes = [Text.from_markup(f"[{_COLOURS[q.level]}]{q.level}[/] {shown(q.name)}: {shown(n)}")
             for q in report.queues for n in q.notes]
    return Group(table, *notes)


def stats(
    queues: list[str] = typer.Argument(None, help="Queues to show (default: main, retry and failed queues)."),
    watch: float = typer.Option(None, "--watch", min=0.5, help="Refresh every SECONDS (default 2) until Ctrl-C."),
    as_json: bool = typer.Option(False, "--json", help="JSON output (see above)."),
    serve_metrics: int = typer.Option(None, "--serve-metrics", min=1, max=65535,
                                      help="Run as a Prometheus exporter on this port (queue gauges every --watch "
                                           "seconds, default 15) until SIGTERM/Ctrl-C."),
    metrics_host: str = typer.Option(DEFAULT_HOST, "--metrics-host", envvar="MYSHOP_METRICS_HOST",
                                     help="Address --serve-metrics binds (0.0.0.0: every interface)."),
) -> None:
    s = settings()
    topo = Topology.from_settings(s)
    if serve_metrics:
        _exporter(s, topo, queues, serve_metrics, watch or 15.0, metrics_host)
        return
    with operator_errors(s):
        conn = broker.connect(s.rabbitmq_dsn, name="myshop-stats")
        management = _management(s, conn)
        try:
            report = _snapshot(conn, topo, queues, management, as_json)
            if watch is None:
                _emit(report, as_json)
            else:
                report = _watch(conn, topo, queues, management, watch, as_json)
        finally:
            conn.close()
    if report.level == "critical":
        raise typer.Exit(EXIT_FAIL)


def _management(s, conn) -> Management | None:
    """RABBITMQ_MANAGEMENT_URL's API once shown to be the broker ``conn`` reached (None when unset). Another broker
    stops the command (WrongBroker: its numbers would be shown as ours); an API that cannot answer is a warning
    (the AMQP counts are shown without it)."""
    if not s.rabbitmq_management_url:
        return None
    try:
        return for_connection(s.rabbitmq_management_url, s.rabbitmq_dsn, conn)
    except WrongBroker:
        raise
    except ManagementError as exc:
        err_console.print(f"[yellow]warning:[/] {shown(mask_text(str(exc)))}", highlight=False, soft_wrap=True)
        return None


def _checked_management(s) -> Management | None:
    """``_management`` on a connection of its own (the exporter opens its connections itself)."""
    if not s.rabbitmq_management_url:
        return None
    with operator_errors(s):
        conn = broker.connect(s.rabbitmq_dsn, name="myshop-stats")
        try:
            return _management(s, conn)
        finally:
            conn.close()


def _exporter(s, topo: Topology, queues: list[str] | None, port: int, interval: float, host: str) -> None:
    management = _checked_management(s)  # another broker: refused before serving anything
    exporter = QueueExporter(interval)
    try:
        serve(exporter, port, host)
    except OSError as exc:
        fail(f"--serve-metrics {port} on {host}: {exc.strerror or exc}", EXIT_CONFIG)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    err_console.print(f"serving queue metrics on :{port}/metrics every {interval:g}s", highlight=False)
    export(s.rabbitmq_dsn, topo, queues, management, exporter.update, exporter.failed_collection, interval,
           stopping.is_set)


def _snapshot(conn, topo, queues, management, as_json: bool = False) -> Report:
    try:
        return collect(conn, topo, queues, management)
    except UnknownQueue as exc:
        error = f"queue '{exc}' does not exist (queues of this deployment: {', '.join(topo.queues())})"
        if as_json:  # a script reading stdout gets an answer too
            sys.stdout.write(json.dumps({"level": "critical", "error": error, "queues": []}) + "\n")
        fail(error, EXIT_CONFIG)
    except ManagementError as exc:  # rates are a bonus: say why they are missing and show the rest
        err_console.print(f"[yellow]warning:[/] {shown(mask_text(str(exc)))}", highlight=False, soft_wrap=True)
        return collect(conn, topo, queues, None)


def render_plain(report: Report) -> str:
    """One stable key=value line per queue (for pipes and logs), then the overall level."""
    lines = [
        f"{q.name} ready={q.ready} unacked={_fmt(q.unacked)} consumers={q.consumers} "
        f"in={_fmt(q.publish_rate, True)} out={_fmt(q.deliver_rate, True)} level={q.level}"
        + (f" notes={'; '.join(q.notes)!r}" if q.notes else "")
        for q in report.queues
    ]
    return "\n".join([*lines, f"level={report.level}"])


def _emit(report: Report, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(report.as_json()) + "\n")
    elif console.is_terminal:
        console.print(render(report))
    else:
        sys.stdout.write(render_plain(report) + "\n")
    sys.stdout.flush()


def _watch(conn, topo, queues, management, every: float, as_json: bool) -> Report:
    """Refresh every ``every`` seconds until Ctrl-C (or SIGTERM). The signal only sets a flag, seen between short
    waits: a KeyboardInterrupt raised inside pika's frame handling would leave the connection unable to close."""
    report = _snapshot(conn, topo, queues, management, as_json)
    live = Live(render(report), console=console, auto_refresh=False) if console.is_terminal and not as_json else None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with live or contextlib.nullcontext():
            while not stop.is_set():
                if live:
                    live.update(render(report), refresh=True)
                else:
                    _emit(report, as_json)
                deadline = time.monotonic() + every
                while not stop.is_set() and time.monotonic() < deadline:
                    conn.process_data_events(time_limit=min(0.2, max(0.0, deadline - time.monotonic())))
                if not stop.is_set():
                    report = _snapshot(conn, topo, queues, management, as_json)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return report
