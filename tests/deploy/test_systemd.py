"""systemd units: `systemd-analyze verify` and `security`, the directives the worker's lifecycle relies on,
and the ExecStart shell line run for real (port arithmetic, exec keeps the main PID, instance names)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.common import INSTALLED_MYSHOP, ROOT, assert_cli_accepts, myshop_args, run, which

UNITS = ROOT / "systemd"
WORKER = UNITS / "myshop-worker@.service"
TARGET = UNITS / "myshop-worker.target"
METRICS = UNITS / "myshop-metrics.service"
SERVICES = (WORKER, METRICS)

HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "LockPersonality": "yes",
    "RestrictRealtime": "yes", "SystemCallArchitectures": "native", "CapabilityBoundingSet": "",
}

SYSTEMD_ANALYZE = which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian: apt-get install systemd)")


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values in order (keys may repeat; an empty assignment resets the list)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    logical = ""
    for raw in path.read_text().splitlines():
        line = logical + raw.strip()
        if line.endswith("\\"):
            logical = line[:-1] + " "
            continue
        logical = ""
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, _, value = line.partition("=")
        values = current.setdefault(key.strip(), [])
        if value.strip() == "" and key.strip() != "CapabilityBoundingSet":
            values.clear()
        values.append(value.strip())
    return sections


def one(unit: dict, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def seconds(value: str) -> float:
    """A systemd time span ("150", "2min 30s", "1h") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


# ------------------------------------------------------------------------------------------- verify

def _installable_copy(tmp_path: Path) -> Path:
    """The units in a temp dir, with the installed myshop path pointing at this checkout's venv (verify checks
    that ExecStart binaries exist)."""
    myshop = ROOT / ".venv" / "bin" / "myshop"
    if not myshop.exists():
        myshop = Path(sys.executable).with_name("myshop")
    assert myshop.exists(), "the myshop console script is not installed in this venv"
    for unit in UNITS.iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_MYSHOP, str(myshop)))
    return tmp_path


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(tmp_path):
    units = _installable_copy(tmp_path)
    names = ["myshop-worker@1.service", "myshop-worker@2.service", "myshop-worker.target", "myshop-metrics.service"]
    result = run([SYSTEMD_ANALYZE, "verify", "--man=no", *(str(units / n) for n in names)], cwd=units)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if str(units) in line or "myshop" in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == [], "systemd-analyze verify complains about our units:\n" + "\n".join(ours)


@needs_systemd_analyze
def test_systemd_analyze_verify_catches_mistakes(tmp_path):
    """The check above is not vacuous: a misspelled directive is reported."""
    units = _installable_copy(tmp_path)
    worker = units / WORKER.name
    worker.write_text(worker.read_text().replace("TimeoutStopSec=", "TimeoutStopSecs="))
    result = run([SYSTEMD_ANALYZE, "verify", "--man=no", str(units / "myshop-worker@1.service")], cwd=units)
    assert "Unknown key 'TimeoutStopSecs'" in result.stdout + result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", ["myshop-worker@1.service", "myshop-metrics.service"])
def test_security_exposure_stays_low(tmp_path, unit):
    units = _installable_copy(tmp_path)
    if run([SYSTEMD_ANALYZE, "security", "--help"]).stdout.find("--offline") < 0:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    # --threshold is in tenths: 20 = an exposure of 2.0 ("OK"); the units score 1.5 today
    result = run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", "--no-pager", str(units / unit)],
                 cwd=units)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


# ---------------------------------------------------------------------------------------- directives

def test_worker_lifecycle_directives():
    unit = parse_unit(WORKER)
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert seconds(one(unit, "Service", "WatchdogSec")) == 60
    assert one(unit, "Service", "Restart") == "always"
    assert seconds(one(unit, "Service", "RestartSec")) == 5
    assert "2" in one(unit, "Service", "RestartPreventExitStatus").split()
    # start limits belong to [Unit] (in [Service] systemd ignores them with a warning)
    assert one(unit, "Unit", "StartLimitBurst") == "5"
    assert seconds(one(unit, "Unit", "StartLimitIntervalSec")) == 3600
    assert "StartLimitBurst" not in unit["Service"] and "StartLimitIntervalSec" not in unit["Service"]
    assert seconds(one(unit, "Service", "TimeoutStopSec")) >= 150  # the longest batch is ~100 s
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert one(unit, "Service", "KillMode") in ("mixed", "main")
    assert one(unit, "Unit", "PartOf") == "myshop-worker.target"
    assert one(unit, "Install", "WantedBy") == "myshop-worker.target"


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_service_user_settings_and_hardening(path):
    unit = parse_unit(path)
    assert one(unit, "Service", "User") not in ("root", "0")
    assert one(unit, "Service", "Group") not in ("root", "0")
    assert one(unit, "Service", "EnvironmentFile") == "/etc/myshop/myshop.env"
    assert one(unit, "Service", "WorkingDirectory") == "/opt/myshop-ops"
    for key, value in HARDENING.items():
        assert one(unit, "Service", key) == value, f"{path.name}: {key}={value} expected"
    assert "ReadWritePaths" not in unit["Service"], "the services write nothing: no ReadWritePaths"
    assert "2" in one(unit, "Service", "RestartPreventExitStatus").split()


def test_target_wants_three_workers_and_the_exporter():
    target = parse_unit(TARGET)
    wants = " ".join(target["Unit"]["Wants"]).split()
    assert {"myshop-worker@1.service", "myshop-worker@2.service", "myshop-worker@3.service"} <= set(wants)
    assert "myshop-metrics.service" in wants
    assert one(target, "Install", "WantedBy") == "multi-user.target"


def test_metrics_service_runs_the_exporter_on_9300():
    unit = parse_unit(METRICS)
    assert one(unit, "Service", "Type") == "simple"
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[0] == INSTALLED_MYSHOP
    args = myshop_args(argv)
    assert args == ["stats", "--serve-metrics", "9300"]
    assert_cli_accepts(args)


# ------------------------------------------------------------------------------ ExecStart for real

FAKE_MYSHOP = """#!{python}
import json, os, sys
with open(os.environ["FAKE_MYSHOP_OUT"], "w") as f:
    json.dump({{"pid": os.getpid(), "argv": sys.argv[1:]}}, f)
"""


def _exec_start(instance: str, fake: Path) -> list[str]:
    """ExecStart= of an instance as systemd runs it: %i expanded, `$$` a literal `$`, systemd's quoting."""
    line = one(parse_unit(WORKER), "Service", "ExecStart")
    line = re.sub(r"%[iI]", instance, line).replace("%%", "%")
    return [a.replace("$$", "$").replace(INSTALLED_MYSHOP, str(fake)) for a in shlex.split(line)]


@pytest.fixture
def fake_myshop(tmp_path) -> Path:
    fake = tmp_path / "myshop"
    fake.write_text(FAKE_MYSHOP.format(python=sys.executable))
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("instance, port", [("1", 9301), ("2", 9302), ("3", 9303), ("12", 9312)])
def test_exec_start_gives_instance_n_port_9300_plus_n_and_execs(tmp_path, fake_myshop, instance, port):
    out = tmp_path / "out.json"
    argv = _exec_start(instance, fake_myshop)
    assert argv[:2] == ["/bin/sh", "-c"]
    proc = subprocess.Popen(argv, env={**os.environ, "FAKE_MYSHOP_OUT": str(out)})
    assert proc.wait(timeout=30) == 0
    seen = json.loads(out.read_text())
    assert seen["pid"] == proc.pid, "the shell must exec the worker: systemd's main PID is the worker"
    assert seen["argv"] == ["consume", "--memory-limit", "512M", "--time-limit", "3600", "--metrics-port", str(port)]
    assert_cli_accepts(seen["argv"])


@pytest.mark.parametrize("instance", ["foo", "1a", "x-2"])
def test_exec_start_refuses_an_instance_that_is_not_a_number(tmp_path, fake_myshop, instance):
    out = tmp_path / "out.json"
    result = run(_exec_start(instance, fake_myshop), env={**os.environ, "FAKE_MYSHOP_OUT": str(out)})
    assert result.returncode == 2  # RestartPreventExitStatus=2: not restarted in a loop
    assert "must be a number" in result.stderr
    assert not out.exists()
