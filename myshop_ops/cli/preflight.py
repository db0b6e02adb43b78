"""`myshop preflight`: run the pre-deployment checks and print PASS / WARN / FAIL with the fix."""

from __future__ import annotations

from collections import Counter

import typer

from myshop_ops.adapters import logs
from myshop_ops.base.exit_codes import EXIT_FAIL
from myshop_ops.cli.common import console, print_json, shown
from myshop_ops.tools import preflight

PREFLIGHT_HELP = """Pre-deployment checks: configuration (placeholders, guest/guest in prod), package versions,
MongoDB (reachable, indexes, product vectors), RabbitMQ (reachable, topology exactly as configured, bindings,
consumers, depth, failed), Redis (reachable, eviction policy), the embeddings provider (one real request; skipped
with --offline) and security (root, .env permissions, TLS in prod). Exit 1 on any FAIL.
--json prints {"ok": bool, "counts": {"PASS": n, ...}, "checks": [{"section", "name", "status", "detail", "fix"}]}."""

_STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}


def run_preflight(
    offline: bool = typer.Option(False, "--offline", help="Skip the real embeddings request."),
    as_json: bool = typer.Option(False, "--json", help="JSON output (see above)."),
) -> None:
    logs.setup("console", level=40)  # the checks report failures themselves; no library log lines in between
    checks = preflight.run(offline=offline)
    counts = Counter(c.status for c in checks)
    if as_json:
        print_json({"ok": not counts["FAIL"], "counts": dict(counts), "checks": [c.as_json() for c in checks]})
    else:
        show_checks(checks)
        console.print(", ".join(f"{counts[k]} {k}" for k in ("PASS", "WARN", "FAIL", "SKIP") if counts[k]),
                      highlight=False)
    if counts["FAIL"]:
        raise typer.Exit(EXIT_FAIL)


def show_checks(checks: list[preflight.Check]) -> None:
    """One line per check, and its fix under a WARN or FAIL. A check's text quotes outside systems (a consumer's
    connection name, a broker's error): shown escaped, never as markup."""
    for c in checks:
        console.print(f"[{_STYLE.get(c.status, 'bold')}]{shown(c.status):<4}[/] {shown(c.section):<9} "
                      f"{shown(c.name):<18} {shown(c.detail)}", highlight=False, soft_wrap=True)
        if c.fix and c.status in ("WARN", "FAIL"):
            console.print(f"{'':<34}fix: [bold]{shown(c.fix)}[/]", highlight=False, soft_wrap=True)
