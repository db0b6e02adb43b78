"""The `myshop` command: every command of the SPEC, each in a thin module."""

from __future__ import annotations

import sys

import typer

from myshop_ops.cli import failed, generate, preflight, purge, setup, stats, verify, worker
from myshop_ops.cli.products import import_products
from myshop_ops.cli.recommend import recommend
from myshop_ops.cli.user import delete_user, show_user

app = typer.Typer(
    name="myshop",
    help="Operations toolkit and worker of the myshop user embeddings pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("consume", help=worker.CONSUME_HELP)(worker.consume)
app.command("stop-workers")(worker.stop_workers)
app.command("setup-transports")(setup.setup_transports)
app.command("setup-indexes")(setup.setup_indexes)
app.command("stats", help=stats.STATS_HELP)(stats.stats)
app.command("purge", help=purge.PURGE_HELP)(purge.purge)
app.command("preflight", help=preflight.PREFLIGHT_HELP)(preflight.run_preflight)
app.command("verify", help=verify.VERIFY_HELP)(verify.run_verify)
app.command("generate-test-events")(generate.generate_test_events)

failed_app = typer.Typer(help="List, retry and remove failed messages.", no_args_is_help=True)
user_app = typer.Typer(help="Inspect or erase one user's profile.", no_args_is_help=True)
products_app = typer.Typer(help="Manage product vectors.", no_args_is_help=True)
app.add_typer(failed_app, name="failed")
failed_app.command("show")(failed.show)
failed_app.command("retry")(failed.retry)
failed_app.command("remove")(failed.remove)
app.add_typer(user_app, name="user")
app.add_typer(products_app, name="products")
app.command("recommend")(recommend)
user_app.command("show")(show_user)
user_app.command("delete")(delete_user)
products_app.command("import")(import_products)


def optional_values(argv: list[str]) -> list[str]:
    """`--watch` may come without its SECONDS (click options always take a value): supply the default, 2."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--watch":
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            if not nxt.replace(".", "", 1).isdigit():
                out.append("2")
    return out


def main() -> None:
    app(args=optional_values(sys.argv[1:]), prog_name="myshop")
