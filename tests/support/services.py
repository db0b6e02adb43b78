"""Real services for tests and benchmarks: their addresses, the Mongo-wire server as a child process, per-test
names, free ports, condition waits, `myshop` as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pymongo import MongoClient

ROOT = Path(__file__).resolve().parents[2]
MONGO_PYTHON = Path(os.environ.get("MONGO_WIRE_PYTHON", ROOT / ".venv-mongo" / "bin" / "python"))
MONGO_SCRIPT = ROOT / "tools" / "mongo_wire_server.py"
RABBIT = os.environ.get("TEST_RABBITMQ_DSN", "amqp://guest:guest@127.0.0.1:5672/%2f")
REDIS_SERVER = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
DIMS = 64  # small vectors keep the Mongo-wire server fast; the math is dimension-independent
DEFAULT, GENERATE, RELIABILITY, LIFECYCLE = range(4)  # what a test's Redis database is for
_PROCESS = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def redis_url(purpose: int = DEFAULT) -> str:
    """This pytest process's Redis database for ``purpose``: the lifecycle tests' stop-workers flag and the
    generate and reliability workers stay apart from every other test's workers. Parallel pytest processes
    (pytest-xdist) get four databases each (0-3, 4-7, 8-11), so they never share processed ids or a flag either;
    database 15 is the benchmarks'."""
    if _PROCESS > 2:
        raise RuntimeError("at most 3 parallel pytest processes (`-n 3`): Redis databases 0-11 are the tests'")
    return f"{REDIS_SERVER}/{_PROCESS * 4 + purpose}"


def forget_keys(prefix: str, urls: list[str] | None = None) -> int:
    """Delete the Redis keys under ``prefix`` (one test's or one benchmark's: never anybody else's) in ``urls``
    (default: this pytest process's databases); returns how many."""
    import redis

    deleted = 0
    for url in urls or [redis_url(p) for p in (DEFAULT, GENERATE, RELIABILITY, LIFECYCLE)]:
        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(prefix + "*", count=2000))
            for i in range(0, len(keys), 5000):
                deleted += client.delete(*keys[i:i + 5000])
        finally:
            client.close()
    return deleted


def wait_for(
    condition: Callable[[], object], timeout: float = 20.0, interval: float = 0.05, what: str = "", fail: bool = True
) -> object:
    """Poll ``condition`` until it returns something truthy; after ``timeout`` seconds fail the test
    (or return the last falsy value when ``fail`` is False)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            if not fail:
                return value
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a metrics endpoint, a server of the test's own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, env: dict[str, str], timeout: float = 120, input: str | None = None):
    """Run `myshop ...` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "myshop_ops", *args],
        env=env, capture_output=True, text=True, timeout=timeout, input=input, cwd=ROOT,
    )


class MongoWire:
    """mongoeco's wire server in its own Python 3.13 venv, on a free port (or a given one).

    ``engine="sqlite"`` with a ``path`` keeps the data in that file across kill/restart (slow: a few hundred
    documents per collection at most); the default memory engine starts empty on every start.
    """

    def __init__(self, log_path: Path, port: int = 0, *, engine: str = "memory", path: Path | None = None):
        if engine not in ("memory", "sqlite"):
            raise ValueError(f"engine must be memory or sqlite, not {engine!r}")
        if engine == "sqlite" and path is None:
            raise ValueError("the sqlite engine needs a path")
        self.log_path = log_path
        self.port = port
        self.engine = engine
        self.path = path
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> str:
        if not MONGO_PYTHON.exists():
            raise RuntimeError(f"{MONGO_PYTHON} missing: run `make .venv-mongo` (Python 3.13 + mongoeco[wire])")
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        cmd = [str(MONGO_PYTHON), str(MONGO_SCRIPT), "--port", str(self.port)]
        if self.engine != "memory":
            cmd += ["--engine", self.engine, "--path", str(self.path)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mongo-wire server exited: {self.log_path.read_text()[-2000:]}")
            m = re.findall(r"READY (\S+)", self.log_path.read_text())
            if m and (self.port == 0 or f":{self.port}/" in m[-1]):
                self.url = m[-1]
                self.port = int(re.search(r":(\d+)/", self.url).group(1))
                client = MongoClient(self.url, serverSelectionTimeoutMS=500)
                try:
                    client.admin.command("ping")
                    return self.url
                except Exception:
                    pass
                finally:
                    client.close()
            time.sleep(0.1)
        raise RuntimeError("mongo-wire server did not become ready in time")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> str:
        """Stop and start again on the same port (the memory engine starts empty)."""
        self.stop()
        return self.start()
