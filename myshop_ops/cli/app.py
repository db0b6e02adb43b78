"""The `myshop` command: every command of the SPEC, each in a thin module.

A command's module is imported only when that command runs (or for the top-level help), so `myshop consume`
starts without importing what `myshop recommend` or `myshop generate-test-events` need.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import traceback
from typing import NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from myshop_ops.adapters.config import ENV_FILE_VAR, redact
from myshop_ops.adapters.release import version
from myshop_ops.base.exit_codes import EXIT_FAIL

# command -> (module in myshop_ops.cli, function, the module's help text constant or None for the docstring)
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "consume": ("worker", "consume", "CONSUME_HELP"),
    "stop-workers": ("worker", "stop_workers", None),
    "setup-transports": ("setup", "setup_transports", None),
    "messenger-config": ("setup", "messenger_config", None),
    "setup-indexes": ("setup", "setup_indexes", None),
    "stats": ("stats", "stats", "STATS_HELP"),
    "purge": ("purge", "purge", "PURGE_HELP"),
    "preflight": ("preflight", "run_preflight", "PREFLIGHT_HELP"),
    "verify": ("verify", "run_verify", "VERIFY_HELP"),
    "generate-test-events": ("generate", "generate_test_events", None),
    "recommend": ("recommend", "recommend", None),
}
GROUPS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "failed": ("List, retry and remove failed messages.",
               {"show": ("failed", "show"), "retry": ("failed", "retry"), "remove": ("failed", "remove")}),
    "user": ("Inspect or erase one user's profile.",
             {"show": ("user", "show_user"), "delete": ("user", "delete_user")}),
    "products": ("Manage product vectors.", {"import": ("products", "import_products")}),
    "model": ("Move the profiles to another embeddings model while the workers run.",
              {"start": ("model", "start"), "run": ("model", "run"), "status": ("model", "status"),
               "switch": ("model", "switch"), "rollback": ("model", "rollback"), "finish": ("model", "finish")}),
    "unrouted": ("List and republish messages that matched no binding of the main exchange.",
                 {"show": ("unrouted", "show"), "republish": ("unrouted", "republish")}),
}


class _FlagsShowNoValue:
    """Typer's help shows a flag's type (``<bool>``) in the column of an option's value, as if it took one; an
    empty metavar shows nothing there (the help option included: it is a param only once asked for)."""

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class Command(_FlagsShowNoValue, TyperCommand):
    """A `myshop` command."""


class Group(_FlagsShowNoValue, TyperGroup):
    """`myshop` and its command groups."""


def paragraphs(text: str | None) -> str | None:
    """Help text as paragraphs rich wraps to the terminal: the lines of each paragraph (blank-line separated)
    joined, since rich keeps a source line break and wraps around it into ragged lines. A paragraph starting
    with ``\\b`` keeps its lines."""
    if not text:
        return text
    blocks = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(b if b.startswith("\b") else " ".join(b.split()) for b in blocks)


def build(only: str | None = None) -> typer.Typer:
    """The app with every command, or with the one command or group ``only`` names."""
    app = typer.Typer(
        name="myshop",
        help="Operations toolkit and worker of the myshop user embeddings pipeline.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        cls=Group,
    )
    app.callback()(_root)  # a group even with one command registered: `myshop consume ...` keeps its name
    for name, (module, function, help_name) in COMMANDS.items():
        if only in (None, name):
            mod = importlib.import_module(f"myshop_ops.cli.{module}")
            fn = getattr(mod, function)
            text = getattr(mod, help_name) if help_name else fn.__doc__
            app.command(name, cls=Command, help=paragraphs(text), short_help=summary(text))(fn)
    for name, (help_text, commands) in GROUPS.items():
        if only in (None, name):
            group = typer.Typer(help=help_text, no_args_is_help=True, cls=Group)
            for sub, (module, function) in commands.items():
                fn = getattr(importlib.import_module(f"myshop_ops.cli.{module}"), function)
                group.command(sub, cls=Command, help=paragraphs(fn.__doc__), short_help=summary(fn.__doc__))(fn)
            app.add_typer(group, name=name)
    return app


def summary(text: str | None) -> str | None:
    """The first sentence of a command's help, on one line: the command list shows it (the whole text is the
    command's own --help)."""
    if not text:
        return None
    flat = " ".join(text.split())
    end = re.search(r"[.:;](\s|$)", flat)
    first = flat[:end.start()] if end else flat
    if len(first) > 100 and first.endswith(")") and " (" in first:
        first = first[:first.index(" (")]  # the parenthetical is for the command's own help
    return first


def _show_version(value: bool) -> None:
    if value:
        print(f"myshop-ops {version()}")
        raise typer.Exit()


def _root(
    env_file: str = typer.Option(None, "--env-file", metavar="PATH",
                                 help="Settings file of KEY=value lines, under the environment (default: "
                                      "MYSHOP_ENV_FILE, else /etc/myshop/myshop.env if it exists; never ./.env)."),
    _version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                  help="Print the installed release (myshop-ops VERSION) and exit."),
) -> None:
    """Options of every command (the app's help text is Typer's ``help``)."""
    if env_file is not None:
        os.environ[ENV_FILE_VAR] = env_file  # load_settings reads it, and so do the processes a command starts


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # the whole app (tests walk every command); `main` builds only what the argv names
        return build()
    raise AttributeError(name)


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


def crashed(exc: BaseException) -> NoReturn:
    """An unexpected crash: its traceback on stderr with every secret masked (an exception may quote a provider's
    or a database's reply), exit 1 as Python's own handler would."""
    sys.stderr.write(redact("".join(traceback.format_exception(exc))))
    sys.exit(EXIT_FAIL)


def main() -> None:
    argv = optional_values(sys.argv[1:])
    rest = argv[2:] if argv[:1] == ["--env-file"] else argv[1:] if argv[:1] and argv[0].startswith("--env-file=") \
        else argv
    first = rest[0] if rest else None
    try:
        build(first if first in COMMANDS or first in GROUPS else None)(args=argv, prog_name="myshop")
    except Exception as exc:  # typer's own excepthook would print it as is
        crashed(exc)
