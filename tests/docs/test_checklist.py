"""CHECKLIST.md and README.md name only `myshop` commands and options that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from myshop_ops.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["CHECKLIST.md", "README.md"]
_CODE = re.compile(r"`([^`\n]+)`|^(?:\$ )?(myshop .+)$", re.MULTILINE)


def invocations(text: str) -> list[str]:
    """Every `myshop ...` command line in inline code or in code blocks (one per line)."""
    found = []
    for inline, line in _CODE.findall(text):
        for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", inline or line):
            part = part.strip()
            if part.startswith("myshop "):
                found.append(part)
    return found


def is_group(cmd) -> bool:
    return hasattr(cmd, "commands")


def resolve(argv: list[str]):
    """The (click) command an argv names, and the rest of the argv (typer vendors click: duck-typed here)."""
    cmd = typer.main.get_command(app)
    rest = list(argv)
    while is_group(cmd) and rest and not rest[0].startswith("-"):
        sub = cmd.commands.get(rest[0])
        assert sub is not None, f"`myshop {' '.join(argv)}`: no command {rest[0]!r}"
        cmd, rest = sub, rest[1:]
    return cmd, rest


def options_of(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}


@pytest.mark.parametrize("doc", DOCS)
def test_every_myshop_command_and_option_in_the_docs_exists(doc):
    text = (ROOT / doc).read_text()
    calls = invocations(text)
    assert calls, f"{doc} names no myshop command"
    for call in calls:
        try:
            argv = shlex.split(call.replace("...", "").replace("[", " ").replace("]", " ").replace("|", " "))[1:]
        except ValueError:
            argv = call.split()[1:]
        cmd, rest = resolve(argv)
        assert not is_group(cmd) or set(rest) <= {"--help", "-h"}, f"{doc}: `{call}` names a group, not a command"
        unknown = {a.split("=")[0] for a in rest if a.startswith("-")} - options_of(cmd)
        assert not unknown, f"{doc}: `{call}` uses options {sorted(unknown)} that `myshop {cmd.name}` does not have"


def test_the_checker_catches_a_wrong_name():
    with pytest.raises(AssertionError):
        resolve(["no-such-command"])
    cmd, rest = resolve(["failed", "show", "--stats"])
    assert rest == ["--stats"] and cmd.name == "show"
    assert "--stats" in options_of(cmd) and "--nope" not in options_of(cmd)
