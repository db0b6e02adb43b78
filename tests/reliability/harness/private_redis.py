"""A private Redis for the tests that stop and start it: :class:`PrivateRedis`.

A throw-away ``redis-server`` on a free port of its own, without persistence, so a test can kill it (the
workers' dedup store gone) and start it again without touching the shared Redis other suites use.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import redis as redis_lib

from tests.support.services import free_port, wait_for


class PrivateRedis:
    """A throw-away ``redis-server`` (no persistence) on its own port: stopped and started by the test."""

    def __init__(self, log_dir: Path, port: int | None = None):
        self.port = port or free_port()
        self.log_path = log_dir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis_lib.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            wait_for(lambda: self._ping(client), timeout=20, what=f"redis-server on {self.port}")
        finally:
            client.close()

    def _ping(self, client) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()[-2000:]
        try:
            return bool(client.ping())
        except redis_lib.RedisError:
            return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        self.proc = None
