"""`myshop generate-test-events`: publish synthetic shop events (windowed confirms), optionally wait for the
profiles to reflect them. Event synthesis, recording and latencies live in ``myshop_ops/tools/generate.py``."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import pika.exceptions as pex
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import BLOCKED_TIMEOUT_S, FAILOVER_S, Topology
from myshop_ops.adapters.config import Settings, mask_url
from myshop_ops.adapters.management import Management, ManagementError, for_connection
from myshop_ops.adapters.publisher import DEFAULT_WINDOW, OK, PublishResult, WindowedPublisher
from myshop_ops.adapters.store import Store
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_FAIL
from myshop_ops.cli.common import console, err_console, fail, operator_errors, print_json, settings, shown
from myshop_ops.tools.generate import (
    DEFAULT_POLL_S,
    MAX_EVENTS,
    MAX_EVENTS_PER_USER,
    MAX_USERS,
    Plan,
    Recorder,
    RecordRefused,
    Run,
    VisibilityTracker,
    WaitOutcome,
    expected_sent_times,
    product_pool,
    profile_counts,
    queue_counts,
    record_problem,
    synthesize,
    wait_visible,
    where_missing,
)

GENERATE_HELP = f"""Publish synthetic shop events to the main exchange (publisher confirms).

Events of contract v1; --window unconfirmed messages in flight.

Prints the plan (events, users, type, exchange/queue, broker with the password masked) and asks for
confirmation, unless --yes is given or stdin is not a terminal; answering no publishes nothing and exits 1.
User ids are the decimal strings START..START+USERS-1; event times are spread over the last 7 days
(never in the future) and carry a per-run nonce, so every run publishes new events. Product events use
product ids stored in product_embeddings for the configured model and dimensions. At most {MAX_EVENTS:,}
events per run.

Then a results table: published, failed (nacked, returned as unroutable, or lost with the connection),
duration (first publish to last confirm), events/s, ms/event. Exit 1 if any event failed. A nacked event is
published again on a fresh channel (up to 8 times: a RabbitMQ cluster's leader election can leave a channel
nacking); a connection blocked by a memory or disk alarm is said on stderr and given up after
{BLOCKED_TIMEOUT_S} s. A connection lost mid-run (its node died) fails over to the other URLs of RABBITMQ_DSN
(comma-separated), the lost one last, for {FAILOVER_S} s at most: said on stderr, the events it had not confirmed
are published again first (same message id: a duplicate is absorbed by the consumers) and counted ("failover" row).

--record FILE writes the exact published bodies as JSON lines (publish order, confirmed ones only): a new file,
or an existing regular file overwritten; never through a symbolic link, into a FIFO or device, or over a file
with other hard links (refused before publishing).

--wait then polls user_embeddings every {int(DEFAULT_POLL_S * 1000)} ms until each published event shows in the
event_count of its user (counts read before publishing are subtracted) and reports the drain time (end of publishing
to the last profile write) and publish-to-profile latency P50/P95/P99: from the moment the event was handed
to the client library to the profile's updated_at written by the worker. Latencies are upper bounds at the
poll resolution (several writes between two polls are seen as the last one). Gives up after
--wait-timeout seconds (default 600: the checklist's 5,000-event performance run drained in 50-137 s, and an event
that fails takes up to the sum of the retry delays more) with exit 1 and one line saying what every queue of the
topology holds (main: ready, unacked, consumers; each retry queue; failed; unrouted) and what to do.

--json prints one JSON object instead of the tables:
{{"run_id", "plan": {{"events", "users", "events_per_user", "event_type", "start_user_id", "delay_ms",
"window"}}, "exchange", "queue", "broker", "published", "failed", "failures": {{"nacked", "returned", "lost",
"unsent"}}, "failover": {{"count", "republished", "brokers"}}, "error", "started_at", "duration_s", "events_per_s",
"ms_per_event", "by_type": {{TYPE: N}}, "record": null | {{"path", "lines"}}, "wait": null | {{"completed",
"timeout_s", "expected", "observed", "unusable", "drain_s", "waited_s", "poll_interval_ms", "publish_time": "sent",
"latency_ms": {{"p50", "p95", "p99", "max"}}, "queue_ready", "consumers", "queues": null | [{{"queue", "role",
"ready", "unacked", "consumers"}}]}}}} (schema in docs/CLI-JSON.md).

Exit codes: 0 all published (and seen, with --wait); 1 a failed event, a --wait timeout or a "no" at the
prompt; 2 a bad option, no product vectors for product events, or a missing queue/exchange; 3 RabbitMQ or
MongoDB unreachable.
"""


class EventType(StrEnum):
    mixed = "mixed"
    search = "search"
    product_view = "product_view"
    product_click = "product_click"
    product_purchase = "product_purchase"


def generate_test_events(
    users: int = typer.Option(100, "--users", min=1, max=MAX_USERS, help="Number of users."),
    events_per_user: int = typer.Option(
        50, "--events-per-user", min=1, max=MAX_EVENTS_PER_USER, help="Events per user."
    ),
    event_type: EventType = typer.Option(EventType.mixed, "--event-type", help="Event type; mixed uses all four."),
    delay_ms: int = typer.Option(0, "--delay-ms", min=0, max=60_000, help="Milliseconds between publishes."),
    start_user_id: int = typer.Option(500_000, "--start-user-id", min=0, help="First user id."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the profiles to reflect the events; report latencies."),
    wait_timeout: float = typer.Option(600.0, "--wait-timeout", min=1, max=86_400, help="Seconds --wait waits."),
    record: Path = typer.Option(None, "--record", help="Write the published bodies to FILE as JSON lines."),
    window: int = typer.Option(DEFAULT_WINDOW, "--window", min=1, max=65_535, help="Unconfirmed messages in flight."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
) -> None:
    s = settings()
    plan = Plan(users=users, events_per_user=events_per_user, event_type=event_type.value,
                start_user_id=start_user_id, delay_ms=delay_ms)
    if problems := plan.problems():
        fail("; ".join(problems), EXIT_CONFIG)
    if record is not None:
        _check_writable(record)
    topo = Topology.from_settings(s)
    out = err_console if as_json else console
    with operator_errors(s):
        store = Store.from_settings(s)
        try:
            if wait:
                store.ping()  # --wait reads the profiles: fail before the prompt, not after publishing
            products = _products(s, store, plan)
            _check_topology(s, topo)
            _confirm(out, plan.describe(exchange=topo.exchange, queue=topo.queue, broker=mask_url(s.rabbitmq_dsn)),
                     ask=not yes and sys.stdin.isatty(), as_json=as_json)
            baseline = {d["user_id"]: int(d.get("event_count") or 0)
                        for d in profile_counts(store, plan.user_ids)} if wait else {}
            run = _build(plan, products, as_json)
            result, lines = _publish(s, topo, run, window=window, record=record, as_json=as_json)
            if not as_json:
                _print_results(plan, run, result, record, lines)
            outcome = _wait(s, store, topo, run, result, baseline, wait_timeout, as_json) if wait else None
        finally:
            store.close()
    if as_json:
        print_json(_json(plan, window, topo, run, result, record, lines, outcome, wait_timeout))
    elif outcome is not None:
        _print_wait(outcome, wait_timeout)
    if result.error:
        err_console.print(f"[bold red]error:[/] {shown(result.error)}", highlight=False, soft_wrap=True)
    if outcome is not None and not outcome.completed:
        err_console.print(f"[bold red]error:[/] {shown(_timeout_line(outcome, wait_timeout))}",
                          highlight=False, soft_wrap=True)
    if result.failed or (outcome is not None and not outcome.completed):
        raise typer.Exit(EXIT_FAIL)


generate_test_events.__doc__ = GENERATE_HELP


# ---- checks -------------------------------------------------------------------------------------


def _confirm(out: Console, description: str, *, ask: bool, as_json: bool) -> None:
    """Show what will be published; when ``ask``, publish only on a yes (exit 1 otherwise)."""
    out.print(shown(description), highlight=False, soft_wrap=True)
    if ask and not typer.confirm("Publish?", err=as_json):
        out.print("aborted: nothing published", highlight=False)
        raise typer.Exit(EXIT_FAIL)


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        fail(f"--record {path}: is a directory", EXIT_CONFIG)
    if problem := record_problem(path):
        fail(f"--record {problem}", EXIT_CONFIG)
    if not parent.is_dir():
        fail(f"--record {path}: directory {parent} does not exist", EXIT_CONFIG)
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        fail(f"--record {path}: not writable", EXIT_CONFIG)


def _products(s: Settings, store: Store, plan: Plan) -> list[str]:
    if not plan.needs_products:
        return []
    products = product_pool(store, s.model, s.embedding_dimensions)
    if not products:
        fail(f"no product vectors for model {s.model} ({s.embedding_dimensions} dimensions) in "
             f"{s.mongodb_db}.product_embeddings, and {plan.event_type} events need products: import a catalog "
             "with `myshop products import examples/catalog.jsonl` (or use --event-type search)", EXIT_CONFIG)
    return products


def _check_topology(s: Settings, topo: Topology) -> None:
    conn = broker.connect(s.rabbitmq_dsn, name="myshop-generate")
    try:
        missing = broker.missing_objects(conn, topo)
    finally:
        with contextlib.suppress(pex.AMQPError, OSError):
            conn.close()
    if missing:
        verb = "does" if len(missing) == 1 else "do"
        fail(f"{' and '.join(missing)} {verb} not exist on {mask_url(s.rabbitmq_dsn)}: run `myshop setup-transports`",
             EXIT_CONFIG)


def _build(plan: Plan, products: list[str], as_json: bool) -> Run:
    """Synthesise the run (before publishing: not part of the publish duration)."""
    if as_json or plan.total < 20_000:
        return synthesize(plan, products)
    if console.is_terminal:
        with console.status(f"building {plan.total:,} events"):
            return synthesize(plan, products)
    console.print(f"building {plan.total:,} events", highlight=False)
    return synthesize(plan, products)


@contextlib.contextmanager
def _progress(as_json: bool, label: str, total: int) -> Iterator:
    """A rich progress bar on a terminal; plain lines (every 2 s) otherwise; nothing with --json.
    Yields ``update(done)``."""
    if as_json:
        yield lambda done: None
        return
    if console.is_terminal:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as progress:
            task = progress.add_task(label, total=total)
            yield lambda done: progress.update(task, completed=done)
        return
    last = [0.0]

    def update(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 2.0 or done >= total:
            last[0] = now
            console.print(f"{label}: {done:,}/{total:,}", highlight=False)

    yield update


def _publish(s: Settings, topo: Topology, run: Run, *, window: int, record: Path | None,
             as_json: bool) -> tuple[PublishResult, int]:
    try:
        recorder = Recorder(record) if record is not None else None
    except RecordRefused as exc:  # replaced since the check before the prompt
        fail(f"--record {exc}", EXIT_CONFIG)
    messages = run.messages

    def settled(i: int, ok: bool) -> None:
        if ok and recorder is not None:
            recorder.write(messages[i][0])

    def failed_over(line: str) -> None:  # a lost node: say where the run goes on
        err_console.print(f"[yellow]failover:[/] {shown(line)}", highlight=False, soft_wrap=True)

    def blocked(on: bool, reason: str) -> None:  # a resource alarm anywhere in the cluster: say so, do not freeze
        if on:
            err_console.print(f"[yellow]blocked:[/] RabbitMQ blocks publishing ({shown(reason)}: a memory or disk "
                              f"alarm, see rabbitmq-diagnostics alarms); waiting up to {BLOCKED_TIMEOUT_S}s",
                              highlight=False, soft_wrap=True, markup=True)
        else:
            err_console.print("unblocked: publishing again", highlight=False)

    try:
        with _progress(as_json, "publishing", len(messages)) as update:
            publisher = WindowedPublisher(
                s.rabbitmq_dsn, topo.exchange, topo.queue, window=window, delay_s=run.plan.delay_ms / 1000,
                name="myshop-generate", on_settled=settled, on_progress=update,
                progress_every=0.1 if console.is_terminal else 0.5, on_blocked=blocked, on_failover=failed_over,
            )
            result = publisher.run(messages)
    finally:
        if recorder is not None:
            recorder.close()
    return result, recorder.written if recorder is not None else 0


def _print_results(plan: Plan, run: Run, res: PublishResult, record: Path | None, lines: int) -> None:
    table = Table("metric", "value", title=f"generate-test-events (run {run.run_id})")
    table.add_row("published", f"{res.published:,}")
    failed = f"{res.failed:,}"
    if res.failed:
        parts = [f"{n:,} {what}" for what, n in (("nacked", res.nacked), ("returned (unroutable)", res.returned),
                                                  ("lost with the connection", res.lost), ("never sent", res.unsent))
                 if n]
        failed = f"[red]{failed}[/] ({', '.join(parts)})"
    table.add_row("failed", failed)
    if res.republished:
        table.add_row("nacked, sent again", f"{res.republished:,} (on {res.channels - 1} fresh channel(s))")
    if res.failovers:
        table.add_row("failover", f"{res.resent:,} republished after failover ({res.failovers} connection(s) lost; "
                      f"ended on {shown(res.brokers[-1])})")
    if res.blocked_s:
        table.add_row("blocked by an alarm", f"{res.blocked_s:.1f} s")
    table.add_row("duration", f"{res.duration_s:.3f} s")
    table.add_row("events/s", f"{res.rate:,.0f}" if res.rate else "-")
    table.add_row("ms/event", f"{res.ms_per_event:.3f}" if res.ms_per_event is not None else "-")
    table.add_row("by type", ", ".join(f"{t} {n:,}" for t, n in sorted(run.by_type.items())))
    table.add_row("broker", shown(res.broker))
    if record is not None:
        table.add_row("record", f"{shown(record)} ({lines:,} lines)")
    console.print(table)


# ---- --wait -------------------------------------------------------------------------------------


def _wait(s: Settings, store: Store, topo: Topology, run: Run, res: PublishResult, baseline: dict[str, int],
          timeout: float, as_json: bool) -> WaitOutcome:
    publish_end = res.started_at + res.duration_s
    usable = None
    if run.plan.needs_products:  # products deleted or unreadable since: the worker skips those events
        vectors, _ = store.product_vectors(run.used_products(), s.model, s.embedding_dimensions)
        usable = set(vectors)
    expected, unusable = expected_sent_times(run, lambda i: res.status[i] == OK, res.sent_at, usable)
    tracker = VisibilityTracker(expected, baseline)
    conn = broker.connect(s.rabbitmq_dsn, name="myshop-generate-wait")

    def queue_state() -> tuple[int, int] | None:
        try:
            return broker.queue_depth(conn, topo.queue)
        except (pex.AMQPError, OSError):
            return None

    if (state := queue_state()) is not None and state[1] == 0 and tracker.total:
        err_console.print(f"[yellow]warning:[/] no consumer on queue '{topo.queue}': the events are applied once "
                          "`myshop consume` runs", highlight=False, soft_wrap=True)
    try:
        with _progress(as_json, "profiles", tracker.total) as update:
            outcome = wait_visible(
                tracker, lambda ids: profile_counts(store, ids), publish_end=publish_end, timeout=timeout,
                queue_state=queue_state, on_poll=lambda t: update(t.observed),
            )
        if not outcome.completed:  # where the missing events are, for the give-up line
            outcome.queues = queue_counts(conn, topo, _management(s, conn))
    finally:
        with contextlib.suppress(pex.AMQPError, OSError):
            conn.close()
    outcome.unusable = unusable
    return outcome


def _management(s: Settings, conn) -> Management | None:
    """The management API of the broker ``conn`` reached, or None when it does not answer for it."""
    try:
        return for_connection(s.rabbitmq_management_url, s.rabbitmq_dsn, conn)
    except (ManagementError, pex.AMQPError, OSError):
        return None


def _print_wait(o: WaitOutcome, timeout: float) -> None:
    lat = o.summary()
    table = Table("metric", "value", title="--wait: profiles")
    table.add_row("events observed", f"{o.observed:,} of {o.expected:,}"
                  + (f" ({o.unusable:,} skipped: product without a usable vector)" if o.unusable else ""))
    table.add_row("drain time", f"{o.drain_s:.3f} s" if o.drain_s is not None else f"- (gave up after {timeout:g} s)")
    for p in ("p50", "p95", "p99", "max"):
        table.add_row(f"latency {p.upper() if p != 'max' else p}", f"{lat[p]:,.1f} ms" if lat[p] is not None else "-")
    table.add_row("poll interval", f"{DEFAULT_POLL_S * 1000:.0f} ms (latencies are upper bounds at this resolution)")
    if o.queue_ready is not None:
        table.add_row("queue", f"{o.queue_ready:,} ready, {o.consumers} consumer(s)")
    console.print(table)


def _timeout_line(o: WaitOutcome, timeout: float) -> str:
    where = where_missing(o.queues) if o.queues else "the queues could not be read (is RabbitMQ reachable?)"
    return f"gave up waiting after {timeout:g} s: {o.observed:,} of {o.expected:,} events are in the profiles; {where}"


def _json(plan: Plan, window: int, topo: Topology, run: Run, res: PublishResult, record: Path | None, lines: int,
          outcome: WaitOutcome | None, timeout: float) -> dict:
    return {
        "run_id": run.run_id,
        "plan": {"events": plan.total, "users": plan.users, "events_per_user": plan.events_per_user,
                 "event_type": plan.event_type, "start_user_id": plan.start_user_id, "delay_ms": plan.delay_ms,
                 "window": window},
        "exchange": topo.exchange,
        "queue": topo.queue,
        "broker": res.broker,
        "published": res.published,
        "failed": res.failed,
        "failures": {"nacked": res.nacked, "returned": res.returned, "lost": res.lost, "unsent": res.unsent},
        "failover": {"count": res.failovers, "republished": res.resent, "brokers": res.brokers},
        "error": res.error,
        "started_at": _iso(res.started_at),
        "duration_s": round(res.duration_s, 6),
        "events_per_s": None if res.rate is None else round(res.rate, 1),
        "ms_per_event": None if res.ms_per_event is None else round(res.ms_per_event, 4),
        "by_type": dict(sorted(run.by_type.items())),
        "record": None if record is None else {"path": str(record), "lines": lines},
        "wait": None if outcome is None else {
            "completed": outcome.completed,
            "timeout_s": timeout,
            "expected": outcome.expected,
            "observed": outcome.observed,
            "unusable": outcome.unusable,
            "drain_s": None if outcome.drain_s is None else round(outcome.drain_s, 3),
            "waited_s": round(outcome.waited_s, 3),
            "poll_interval_ms": round(DEFAULT_POLL_S * 1000),
            "publish_time": "sent",
            "latency_ms": outcome.summary(),
            "queue_ready": outcome.queue_ready,
            "consumers": outcome.consumers,
            "queues": None if outcome.queues is None else [q.as_json() for q in outcome.queues],
        },
    }


def _iso(epoch: float) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds") if epoch else None
