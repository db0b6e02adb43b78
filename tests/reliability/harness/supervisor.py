"""The workers of a scenario: K ``myshop consume`` processes kept running as systemd ``Restart=always`` would.

A :class:`Supervisor` starts the workers, restarts one as soon as it dies, sends the test's signals (kill -9,
SIGTERM) and tells those deaths (:class:`Death`) from crashes, stops them all with SIGTERM at the end (each
must exit 0) and sums their closing lines; :func:`halt_all` kills whatever a failed test left running.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tests.support.services import wait_for
from tests.support.workers import WorkerProcess, Workers, parse_summary


@dataclass
class Death:
    name: str
    pid: int
    code: int
    cause: str  # "kill" (SIGKILL by the test), "term" (SIGTERM by the test), "crash" (anything else)


_LIVE: list[Supervisor] = []


def halt_all() -> None:
    """Stop supervising and kill every worker of every supervisor still running (test teardown)."""
    while _LIVE:
        _LIVE.pop().halt()


class Supervisor:
    """K ``myshop consume`` processes, each restarted as soon as it dies (systemd ``Restart=always``)."""

    def __init__(self, workers: Workers, env: dict[str, str], args: Sequence[str], k: int,
                 metrics_ports: Sequence[int] = ()):
        self.workers = workers
        self.env = env
        self.args = tuple(args)
        self.metrics_ports = tuple(metrics_ports)  # slot i serves /metrics and /readyz on metrics_ports[i]
        self.slots: list[WorkerProcess] = []
        self.generation = [0] * k
        self.all: list[WorkerProcess] = []
        self.deaths: list[Death] = []
        self.restarts = 0
        self.kills = 0  # signals sent by the test
        self._signalled: dict[int, str] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        for slot in range(k):
            self.slots.append(self._spawn(slot))
        self._thread.start()
        _LIVE.append(self)

    def halt(self) -> None:
        """No more restarts; kill whatever runs."""
        self._stopping.set()
        self._thread.join(5)
        for w in self.all:
            w.kill()

    def _spawn(self, slot: int) -> WorkerProcess:
        self.generation[slot] += 1
        port = ("--metrics-port", str(self.metrics_ports[slot])) if slot < len(self.metrics_ports) else ()
        w = self.workers.start(self.env, *self.args, *port, name=f"w{slot}-{self.generation[slot]}")
        self.all.append(w)
        return w

    def _watch(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                for slot, w in enumerate(self.slots):
                    code = w.returncode
                    if code is None or self._stopping.is_set():
                        continue
                    self.deaths.append(Death(w.name, w.pid, code, self._signalled.get(w.pid, "crash")))
                    self.slots[slot] = self._spawn(slot)
                    self.restarts += 1
            time.sleep(0.05)

    def consuming(self) -> list[WorkerProcess]:
        """Live workers attached to the queue (their signal handlers are installed), not signalled yet."""
        with self._lock:
            return [w for w in self.slots if w.alive() and w.pid not in self._signalled and "consuming" in w.stderr]

    def wait_consuming(self, n: int | None = None, timeout: float = 60) -> None:
        n = len(self.slots) if n is None else n
        wait_for(lambda: len(self.consuming()) >= n, timeout=timeout, interval=0.1,
                 what=f"{n} workers consuming\n{self.describe()}")

    def signal_one(self, sig: int, rng: random.Random, *, consuming_only: bool = False,
                   min_age: float = 0.0) -> WorkerProcess | None:
        """Send ``sig`` to a random live worker (consuming, started ``min_age`` seconds ago or more); None when
        none qualifies right now."""
        with self._lock:
            pool = self.consuming() if consuming_only else [w for w in self.slots if w.alive()]
            pool = [w for w in pool if time.monotonic() - w.started >= min_age]
            pool = [w for w in pool if w.pid not in self._signalled]  # never twice: a second signal exits at once
            if not pool:
                return None
            w = rng.choice(pool)
            self._signalled[w.pid] = "kill" if sig == signal.SIGKILL else "term"
            w.signal(sig)
            self.kills += 1
            return w

    def stop(self, timeout: float = 60) -> dict[str, int]:
        """SIGTERM every worker once it is consuming (a SIGTERM during the imports kills a process with the
        default action, as it would under systemd), no more restarts; their exit codes by name."""
        self._stopping.set()
        self._thread.join(5)
        codes = {}
        with self._lock:
            for w in self.slots:
                if w.pid not in self._signalled:
                    wait_for(lambda w=w: not w.alive() or "consuming" in w.stderr, timeout=timeout, interval=0.05,
                             what=f"{w.name} consuming before the stop\n{w.describe()}")
                    if w.alive():
                        self._signalled[w.pid] = "stop"
                        w.signal(signal.SIGTERM)
            for w in self.slots:
                codes[w.name] = w.wait(timeout)
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)
        return codes

    def crashes(self) -> list[Death]:
        return [d for d in self.deaths if d.cause == "crash" or (d.cause == "term" and d.code != 0)]

    def describe(self, last: int = 3) -> str:
        return "\n".join(w.describe() for w in self.all[-last:])

    def totals(self) -> dict[str, int]:
        """Sums over every worker's closing line (killed ones have none) and its conflict count."""
        out = {"processed": 0, "applied": 0, "duplicate": 0, "retried": 0, "failed": 0, "conflicts": 0}
        for w in self.all:
            s = parse_summary(w.stdout)
            if s is None:
                continue
            for k in ("processed", "applied", "duplicate", "retried", "failed"):
                out[k] += getattr(s, k)
            out["conflicts"] += int(w.log_field("worker stopped", "conflicts") or 0)
        return out
