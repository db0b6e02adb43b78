"""`myshop --help` lists one line per command (each command's whole text stays in its own --help)."""

from __future__ import annotations

import typer

from myshop_ops.cli.app import app, summary


def test_the_command_list_shows_one_sentence_per_command():
    root = typer.main.get_command(app)
    commands = [(name, cmd) for name, cmd in root.commands.items()]
    commands += [(f"{g} {n}", c) for g, grp in root.commands.items() for n, c in getattr(grp, "commands", {}).items()]
    for name, cmd in commands:
        short = cmd.get_short_help_str(limit=1000)
        assert short and "\n" not in short and len(short) <= 120, (name, short)
    preflight = root.commands["preflight"]
    assert preflight.get_short_help_str(limit=1000) == "Pre-deployment checks"
    assert "--json prints" in preflight.help  # the whole text is still the command's own help


def test_summary_is_the_first_sentence_on_one_line():
    assert summary("Do this. Then\nthat.") == "Do this"
    assert summary("Checks: a, b\n  and c") == "Checks"
    assert summary("One line") == "One line" and summary(None) is None
