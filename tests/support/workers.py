"""Worker processes and broker/store probes for lifecycle tests and the benchmarks: real subprocesses, real services.

``WorkerProcess`` runs ``python -m myshop_ops consume ...`` with its stdout/stderr in files, so tests can
read its logs while it runs (no pipe to drain, no deadlock) and wait on conditions in them. The benchmarks
(benchmarks/common.py) start theirs with it too and measure them with ``wait_ready`` and ``reap`` (CPU from
os.wait4 rusage and /proc, resident memory); ``parse_summary`` reads the closing line for both.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pika

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.management import for_dsn
from myshop_ops.adapters.store import Store
from myshop_ops.tools.transports import Transports
from tests.support.events import stored_profile
from tests.support.services import ROOT, wait_for

CONSUME = (sys.executable, "-m", "myshop_ops", "consume")
CLK_TCK = os.sysconf("SC_CLK_TCK")

_SUMMARY = re.compile(
    r"stopped \((?P<reason>.*)\): (?P<processed>\d+) messages, (?P<applied>\d+) applied, "
    r"(?P<duplicate>\d+) duplicates, (?P<skipped>\d+) skipped, (?P<erased>\d+) erased, "
    r"(?P<retried>\d+) retried, "
    r"(?P<failed>\d+) failed, (?P<writes>\d+) profile writes"
)


@dataclass(frozen=True)
class Summary:
    """The worker's closing line on stdout."""

    reason: str
    processed: int
    applied: int
    duplicate: int
    skipped: int
    erased: int
    retried: int
    failed: int
    writes: int


def one_line(text: str) -> str:
    """Collapse whitespace: the console may wrap long lines of a non-terminal stdout at 80 columns."""
    return " ".join(text.split())


def parse_summary(stdout: str) -> Summary | None:
    m = _SUMMARY.search(one_line(stdout))
    if m is None:
        return None
    d = m.groupdict()
    return Summary(reason=d.pop("reason"), **{k: int(v) for k, v in d.items()})


def proc_cpu(pid: int) -> float | None:
    """utime + stime of a live process, seconds (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> float | None:
    """Resident memory of a live process, MB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class Reaped:
    """A worker process reaped by ``WorkerProcess.reap``: its exit, its CPU and memory, its output."""

    code: int
    wall_s: float  # ready (the ready marker seen) -> stop marker seen (-> exit when the marker was missed)
    cpu_total_s: float  # user + sys from os.wait4 (whole process life)
    cpu_start_s: float  # user + sys when the ready marker was seen (imports, connections, checks)
    cpu_stop_s: float | None  # user + sys when the stop marker was seen (exit and teardown follow)
    user_s: float
    sys_s: float
    maxrss_mb: float
    stdout: str
    stderr: str
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds since ready, MB), with sample_rss

    @property
    def cpu_steady_s(self) -> float:
        """CPU from ready to exit: the work, plus the shutdown."""
        return self.cpu_total_s - self.cpu_start_s

    @property
    def cpu_work_s(self) -> float | None:
        """CPU from ready to the stop marker: the work alone (no start-up, no interpreter teardown)."""
        return None if self.cpu_stop_s is None else self.cpu_stop_s - self.cpu_start_s


class WorkerProcess:
    """``myshop consume ARGS`` as a child process, output captured in files under ``log_dir``.

    ``program`` replaces ``myshop consume`` as what runs before ``args`` (the benchmarks' naive baseline worker).
    To measure a process, ``wait_ready`` then ``reap`` it, signalling it with ``send`` in between: ``signal``,
    ``alive``, ``returncode``, ``wait`` and ``kill`` may reap it, and os.wait4 then has no rusage left to read.
    ``sample_rss``: from ``wait_ready`` on, its resident memory is sampled every second (``Reaped.rss``).
    """

    def __init__(self, env: dict[str, str], args: Sequence[str], log_dir: Path, name: str, *,
                 program: Sequence[str] = CONSUME, sample_rss: bool = False):
        self.args = args
        self.name = name
        self.out_path = log_dir / f"{name}.stdout"
        self.err_path = log_dir / f"{name}.stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*program, *args],
                env=env, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            )
        self.started = time.monotonic()
        self.t_ready: float | None = None  # monotonic time and CPU when wait_ready saw the ready marker
        self.cpu_ready: float | None = None
        self.t_stop: float | None = None  # ... and when reap saw the stop marker
        self.cpu_stop: float | None = None
        self._sample = sample_rss
        self._rss: list[tuple[float, float]] = []
        self._sampler: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code; fails the test (with the worker's output) if it is still running after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s\n{self.describe()}") from None

    def summary(self) -> Summary:
        s = parse_summary(self.stdout)
        assert s is not None, f"{self.name}: no summary line\n{self.describe()}"
        return s

    def log_field(self, message: str, key: str) -> str | None:
        """A ``key=value`` field of the last console log line containing ``message``."""
        lines = [ln for ln in self.stderr.splitlines() if message in ln]
        m = re.search(rf"\b{re.escape(key)}=(\S+)", lines[-1]) if lines else None
        return m.group(1) if m else None

    def describe(self) -> str:
        return (f"--- {self.name} {' '.join(self.args)} rc={self.proc.poll()}\n"
                f"stdout:\n{self.stdout[-2000:]}\nstderr:\n{self.stderr[-4000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # ---- measuring: CPU and memory (the benchmarks) -------------------------------------------------

    def send(self, sig: int) -> None:
        """Signal the process without reaping it (``signal`` polls first, which reaps a process that has exited)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait_ready(self, marker: str = "consuming", timeout: float = 60.0) -> WorkerProcess:
        """Wait until ``marker`` is in its output (polled every 5 ms), noting the time and its CPU then; fails
        (killing it, unreaped) if it exits first or is not ready after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.stderr + self.stdout
            if marker in text:
                self.cpu_ready = proc_cpu(self.pid) or 0.0
                self.t_ready = time.monotonic()
                break
            if self.proc.returncode is not None or os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                raise AssertionError(f"{self.name} exited before it was ready:\n{self.describe()}")
            if time.monotonic() > deadline:
                self.send(signal.SIGKILL)
                raise AssertionError(f"{self.name} not ready after {timeout}s:\n{self.describe()}")
            time.sleep(0.005)
        if self._sample:
            self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
            self._sampler.start()
        return self

    def _sample_rss(self) -> None:
        assert self.t_ready is not None
        while True:
            mb = proc_rss_mb(self.pid)
            if mb is None or self.proc.returncode is not None:
                return
            self._rss.append((time.monotonic() - self.t_ready, mb))
            time.sleep(1.0)

    def reap(self, timeout: float = 600.0, stop_marker: str = "worker stopped") -> Reaped:
        """Wait for the process to exit and reap it with os.wait4 (its rusage is the CPU of this process alone);
        its CPU is also read from /proc when ``stop_marker`` appears on stderr. Killed after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        marker, text = stop_marker.encode(), b""
        with open(self.err_path, "rb") as err:
            while True:
                if self.cpu_stop is None:  # CPU at the stop marker, read from /proc before the process is gone
                    text = text[-len(marker):] + err.read()
                    if marker in text:
                        self.cpu_stop = proc_cpu(self.pid)
                        self.t_stop = time.monotonic()
                pid, status, ru = os.wait4(self.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    self.send(signal.SIGKILL)
                    pid, status, ru = os.wait4(self.pid, 0)
                    break
                time.sleep(0.005)
        t_end = time.monotonic()
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        if self._sampler is not None:
            self._sampler.join(timeout=2)
        return Reaped(
            code=self.proc.returncode,
            wall_s=(self.t_stop or t_end) - (self.t_ready or t_end),
            cpu_total_s=ru.ru_utime + ru.ru_stime,
            cpu_start_s=self.cpu_ready or 0.0,
            cpu_stop_s=self.cpu_stop,
            user_s=ru.ru_utime,
            sys_s=ru.ru_stime,
            maxrss_mb=ru.ru_maxrss / 1024,
            stdout=self.stdout,
            stderr=self.stderr,
            rss=list(self._rss),
        )


class Workers:
    """Starts worker processes for one test and kills whatever is left at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def start(self, env: dict[str, str], *args: str, name: str | None = None) -> WorkerProcess:
        w = WorkerProcess(env, args, self.log_dir, name or f"worker{len(self.started) + 1}")
        self.started.append(w)
        return w

    def cleanup(self) -> None:
        for w in self.started:
            w.kill()


# ---- broker ---------------------------------------------------------------------------------------


def prepare(settings: Settings) -> Topology:
    """Declare the topology on the settings' broker and create the database's indexes (the worker checks them)."""
    topo = Topology.from_settings(settings)
    conn = broker.connect(settings.rabbitmq_dsn)
    Transports(conn, for_dsn(settings.rabbitmq_management_url, settings.rabbitmq_dsn), topo).setup()
    conn.close()
    store = Store(settings.mongodb_url, settings.mongodb_db)
    store.setup_indexes()
    store.close()
    return topo


def remove_topology(dsn: str, topo: Topology) -> None:
    """Delete a test's queues, exchanges and policies (best effort: the test may have removed some itself)."""
    with contextlib.suppress(Exception):
        conn = broker.connect(dsn, name="test-cleanup")
        ch = conn.channel()
        for q in [*topo.queues(), f"{topo.queue}.migrating"]:
            ch.queue_delete(q)
        for x in (topo.exchange, topo.failed_exchange, topo.unrouted):
            ch.exchange_delete(x)
        conn.close()
    api = for_dsn(None, dsn)
    for policy in topo.policies():
        with contextlib.suppress(Exception):
            api.delete_policy(policy.name)


def failed_messages(settings: Settings, topo: Topology) -> list[tuple[pika.BasicProperties, bytes]]:
    """Take every message off the topology's failed queue: (properties, body) of each, in queue order."""
    conn = broker.connect(settings.rabbitmq_dsn)
    ch = conn.channel()
    out = []
    while True:
        method, props, body = ch.basic_get(topo.failed_queue, auto_ack=True)
        if method is None:
            break
        out.append((props, body))
    conn.close()
    return out


def queue_state(settings: Settings, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue`` by a passive declare."""
    conn = broker.connect(settings.rabbitmq_dsn)
    try:
        state = broker.queue_depth(conn, queue)
    finally:
        conn.close()
    assert state is not None, f"queue {queue} does not exist"
    return state


def wait_queue(settings: Settings, queue: str, *, messages: int | None = None, consumers: int | None = None,
               timeout: float = 10.0) -> tuple[int, int]:
    """Wait until the queue holds ``messages`` ready messages and/or has ``consumers`` consumers."""
    last: list[tuple[int, int]] = []

    def ok() -> bool:
        last[:] = [queue_state(settings, queue)]
        m, c = last[0]
        return (messages is None or m == messages) and (consumers is None or c == consumers)

    reached = wait_for(ok, timeout=timeout, interval=0.1, fail=False)
    assert reached, f"queue {queue}: (messages, consumers) = {last[0]}, wanted ({messages}, {consumers})"
    return last[0]


def rabbitmqctl(*args: str, timeout: float = 30) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


MANAGEMENT = os.environ.get("TEST_RABBITMQ_MANAGEMENT", "http://guest:guest@127.0.0.1:15672")


def management(method: str, path: str, body: dict | None = None) -> None:
    """One call to the RabbitMQ management API (vhosts are made there: a rabbitmqctl call takes ~0.5-2 s)."""
    url = urlsplit(MANAGEMENT)
    req = urllib.request.Request(
        f"{url.scheme}://{url.hostname}:{url.port}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"content-type": "application/json",
                 "authorization": "Basic " + base64.b64encode(f"{url.username}:{url.password}".encode()).decode()})
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


@contextlib.contextmanager
def private_vhost(base_dsn: str) -> Iterator[tuple[str, str]]:
    """A throw-away vhost (guest has every permission): yields (vhost, DSN without query).

    Tests that close connections or inspect them do it inside their own vhost, never touching other
    users of the shared broker.
    """
    vhost = "lc-" + uuid.uuid4().hex[:10]
    quoted = quote(vhost, safe="")
    management("PUT", f"/api/vhosts/{quoted}", {})
    try:
        management("PUT", f"/api/permissions/{quoted}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
        yield vhost, f"{base_dsn.rsplit('/', 1)[0]}/{quoted}"
    finally:
        with contextlib.suppress(Exception):
            management("DELETE", f"/api/vhosts/{quoted}")


def vhost_connections(vhost: str) -> list[dict]:
    """Connections of a vhost as rabbitmqctl reports them (name, timeout = negotiated heartbeat, ...)."""
    out = rabbitmqctl("-q", "list_connections", "name", "vhost", "timeout", "client_properties",
                      "--formatter", "json")
    return [c for c in json.loads(out or "[]") if c.get("vhost") == vhost]


# ---- store ----------------------------------------------------------------------------------------


def event_counts(settings: Settings) -> dict[str, int]:
    """event_count of every stored profile, by user id."""
    store = Store(settings.mongodb_url, settings.mongodb_db, timeout_ms=2000)
    try:
        return {d["user_id"]: d["event_count"] for d in store.users.find({}, {"user_id": 1, "event_count": 1})}
    finally:
        store.close()


def event_total(settings: Settings) -> int:
    return sum(event_counts(settings).values())


def check_profiles(settings: Settings, expected: dict, counts: dict[str, int] | None = None) -> dict[str, dict]:
    """Stored profiles equal the expected ones (vector, magnitude) and event counts are exact (not checked when
    ``counts`` is None); returns the stored documents by user id, for a test's further checks."""
    store = Store(settings.mongodb_url, settings.mongodb_db)
    try:
        docs = {d["user_id"]: d for d in store.users.find({}, {"_id": 0})}
    finally:
        store.close()
    assert set(docs) == set(expected)
    for user, exp in expected.items():
        doc = docs[user]
        got = stored_profile(settings, doc)
        assert np.max(np.abs(got.embedding - exp.embedding)) < 1e-5, user
        assert abs(doc["magnitude"] - exp.magnitude) <= 1e-5 * max(1.0, abs(exp.magnitude)), user
        if counts is not None:
            assert doc["event_count"] == counts[user], (user, doc["event_count"], counts[user])
            assert sum(doc["event_counts"].values()) == counts[user], user
    return docs
