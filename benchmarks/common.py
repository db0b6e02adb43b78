"""Shared plumbing of the benchmarks: an isolated environment per run, prefilling, worker subprocesses with their
CPU (os.wait4 rusage; the process wrapper and the summary parser are tests/support/workers.py's, shared with the
tests), metrics scraping, medians, rows of the result table.

Every run gets its own queue names (``bench-<hex>.events`` / ``.failed``), its own database (``bench<hex>``) and
Redis database ``BENCH_REDIS_DB`` (15: the test suites use 0-11, so a ``stop-workers`` flag set by a
suite never stops a benchmark worker); all of it is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import pika
from pymongo import MongoClient
from pymongo.errors import AutoReconnect

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from myshop_ops.adapters import broker  # noqa: E402
from myshop_ops.adapters.broker import H_PUBLISHED_AT, Topology  # noqa: E402
from myshop_ops.adapters.config import Settings, load_settings  # noqa: E402
from myshop_ops.adapters.embeddings import HashProvider  # noqa: E402
from myshop_ops.adapters.management import for_dsn  # noqa: E402
from myshop_ops.adapters.publisher import PublishResult, WindowedPublisher  # noqa: E402
from myshop_ops.adapters.store import Store  # noqa: E402
from myshop_ops.tools.generate import Plan, Run, synthesize  # noqa: E402
from myshop_ops.tools.transports import Transports  # noqa: E402
from tests.support.services import forget_keys  # noqa: E402
from tests.support.workers import Reaped, WorkerProcess, parse_summary, remove_topology  # noqa: E402

RABBIT = os.environ.get("BENCH_RABBITMQ_DSN", "amqp://guest:guest@127.0.0.1:5672/%2f")
MONGO = os.environ.get("BENCH_MONGODB_URL", "mongodb://127.0.0.1:27017/?directConnection=true")
BENCH_REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "15"))
REDIS = os.environ.get("BENCH_REDIS_URL", f"redis://127.0.0.1:6379/{BENCH_REDIS_DB}")
DIMS = int(os.environ.get("BENCH_DIMENSIONS", "1536"))
PRODUCTS = 300  # product vectors seeded per run
START_TIMEOUT = 60.0
T = TypeVar("T")


def retry_store(fn: Callable[[], T], what: str, attempts: int = 6) -> T:
    """``fn()`` again after a pymongo connection error: the shared Mongo-wire server sometimes stalls for more than
    pymongo's 5 s heartbeat under the box's load, and pymongo then cancels the operations in flight."""
    for attempt in range(attempts):
        try:
            return fn()
        except AutoReconnect as exc:
            if attempt == attempts - 1:
                raise
            log(f"{what}: {type(exc).__name__} ({exc}); again in 2 s")
            time.sleep(2)
    raise AssertionError("unreachable")


# ---- the result table ---------------------------------------------------------------------------


@dataclass
class Row:
    """One figure of the table: ours, its baseline measured in the same run, their ratio, the target."""

    bench: str
    metric: str
    value: float | None
    baseline: float | None = None
    baseline_label: str = ""
    target: str = ""
    met: bool | None = None
    unit: str = ""
    digits: int = 0
    note: str = ""
    runs: list = field(default_factory=list)  # every repetition's value (the figure is their median)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    def cells(self) -> list[str]:
        ratio = self.ratio
        return [
            self.bench,
            self.metric,
            fmt(self.value, self.digits, self.unit),
            (fmt(self.baseline, self.digits, self.unit) + (f" ({self.baseline_label})" if self.baseline_label else ""))
            if self.baseline is not None else "-",
            f"{ratio:.2f}x" if ratio is not None else "-",
            self.target or "-",
            {True: "MET", False: "NOT MET", None: "-"}[self.met],
        ]


def fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".strip()


def table(rows: Sequence[Row], title: str = "") -> str:
    head = ["benchmark", "metric", "ours (median)", "baseline (same run)", "ratio", "target", "status"]
    body = [r.cells() for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    out = [title] if title else []
    out += [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(b) for b in body)]
    notes = [f"- {r.bench} / {r.metric}: {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def save(name: str, rows: Sequence[Row], extra: dict | None = None) -> Path:
    """Write the rows (with every repetition) to .run/bench/<name>.json; returns the path."""
    out = ROOT / ".run" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    doc = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": [{**vars(r), "ratio": r.ratio} for r in rows],
           **(extra or {})}
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path


def report(name: str, rows: Sequence[Row], title: str) -> None:
    """What a benchmark script does with its rows when run alone: save them, print the table."""
    save(name, rows)
    print(table(rows, title))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- an isolated environment ---------------------------------------------------------------------


class BenchEnv:
    """Queue names, database and environment of one benchmark run; ``close()`` deletes all of it."""

    def __init__(self, label: str = "bench", **overrides: str):
        self.tag = f"{label}{uuid.uuid4().hex[:10]}"
        self.env = {
            "APP_ENV": "test",
            "RABBITMQ_DSN": RABBIT,
            "RABBITMQ_QUEUE": f"bench-{self.tag}.events",
            "RABBITMQ_FAILED_QUEUE": f"bench-{self.tag}.failed",
            "RABBITMQ_QUEUE_TYPE": "quorum",
            "MONGODB_URL": MONGO,
            "MONGODB_DB": self.tag,
            "REDIS_URL": REDIS,
            "REDIS_KEY_PREFIX": f"{self.tag}:",  # the benchmark deletes its own keys only, never a deployment's
            "EMBEDDING_PROVIDER": "hash",
            "EMBEDDING_DIMENSIONS": str(DIMS),
            "LOG_FORMAT": "console",
            "LOG_LEVEL": "info",
            "MYSHOP_ALLOW_ROOT": "1",
            **overrides,
        }
        self.settings: Settings = load_settings(env=self.env, env_file=None)
        self.topology = Topology.from_settings(self.settings)
        self.products: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))

    def subprocess_env(self, **overrides: str) -> dict[str, str]:
        env = {**os.environ, **self.env, **overrides, "PYTHONPATH": str(ROOT), "COLUMNS": "400"}
        env.pop("NOTIFY_SOCKET", None)
        return env

    def setup(self, products: int = PRODUCTS) -> BenchEnv:
        """Declare the topology (``setup-transports``), create the indexes (``setup-indexes``), seed products."""
        conn = broker.connect(RABBIT, name="bench-setup")
        try:
            Transports(conn, for_dsn(None, RABBIT), self.topology).setup()
        finally:
            conn.close()
        store = Store(MONGO, self.settings.mongodb_db)
        try:
            retry_store(store.setup_indexes, "setup-indexes")
            if products:
                hp = HashProvider(DIMS, self.settings.model)
                ids = [f"p{i:05d}" for i in range(products)]
                docs = [{"product_id": pid, "embedding": hp.embed_one(f"product {pid} item"),
                         "model": self.settings.model, "dimensions": DIMS, "name": f"Product {pid}",
                         "category": "bench"} for pid in ids]
                retry_store(lambda: store.upsert_products(docs, self.settings.store_layout), "seeding products")
                self.products = ids
        finally:
            store.close()
        return self

    def synthesize(self, users: int, events_per_user: int, start_user_id: int = 100_000,
                   seed: int | None = None) -> Run:
        return synthesize(Plan(users=users, events_per_user=events_per_user, start_user_id=start_user_id),
                          self.products, seed=seed)

    def publish(self, messages: Sequence[tuple[bytes, str]], *, window: int = 1000, stamp: bool = False,
                delay_s: float = 0.0) -> PublishResult:
        """Publish through the product's WindowedPublisher (``stamp``: ensure x-published-at, StampedPublisher)."""
        cls = StampedPublisher if stamp else WindowedPublisher
        pub = cls(RABBIT, self.topology.exchange, self.topology.queue, window=window, delay_s=delay_s,
                  name="bench-publisher")
        res = pub.run(messages)
        if res.failed:
            raise RuntimeError(f"prefill: {res.failed} of {res.total} messages not published ({res.error})")
        return res

    def queue_depth(self) -> int:
        conn = broker.connect(RABBIT, name="bench-depth")
        try:
            state = broker.queue_depth(conn, self.topology.queue)
            return state[0] if state else 0
        finally:
            conn.close()

    def wait_depth(self, n: int, timeout: float = 60.0) -> None:
        """Wait until the main queue holds ``n`` ready messages (publisher confirms precede queue visibility)."""
        deadline = time.monotonic() + timeout
        while (depth := self.queue_depth()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"queue holds {depth} of {n} prefilled messages after {timeout}s")
            time.sleep(0.05)

    def purge(self) -> None:
        conn = broker.connect(RABBIT, name="bench-purge")
        try:
            for q in self.topology.queues():
                with contextlib.suppress(Exception):
                    broker.purge(conn, q)
        finally:
            conn.close()

    def store(self) -> Store:
        return Store(MONGO, self.settings.mongodb_db)

    def event_count_total(self) -> int:
        client = MongoClient(MONGO, serverSelectionTimeoutMS=5000)
        users = client[self.settings.mongodb_db]["user_embeddings"]
        try:
            return retry_store(lambda: sum(int(d.get("event_count") or 0) for d in users.find(
                {}, {"event_count": 1, "_id": 0}, batch_size=500)), "counting events")
        finally:
            client.close()

    def reset_data(self) -> None:
        """Drop profiles and this run's Redis keys between repetitions (products and queues stay)."""
        client = MongoClient(MONGO, serverSelectionTimeoutMS=5000)
        try:
            retry_store(lambda: client[self.settings.mongodb_db]["user_embeddings"].delete_many({}), "reset")
        finally:
            client.close()
        clear_redis(self.settings.redis_prefix)

    def close(self) -> None:
        remove_topology(RABBIT, self.topology)
        with contextlib.suppress(Exception):
            client = MongoClient(MONGO, serverSelectionTimeoutMS=2000)
            client.drop_database(self.settings.mongodb_db)
            client.close()
        with contextlib.suppress(Exception):
            clear_redis(self.settings.redis_prefix)
        with contextlib.suppress(Exception):
            for p in self.tmp.iterdir():
                p.unlink()
            self.tmp.rmdir()


def clear_redis(prefix: str) -> None:
    """Delete one benchmark environment's Redis keys (processed ids, phrase cache, attempts, flag): its own prefix
    only, so a benchmark pointed at a live deployment's database never touches the deployment's keys."""
    forget_keys(prefix, [REDIS])


@contextlib.contextmanager
def bench_env(label: str = "bench", products: int = PRODUCTS, **overrides: str) -> Iterator[BenchEnv]:
    env = BenchEnv(label, **overrides)
    try:
        yield env.setup(products)
    finally:
        env.close()


class StampedPublisher(WindowedPublisher):
    """The product's WindowedPublisher, making sure every message carries ``x-published-at`` (epoch ms, stamped when
    the message is handed to ``basic_publish``): the worker's ``myshop_queue_wait_seconds`` needs it. When this
    benchmark was written WindowedPublisher (so `generate-test-events`) set no such header and no AMQP timestamp;
    if the publisher sets it itself, its value is kept."""

    def _on_confirm_mode(self, frame) -> None:
        made = self._props

        def props(*args) -> pika.BasicProperties:
            p = made(*args)
            if not (p.headers or {}).get(H_PUBLISHED_AT):
                p.headers = {**(p.headers or {}), H_PUBLISHED_AT: int(time.time() * 1000)}
            return p

        self._props = props
        super()._on_confirm_mode(frame)


# ---- worker subprocesses -------------------------------------------------------------------------


@dataclass
class ProcRun(Reaped):
    """A finished worker process (tests.support.workers.Reaped: exit, CPU, memory, output) and its closing figures."""

    summary: dict = field(default_factory=dict)

    @property
    def processed(self) -> int:
        return int(self.summary.get("processed", 0))

    @property
    def writes(self) -> int:
        return int(self.summary.get("writes", 0))


class Proc(WorkerProcess):
    """A worker subprocess (``myshop consume`` or the naive baseline): the tests' WorkerProcess given a whole command
    line, the run's environment and its temp folder for the output files."""

    def __init__(self, env: BenchEnv, args: list[str], *, name: str, extra_env: dict | None = None,
                 ready_marker: str = "consuming", stop_marker: str = "worker stopped", sample_rss: bool = False):
        super().__init__(env.subprocess_env(**(extra_env or {})), args[1:], env.tmp, name, program=args[:1],
                         sample_rss=sample_rss)
        self.ready_marker = ready_marker
        self.stop_marker = stop_marker

    def wait_ready(self, marker: str | None = None, timeout: float = START_TIMEOUT) -> Proc:
        super().wait_ready(marker or self.ready_marker, timeout)
        return self

    def terminate(self) -> None:
        self.send(signal.SIGTERM)

    def finish(self, timeout: float = 600.0) -> ProcRun:
        """Reap the process with os.wait4 (WorkerProcess.reap) and read its closing line: ``myshop consume``'s
        summary (tests.support.workers.parse_summary) or the naive baseline's JSON line."""
        reaped = self.reap(timeout, self.stop_marker)
        parsed = parse_summary(reaped.stdout)
        summary = asdict(parsed) if parsed else {}
        if parsed is None:  # the naive baseline prints one JSON line
            for line in reversed(reaped.stdout.splitlines()):
                if line.startswith("{"):
                    summary = json.loads(line)
                    break
        return ProcRun(**vars(reaped), summary=summary)


def consume_args(*, limit: int | None = None, prefetch: int = 500, metrics_port: int | None = None) -> list[str]:
    args = [sys.executable, "-m", "myshop_ops", "consume", "--prefetch", str(prefetch)]
    if limit is not None:
        args += ["--limit", str(limit)]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    return args


def naive_args(*, limit: int | None = None) -> list[str]:
    args = [sys.executable, str(ROOT / "benchmarks" / "naive_worker.py")]
    if limit is not None:
        args += ["--limit", str(limit)]
    return args


def check_run(run: ProcRun, expected: int, what: str) -> None:
    if run.code != 0 or run.processed != expected:
        raise RuntimeError(f"{what}: exit {run.code}, processed {run.processed} of {expected}\n"
                           f"stdout: {run.stdout[-1500:]}\nstderr: {run.stderr[-3000:]}")


# ---- /metrics ------------------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float]:
    """Cumulative buckets [(le, count)] and the total count of a Prometheus histogram."""
    buckets = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = re.search(r'le="([^"]+)"', line).group(1)
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    count = metric_sum(text, name + "_count")
    return buckets, count


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the q-quantile."""
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def fraction_at_most(limit: float, buckets: list[tuple[float, float]]) -> float | None:
    for le, count in buckets:
        if le == limit:
            return count / buckets[-1][1] if buckets[-1][1] else None
    return None


class Sampler:
    """A background thread sampling every ``interval`` seconds until ``stop()``; subclasses write ``_run``."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        raise NotImplementedError

    def _halt(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)


class DepthSampler(Sampler):
    """Ready messages of a queue by passive declare every ``interval`` seconds on its own connection/thread."""

    def __init__(self, queue: str, interval: float = 0.1):
        super().__init__(interval)
        self.queue = queue
        self.samples: list[tuple[float, int]] = []

    def _run(self) -> None:
        conn = broker.connect(RABBIT, name="bench-depth-sampler")
        ch = conn.channel()
        try:
            while not self._stop.is_set():
                ok = ch.queue_declare(self.queue, passive=True)
                self.samples.append((time.time(), ok.method.message_count))
                self._stop.wait(self.interval)
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def stop(self) -> int:
        self._halt(timeout=5)
        return max((d for _, d in self.samples), default=0)


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": sys.version.split()[0],
            "loadavg_1m": os.getloadavg()[0]}


class ProfilePoller(Sampler):
    """Snapshots of the users' (event_count, updated_at) every ``interval`` s, for a publish-to-profile cross-check
    replayed later through myshop_ops.tools.generate.VisibilityTracker (the `generate-test-events --wait` logic)."""

    def __init__(self, env: BenchEnv, user_ids: Sequence[str], interval: float = 0.15):
        super().__init__(interval)
        self.env = env
        self.user_ids = list(user_ids)
        self.snapshots: list[tuple[float, list[dict]]] = []

    def _run(self) -> None:
        from myshop_ops.tools.generate import profile_counts

        store = self.env.store()
        try:
            while not self._stop.is_set():
                try:
                    docs = profile_counts(store, self.user_ids)
                except AutoReconnect:  # a stalled store: this poll is skipped
                    continue
                self.snapshots.append((time.time(), docs))
                self._stop.wait(self.interval)
        finally:
            store.close()

    def stop(self) -> list[tuple[float, list[dict]]]:
        self._halt(timeout=10)
        return self.snapshots


def visibility_latencies_ms(run: Run, result: PublishResult, snapshots, users: Sequence[str] | None = None
                            ) -> list[float]:
    """Publish-to-profile latencies (sorted, ms) of every event (of ``users``, default all) seen in the profiles'
    updated_at."""
    from myshop_ops.adapters.publisher import OK
    from myshop_ops.tools.generate import VisibilityTracker, expected_sent_times

    expected, _ = expected_sent_times(run, lambda i: result.status[i] == OK, result.sent_at)
    if users is not None:
        expected = {u: t for u, t in expected.items() if u in set(users)}
    tracker = VisibilityTracker(expected, {})
    for seen_at, docs in snapshots:
        tracker.observe(docs, seen_at)
    return tracker.latencies_ms()


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    from myshop_ops.tools.generate import percentile as pct

    return pct(sorted_values, p)


def status_counts(text: str) -> dict[str, float]:
    """messenger_processed_messages_total summed per status label."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("messenger_processed_messages_total{"):
            status = re.search(r'status="([^"]+)"', line).group(1)
            out[status] = out.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def settled(text: str) -> float:
    """Messages settled for good (applied, duplicate, skipped, failed; not retried)."""
    c = status_counts(text)
    return sum(c.get(s, 0.0) for s in ("applied", "duplicate", "skipped", "failed"))
