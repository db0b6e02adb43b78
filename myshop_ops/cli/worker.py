"""`myshop consume` and `myshop stop-workers`."""

from __future__ import annotations

import logging
import os

import typer

from myshop_ops.adapters.config import mask_url
from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.metrics import DEFAULT_HOST, Metrics, serve
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_UNAVAILABLE
from myshop_ops.cli.common import console, fail, operator_errors, settings
from myshop_ops.core.limits import Limits, parse_size
from myshop_ops.core.worker import Worker

CONSUME_HELP = """Consume shop events and fold them into user profiles.

Exit codes: 0 planned stop (limit, signal, stop-workers), 1 unexpected crash,
2 configuration error, 3 a dependency unreachable at start."""


def consume(
    queue: str = typer.Argument(None, help="Queue to consume (default RABBITMQ_QUEUE)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Stop after this many messages."),
    time_limit: float = typer.Option(None, "--time-limit", min=1, help="Stop after this many seconds."),
    memory_limit: str = typer.Option(None, "--memory-limit", help="Stop when RSS exceeds this (e.g. 512M)."),
    failure_limit: int = typer.Option(None, "--failure-limit", min=1, help="Stop after this many failed messages."),
    prefetch: int = typer.Option(200, "--prefetch", min=1, max=5000, help="Messages delivered ahead = max batch."),
    metrics_port: int = typer.Option(None, "--metrics-port", min=1, max=65535,
                                     help="Serve /metrics, /healthz and /readyz on this port."),
    metrics_host: str = typer.Option(DEFAULT_HOST, "--metrics-host", envvar="MYSHOP_METRICS_HOST",
                                     help="Address the metrics port binds (0.0.0.0: every interface, for a remote "
                                          "scraper; the container image sets it)."),
    allow_root: bool = typer.Option(False, "--allow-root", envvar="MYSHOP_ALLOW_ROOT",
                                    help="Run even as root (containers that cannot drop privileges)."),
) -> None:
    if os.geteuid() == 0 and not allow_root:
        fail("refusing to consume as root: run as a service user (the systemd unit uses User=myshop) "
             "or pass --allow-root (MYSHOP_ALLOW_ROOT=1)", EXIT_CONFIG)
    s = settings(embeds=True)
    try:
        memory = parse_size(memory_limit) if memory_limit else None
    except ValueError as exc:
        fail(f"--memory-limit: {exc}", EXIT_CONFIG)
    limits = Limits(messages=limit, seconds=time_limit, memory_bytes=memory, failures=failure_limit)
    limits.install_signal_handlers()  # a SIGTERM during the start-up checks is a planned stop too
    metrics = Metrics() if metrics_port else None
    if metrics:
        try:
            serve(metrics, metrics_port, metrics_host)
        except OSError as exc:
            fail(f"--metrics-port {metrics_port} on {metrics_host}: {exc.strerror or exc} "
                 "(another worker on this port? give each its own)",
                 EXIT_CONFIG)
    with operator_errors(s, log=logging.getLogger("myshop_ops.worker")):
        worker = Worker(s, queue=queue, prefetch=prefetch, limits=limits, observer=metrics)
        worker.check_dependencies()
    code = worker.run()
    t = worker.totals
    if s.log_format == "console":  # with JSON logs the "worker stopped" line says it: no plain line among them
        console.print(
            f"stopped ({limits.reason}): {t.processed} messages, {t.applied} applied, {t.duplicate} duplicates, "
            f"{t.skipped} skipped, {t.erased} erased, {t.retried} retried, {t.failed} failed, "
            f"{t.writes} profile writes",
            highlight=False,
            soft_wrap=True,
        )
    raise typer.Exit(code)


consume.__doc__ = CONSUME_HELP


def stop_workers() -> None:
    """Ask every running worker to exit after its current batch.

    Workers started later are not affected. Under systemd or supervisor the workers are started again at once:
    there it is a rolling restart, not a stop (systemctl stop myshop-worker.target, supervisorctl stop
    'myshop-worker:*' stop them).
    """
    s = settings()
    try:
        RedisState.from_settings(s).request_stop()
    except Exception as exc:
        fail(f"Redis at {mask_url(s.redis_url)} unreachable: {exc} (is it running? check REDIS_URL)", EXIT_UNAVAILABLE)
    console.print("stop requested: workers exit after their current batch")
