"""Helpers shared by the deployment-file tests: paths, the metric-name contract, PromQL metric extraction,
CLI argument checks and the settings' variable names."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import typer

from myshop_ops.adapters import config
from myshop_ops.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
INSTALLED_MYSHOP = "/opt/myshop-ops/.venv/bin/myshop"

# The metric names of the contract (issue 5): a worker's, then the exporter's (`myshop stats --serve-metrics`).
COUNTERS = ("messenger_processed_messages_total", "myshop_retries_total", "myshop_dead_lettered_total",
            "myshop_duplicates_total", "myshop_version_conflicts_total", "myshop_provider_requests_total",
            "myshop_provider_errors_total")
HISTOGRAMS = ("messenger_processing_time_seconds", "myshop_queue_wait_seconds", "myshop_provider_request_seconds",
              "myshop_batch_size")
GAUGES = ("myshop_worker_ready", "myshop_publish_blocked", "process_start_time_seconds",
          "messenger_queue_depth", "myshop_queue_unacked", "myshop_queue_consumers", "myshop_failed_queue_messages",
          "myshop_queue_members", "myshop_queue_members_online", "myshop_rabbitmq_alarm")
ALLOWED_METRICS = frozenset(
    [*COUNTERS, *GAUGES, *(h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")), "up"])

# ---------------------------------------------------------------------------------------------------- PromQL

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_GRAFANA_VARS = re.compile(r"\$\{?\w+\}?")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                       "bool", "offset", "atan2", "inf", "nan"})


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: every bare identifier that is not a function or aggregation
    (followed by ``(``), a keyword, a label name (inside ``{...}`` or a ``by (...)`` list), a string, a
    duration or a Grafana variable."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _LABEL_LISTS.sub("", text)  # `sum by (le) (x)` -> `sum  (x)`: sum stays a function call
    text = _GRAFANA_VARS.sub("", text)
    return {m.group(1) for m in _IDENTIFIER.finditer(text)
            if not m.group(2) and m.group(1).lower() not in _KEYWORDS}


# ------------------------------------------------------------------------------------------------------- CLI

def cli_command(args: Sequence[str]) -> tuple[object, list[str], list[str]]:
    """The command object that ``myshop ARGS`` runs, its path (e.g. ["failed", "show"]) and its own arguments."""
    cmd = typer.main.get_command(app)
    path, rest = [], list(args)
    while getattr(cmd, "commands", None) and rest and rest[0] in cmd.commands:
        path.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    assert path, f"`myshop {' '.join(args)}`: no such command"
    return cmd, path, rest


def assert_cli_accepts(args: Sequence[str]) -> list[str]:
    """Parse ``myshop ARGS`` with the real CLI definition (options, types, ranges) without running it;
    returns the command path."""
    cmd, path, rest = cli_command(args)
    try:
        cmd.make_context("myshop " + " ".join(path), rest)
    except Exception as exc:  # typer's (vendored) click UsageError and friends
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise AssertionError(f"`myshop {' '.join(args)}` is refused by the CLI: {message}") from None
    return path


def myshop_args(argv: Sequence[str]) -> list[str]:
    """The arguments after the myshop executable in a command line."""
    for i, a in enumerate(argv):
        if a == "myshop" or a.endswith("/myshop"):
            return list(argv[i + 1:])
    raise AssertionError(f"no myshop executable in {argv}")


# ---------------------------------------------------------------------------------------------- settings

class _Recording(dict):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def settings_variables(monkeypatch) -> set[str]:
    """Every environment variable ``load_settings`` reads, recorded while it loads a valid configuration
    (a grep of config.py would miss names built in loops or f-strings, e.g. EVENT_WEIGHT_<TYPE>)."""
    recording = _Recording(APP_ENV="dev", EMBEDDING_PROVIDER="hash")
    monkeypatch.setattr(config, "merged_env", lambda env=None, env_file=None: recording)
    config.load_settings(env={}, env_file=None)
    assert {"RABBITMQ_DSN", "MONGODB_URL", "REDIS_URL", "APP_ENV"} <= recording.read, (
        "load_settings no longer reads through merged_env: update settings_variables")
    return recording.read


def which(tool: str) -> str | None:
    return shutil.which(tool)


def run(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, **kwargs)
