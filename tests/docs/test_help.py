"""Every command's --help as an operator's terminal shows it (80 and 120 columns): flags without a value column,
paragraphs wrapped to the terminal (no line broken before a word that would have fit), no internal names, every
--json with its schema, one line per command in the command lists; and README's command table lists every option
of every command."""

from __future__ import annotations

import itertools
import re

import pytest
import typer
from typer.testing import CliRunner

from myshop_ops.cli.app import app
from tests.docs.test_checklist import ROOT, is_group

WIDTHS = (80, 120)
_INTERNAL = re.compile(r"\b(?:myshop_ops|[a-z_]+\.[A-Z][A-Z_]{2,})\b")  # a module, or module.CONSTANT
_PANEL_TOP = re.compile(r"^╭─ (\w[\w ]*) ─")


def commands(cmd=None, path=()) -> list[tuple[tuple[str, ...], object]]:
    """(argv, click command) of the app, every group and every command."""
    cmd = cmd or typer.main.get_command(app)
    found = [(path, cmd)]
    for name, sub in getattr(cmd, "commands", {}).items():
        found += commands(sub, (*path, name))
    return found


def render(argv: tuple[str, ...], width: int) -> list[str]:
    done = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": str(width)})
    assert done.exit_code == 0, done.output
    return done.output.splitlines()


def description(lines: list[str]) -> list[list[str]]:
    """The help's paragraphs (between the usage line and the first panel), each a list of its rendered lines."""
    start = next(i for i, x in enumerate(lines) if x.strip().startswith("Usage:")) + 1
    end = next((i for i, x in enumerate(lines) if x.startswith("╭")), len(lines))
    paragraphs, current = [], []
    for line in lines[start:end]:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            paragraphs.append(current)
            current = []
    return paragraphs + ([current] if current else [])


def panel(lines: list[str], title: str) -> list[str]:
    start = next((i for i, x in enumerate(lines) if (m := _PANEL_TOP.match(x)) and m.group(1).strip() == title), None)
    if start is None:
        return []
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("╰"))
    return lines[start + 1:end]


def ragged(paragraph: list[str], width: int) -> list[str]:
    """Lines broken although the next word would have fitted: a line is a padding column and its text, which
    wraps at ``width`` - 2 columns (one padding column each side)."""
    return [line for line, nxt in itertools.pairwise(paragraph)
            if (len(line) - 1) + 1 + len(nxt.split()[0]) <= width - 2]


@pytest.mark.parametrize("width", WIDTHS)
def test_every_help_renders_cleanly(width):
    problems = []
    for argv, _ in commands():
        lines = render(argv, width)
        text = "\n".join(lines)
        name = " ".join(("myshop", *argv))
        if "<bool>" in text:
            problems.append(f"{name}: a flag shows <bool> as its value")
        if m := _INTERNAL.search(text):
            problems.append(f"{name}: internal name {m.group(0)!r}")
        for paragraph in description(lines):
            if bad := ragged(paragraph, width):
                problems.append(f"{name}: ragged line {bad[0].strip()!r}")
        for row in panel(lines, "Options"):
            if re.match(r"│ (--[\w-]+)\s+(-\w\s+)?<bool>", row):
                problems.append(f"{name}: {row}")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_ragged_lines_and_bool_values():
    assert ragged([" Levels: warn above 1000 ready, critical", " above 5000."], 80)
    assert not ragged([" " + "x" * 73, " above"], 80) and ragged([" " + "x" * 72, " above"], 80)
    assert _INTERNAL.search("never read whole (catalog.MAX_LINE_BYTES)")
    assert not _INTERNAL.search("exits 2 (the variable's name, e.g. WORKER_MAX_RETRIES)")


@pytest.mark.parametrize("width", (100, 120))
def test_the_command_lists_show_one_line_per_command(width):
    for argv, cmd in commands():
        if not is_group(cmd):
            continue
        rows = panel(render(argv, width), "Commands")
        assert rows, f"myshop {' '.join(argv)} --help lists no command"
        wrapped = [r for r in rows if r.startswith("│ ") and not r[2:3].strip()]
        assert not wrapped, f"myshop {' '.join(argv)} --help at {width} columns: a description wraps: {wrapped}"


def test_every_json_option_has_its_schema_in_the_help():
    missing = [" ".join(argv) for argv, cmd in commands()
               if not is_group(cmd) and any("--json" in p.opts for p in cmd.params)
               and not re.search(r"--json prints[^{]*\{", " ".join((cmd.help or "").split()))]
    assert not missing, f"--json without its schema in --help: {missing}"


def readme_table() -> dict[str, set[str]]:
    """`myshop ...` command (`stats`, `failed show`) -> the options README's command table names for it."""
    section = (ROOT / "README.md").read_text().split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    groups = {name for argv, cmd in commands() if is_group(cmd) and len(argv) == 1 for name in argv}
    found: dict[str, set[str]] = {}
    for row in (x for x in section.splitlines() if x.startswith("| `myshop")):
        for span in re.findall(r"`(myshop [^`]+)`", row.split(" | ")[0]):
            words = span.replace("\\|", " ").replace("[", " ").replace("]", " ").split()[1:]
            name = " ".join(words[:2]) if words[0] in groups else words[0]
            found.setdefault(name, set()).update(w.split("=")[0] for w in words if w.startswith("--"))
    return found


def test_the_readme_command_table_lists_every_command_and_option():
    table = readme_table()
    problems = []
    for argv, cmd in commands():
        if is_group(cmd):
            continue
        name = " ".join(argv)
        options = {o for p in cmd.params for o in p.opts if o.startswith("--")}
        if name not in table:
            problems.append(f"`myshop {name}` is not in README's command table")
        elif missing := options - table[name]:
            problems.append(f"`myshop {name}`: README's command table misses {sorted(missing)}")
    assert not problems, "\n".join(problems)
