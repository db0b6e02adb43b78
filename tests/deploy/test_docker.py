"""Dockerfile, .dockerignore and docker-compose.yml (Docker cannot run here): instructions, the healthcheck
against a real /healthz server, the compose services and that their settings are ones the code reads."""

from __future__ import annotations

import fnmatch
import json
import re
import socket
import subprocess
import sys

import pytest
import yaml
from prometheus_client import CollectorRegistry

from myshop_ops.adapters.config import load_settings
from tests.deploy.common import ROOT, assert_cli_accepts, run, settings_variables, which

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
MYSHOP_SERVICES = ("setup", "worker", "metrics")
REQUIRED_ENV = ("APP_ENV", "RABBITMQ_DSN", "RABBITMQ_MANAGEMENT_URL", "MONGODB_URL", "REDIS_URL", "EMBEDDING_PROVIDER",
                "OPENAI_API_KEY", "LOG_FORMAT")


# ------------------------------------------------------------------------------------------ Dockerfile

def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, logical = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def instruction(name: str) -> list[str]:
    return [args for keyword, args in instructions() if keyword == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), f"not an exec form: {args}"
    return value


def test_base_image_entrypoint_and_install():
    assert instruction("FROM") == ["python:3.11-slim"]
    assert exec_form(instruction("ENTRYPOINT")[-1]) == ["myshop"]
    assert any(re.search(r"\bpip install \.(\s|$)", run_) for run_ in instruction("RUN"))
    assert_cli_accepts(exec_form(instruction("CMD")[-1]))


def test_runs_as_a_non_root_user():
    users = instruction("USER")
    assert users, "no USER: the worker would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert any("useradd" in r and user in r for r in instruction("RUN")), f"user {user} is never created"


def test_stopsignal_is_sigterm():
    assert instruction("STOPSIGNAL") == ["SIGTERM"]


def test_copied_sources_exist_and_are_not_ignored():
    """What `pip install .` needs is in the build context: pyproject.toml, its readme and the package."""
    ignored = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    copied = []
    for args in instruction("COPY"):
        copied += [a for a in args.split()[:-1] if not a.startswith("--")]
    assert {"pyproject.toml", "README.md", "myshop_ops"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        excluded = [p for p in ignored if not p.startswith("!") and fnmatch.fnmatch(source, p.rstrip("/"))]
        assert not excluded, f"{source} is excluded from the build context by .dockerignore {excluded}"
    for secret in (".env", ".venv", ".git"):
        assert secret in ignored


def _healthcheck_argv() -> tuple[list[str], str]:
    (args,) = instruction("HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    assert "--interval" in options and "--timeout" in options
    return exec_form(command), options


def test_healthcheck_probes_healthz_on_the_port_cmd_serves():
    argv, _ = _healthcheck_argv()
    cmd = exec_form(instruction("CMD")[-1])
    port = cmd[cmd.index("--metrics-port") + 1]
    assert f"127.0.0.1:{port}/healthz" in " ".join(argv)


@pytest.mark.parametrize("healthy, expected", [(True, 0), (False, 1)])
def test_healthcheck_command_against_the_real_endpoint(healthy, expected):
    """The HEALTHCHECK command exits 0 on /healthz 200 and non-zero on 503, against myshop's own server."""
    from myshop_ops.adapters.metrics import serve

    class Target:
        registry = CollectorRegistry()

        def health(self):
            return healthy, {}

        def readiness(self):
            return healthy, {}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(Target(), port, host="127.0.0.1")
    try:
        argv, _ = _healthcheck_argv()
        argv = [sys.executable if a == "python" else a.replace(":9300/", f":{port}/") for a in argv]
        assert subprocess.run(argv, capture_output=True, timeout=30).returncode == expected
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------- compose

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str, host_env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR-default}` with the given host environment."""
    env = host_env or {}

    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        assert op is None, f"unsupported interpolation {m.group(0)}"
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(:-|-)?([^}]*)\}", sub, str(value))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_backing_services_have_healthchecks(compose):
    services = compose["services"]
    expected = {"rabbitmq": ("rabbitmq:3.13-management", ["rabbitmq-diagnostics", "-q", "ping"]),
                "mongo": ("mongo:7", ["mongosh"]),
                "redis": ("redis:7", ["redis-cli", "ping"])}
    for name, (image, probe) in expected.items():
        service = services[name]
        assert service["image"] == image
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1:1 + len(probe)] == probe, f"{name}: {test}"
    assert "ping" in " ".join(services["mongo"]["healthcheck"]["test"])
    command = services["redis"]["command"]
    command = command if isinstance(command, list) else command.split()
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_setup_runs_once_after_the_backing_services(compose):
    setup = compose["services"]["setup"]
    script = " ".join(setup["entrypoint"] + setup["command"])
    assert "myshop setup-transports && myshop setup-indexes" in script
    assert {name: d["condition"] for name, d in setup["depends_on"].items()} == {
        "rabbitmq": "service_healthy", "mongo": "service_healthy", "redis": "service_healthy"}
    assert setup.get("restart", "no") == "no"
    assert_cli_accepts(["setup-transports"])
    assert_cli_accepts(["setup-indexes"])


def _duration(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value))


def test_three_worker_replicas_stop_gracefully(compose):
    worker = compose["services"]["worker"]
    assert worker["deploy"]["replicas"] == 3
    command = worker["command"]
    assert command[0] == "consume"
    assert command[command.index("--metrics-port") + 1] == "9300"
    assert command[command.index("--memory-limit") + 1] == "512M"
    assert_cli_accepts(command)
    assert _duration(worker["stop_grace_period"]) >= 150
    assert worker["restart"] == "unless-stopped"  # exit 0 (planned stops) must be restarted
    assert worker["depends_on"] == {"setup": {"condition": "service_completed_successfully"}}
    assert "container_name" not in worker and "ports" not in worker, "replicas cannot share a name or host port"


def test_metrics_exporter_service(compose):
    metrics = compose["services"]["metrics"]
    assert metrics["command"] == ["stats", "--serve-metrics", "9300"]
    assert_cli_accepts(metrics["command"])
    assert metrics["depends_on"]["setup"]["condition"] == "service_completed_successfully"


def test_myshop_services_set_only_settings_the_code_reads(compose, monkeypatch):
    read = settings_variables(monkeypatch)
    for name in MYSHOP_SERVICES:
        env = environment(compose["services"][name])
        unknown = sorted(set(env) - read)
        assert not unknown, f"{name} sets {unknown}, which no setting reads (typo?)"
        missing = [v for v in REQUIRED_ENV if v not in env]
        assert not missing, f"{name} does not set {missing}"


@pytest.mark.parametrize("host_env, provider", [
    ({}, "hash"),
    ({"EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test-0123456789abcdef"}, "openai"),
])
def test_compose_settings_load(compose, host_env, provider):
    """With the compose defaults (an offline try) or an OpenAI key from the host, the settings are valid."""
    for name in MYSHOP_SERVICES:
        env = {k: interpolate(v, host_env) for k, v in environment(compose["services"][name]).items()}
        settings = load_settings(env=env, env_file=None)
        assert settings.embedding_provider == provider
        assert settings.rabbitmq_dsn.startswith("amqp://") and "@rabbitmq:5672" in settings.rabbitmq_dsn
        assert "mongo:27017" in settings.mongodb_url and "redis:6379" in settings.redis_url
        assert settings.log_format == "json"


def test_compose_file_validates_with_docker_compose():
    """The Compose tool's own schema check (needs no daemon), when a Compose CLI is installed."""
    if which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        argv = ["docker", "compose"]
    elif which("docker-compose"):
        argv = ["docker-compose"]
    else:
        pytest.skip("no docker compose / docker-compose CLI installed")
    result = run([*argv, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env={"PATH": "/usr/bin:/bin:/usr/local/bin"})
    assert result.returncode == 0, result.stderr
