"""CHECKLIST.md and README.md name only `myshop` commands and options that exist; CHECKLIST.md's quoted output
blocks are marked so that they are compared with what the commands print."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import typer

from myshop_ops.cli.app import app
from tests.support.checklist import mismatch, quoted_outputs
from tests.support.services import run_cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["CHECKLIST.md", "README.md", "docs/SHOP.md", "docs/HANDOVER.md"]
_FENCE = re.compile(r"^\s*```[^\n]*\n(.*?)^\s*```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`([^`\n]+)`")
_SEPARATORS = re.compile(r"\s*(?:&&|\|\||;|\bdo\b|\bthen\b)\s*")


def invocations(text: str) -> list[str]:
    """Every `myshop ...` command in inline code spans and in fenced code blocks (any line, after shell
    separators such as `&&`, `;` or `do`)."""
    snippets = [line for block in _FENCE.findall(text) for line in block.splitlines()]
    snippets += _INLINE.findall(_FENCE.sub("", text))
    found = []
    for snippet in snippets:
        for part in _SEPARATORS.split(snippet.split("#")[0]):
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
        assert not is_group(cmd) or set(rest) <= options_of(cmd), f"{doc}: `{call}` names a group, not a command"
        unknown = {a.split("=")[0] for a in rest if a.startswith("-")} - options_of(cmd)
        assert not unknown, f"{doc}: `{call}` uses options {sorted(unknown)} that `myshop {cmd.name}` does not have"


def test_invocations_are_found_in_code_blocks_and_after_separators():
    text = ("x `myshop stats --watch` y\n```sh\n  myshop purge q --force  # note\n"
            "for u in 1; do myshop user show $u; done\n```\n")
    assert invocations(text) == ["myshop purge q --force", "myshop user show $u", "myshop stats --watch"]


def test_the_checker_catches_a_wrong_name():
    with pytest.raises(AssertionError):
        resolve(["no-such-command"])
    cmd, rest = resolve(["failed", "show", "--stats"])
    assert rest == ["--stats"] and cmd.name == "show"
    assert "--stats" in options_of(cmd) and "--nope" not in options_of(cmd)


def test_every_quoted_output_block_is_marked_and_the_configuration_error_is_what_myshop_prints(tmp_path):
    """The supervisor test compares the other quoted outputs; this one needs no service: a bad value stops any
    command before it connects anywhere."""
    quoted = quoted_outputs((ROOT / "CHECKLIST.md").read_text())
    assert {"configuration-error", "setup-indexes", "products-import", "preflight", "stats"} <= set(quoted)
    settings = tmp_path / "myshop.env"
    settings.write_text("WORKER_MAX_RETRIES=42\n")
    done = run_cli("stats", env={"PATH": os.environ["PATH"], "MYSHOP_ENV_FILE": str(settings)})
    assert done.returncode == 2 and not done.stdout
    assert mismatch(*quoted["configuration-error"], done.stderr) is None, done.stderr


def test_the_output_comparison_catches_a_wrong_figure():
    quoted = ["│ a │ created │", "│ b │ created │", "(2 rows) 15 PASS, 1 WARN"]
    printed = "  │ a │ created │\n│ b │ created │\n│ c │ created │\n(2 rows) 15 PASS, 1 WARN\n"
    assert mismatch(quoted, False, printed) is not None  # a row more than quoted
    assert mismatch(quoted, True, printed) is None  # as an excerpt: in order, same last line
    assert mismatch(quoted, True, printed.replace("15 PASS", "21 PASS")) is not None
    assert mismatch(["x in 212 ms in=4.1/s out=- level=ok"], False, "x in 9 ms in=- out=- level=ok") is None
