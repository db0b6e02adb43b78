"""What every command shares: settings, one-line operator errors with documented exit codes, the console."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import NoReturn

import typer
from pika.exceptions import AMQPError
from pymongo.errors import PyMongoError
from rich.console import Console
from rich.text import Text

from myshop_ops.adapters import logs
from myshop_ops.adapters.broker import BrokerError
from myshop_ops.adapters.config import ConfigError, Settings, load_settings, redact
from myshop_ops.adapters.dedup import RedisError
from myshop_ops.adapters.failures import one_line
from myshop_ops.adapters.management import ManagementError
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_FAIL, EXIT_UNAVAILABLE
from myshop_ops.base.printable import printable


def _console(stderr: bool = False) -> Console:
    """A console; into a pipe or a file (no terminal, no COLUMNS) 200 columns wide, so that tables keep their
    headers and ids whole instead of rich's default 80. No emoji codes: data's ``:smile:`` stays text (markup
    has an escape, emoji codes have none)."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, width=200 if piped else None, emoji=False)


console = _console()
err_console = _console(stderr=True)


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    """One line on stderr and exit ``code``. The message is text, never markup (it may quote data), and every
    secret in it is masked (it may quote a library's exception or a provider's reply: config.redact)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", printable(redact(message))), highlight=False,
                      soft_wrap=True)
    raise typer.Exit(code)


def shown(value: object) -> str:
    """Data (an id, a name, an error message, a body) for a rich f-string or table cell: secrets masked
    (config.redact), control characters escaped, markup escaped, so it is displayed as written and never styles,
    links or breaks the output. Total: any value, any text."""
    text = printable(redact(value if isinstance(value, str) else str(value)))
    body = text.rstrip("\\")
    escaped = _BRACKETS.sub(_escape_bracket, body)
    if body == text:
        return escaped
    # backslashes at the end would escape (or, doubled as rich's escape does, halve before) a tag the caller puts
    # next: doubled, then an empty tag of our own, they show as written whatever follows
    return escaped + "\\" * (2 * (len(text) - len(body))) + "[dim][/dim]"


# every "[" with the backslashes before it; group 2 is a whole tag when the "[" opens one (rich's own pattern)
_BRACKETS = re.compile(r"(\\*)(\[[a-z#/@][^[]*?]|\[)")


def _escape_bracket(match: re.Match) -> str:
    """rich reads n backslashes before a tag as n // 2 backslashes and an escape when n is odd (rich.markup.escape
    writes 2n + 1), and takes one backslash from before any other "[" ("\\[" is "["): n + 1 shows n."""
    slashes, bracket = match.groups()
    n = len(slashes)
    return "\\" * (2 * n + 1 if len(bracket) > 1 else n + 1) + bracket


def settings(*, embeds: bool = False) -> Settings:
    """Load and validate settings, or stop with exit code 2 and one line naming the variable. ``embeds``: the
    command calls the embeddings provider (only then is OPENAI_API_KEY required)."""
    try:
        s = load_settings(embeds=embeds)
    except ConfigError as exc:
        fail(f"configuration: {exc}", EXIT_CONFIG)
    logs.setup(s.log_format, level=s.log_level.upper())
    return s


@contextlib.contextmanager
def operator_errors(s: Settings, log: logging.Logger | None = None) -> Iterator[None]:
    """Turn dependency failures into one line (which service, which address, what to do) and exit code 3.
    ``log``: with LOG_FORMAT=json the line is an error record of this logger instead (a worker's output stays
    JSON lines)."""
    def stop(message: str, code: int) -> NoReturn:
        if log is None or s.log_format != "json":
            fail(message, code)
        log.error("cannot start: %s", message, extra={"exit_code": code})
        raise typer.Exit(code)

    try:
        yield
    except ConfigError as exc:
        stop(f"configuration: {exc}", EXIT_CONFIG)
    except (BrokerError, ManagementError) as exc:
        stop(str(exc), EXIT_UNAVAILABLE)
    except (PyMongoError, RedisError, AMQPError) as exc:
        stop(one_line(exc, s), EXIT_UNAVAILABLE)


def print_json(data: object) -> None:
    """``data`` as indented JSON on stdout, every secret masked (config.redact knows their JSON-escaped forms)."""
    sys.stdout.write(redact(json.dumps(data, default=str, indent=2)) + "\n")
