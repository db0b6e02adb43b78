"""Fault-injection harness: real worker processes under a supervisor, a fault injected, the exact oracle after.

One scenario (a :class:`Scenario`):

1. products seeded, a planned stream of bodies (N users x M mixed events, shuffled, some late, some published
   twice; malformed bodies in the bad-input scenario) — :func:`plan_events`;
2. a :class:`Feeder` thread publishes it with publisher confirms (optionally at a steady rate, so consumption
   and faults overlap) and writes every valid body to ``events.jsonl`` exactly as published (a body re-sent
   after a lost connection is written again: it was published twice);
3. K ``myshop consume`` processes run under a :class:`Supervisor` that restarts a worker whenever it dies
   (systemd ``Restart=always``) and tells the deaths we caused (kill -9, SIGTERM) from crashes;
4. the test injects its fault (random delays before each injection are fine, waits are conditions);
5. :meth:`Scenario.wait_drained`: the feeder is done, the main and retry queues are empty, the profiles hold
   the expected number of events and ``failed`` the expected number of messages, and — checked with
   ``rabbitmqctl``, the only live source — no worker holds unacked messages;
6. :meth:`Scenario.finish`: SIGTERM to every worker (each must exit 0), ``myshop verify --events FILE --json``
   (ok, nothing lost, nothing duplicated), the ids in the ``failed`` queue compared with the expected ones,
   and one JSON line appended to the report (``RELIABILITY_REPORT``, default ``.run/reliability.jsonl``).

Sizes: ``sized(regular, soak)`` picks the second when ``SOAK=1``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pika
import redis as redis_lib

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import make_event, serialise
from tests.support.events import T0, seed_products
from tests.support.services import ROOT, free_port, wait_for
from tests.support.workers import WorkerProcess, Workers, parse_summary, prepare, rabbitmqctl

SOAK = os.environ.get("SOAK", "") == "1"
RUN = f"{socket.gethostname()}-{os.getpid()}"  # tells report lines of concurrent runs apart
EVENT_TYPES = ("search", "product_view", "product_click", "product_purchase")


def sized(regular, soak):
    """The regular size, or the soak size when SOAK=1."""
    return soak if SOAK else regular


def report_path() -> Path:
    return Path(os.environ.get("RELIABILITY_REPORT") or ROOT / ".run" / "reliability.jsonl")


# ---- the planned stream ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """One publish: the bytes, the AMQP message_id and content type, and whether the contract accepts it."""

    body: bytes
    message_id: str | None
    valid: bool = True
    content_type: str | None = "application/json"
    kind: str = "event"
    expect: str = ""  # bad bodies: a fragment the failure's error message must contain ("" = any)


@dataclass
class Plan:
    bodies: list[Body]
    distinct: int  # distinct valid events
    users: list[str]
    bad_ids: set[str] = field(default_factory=set)  # message ids that must end in `failed`

    @property
    def published(self) -> int:
        return len(self.bodies)


def plan_events(
    tag: str,
    *,
    users: int,
    per_user: int,
    products: Sequence[str],
    rng: random.Random,
    search_share: float = 0.25,
    late_share: float = 0.15,
    dup_share: float = 0.05,
    unique_phrases: bool = False,
    adjacent_dups: float = 0.5,
    min_gap: int = 250,
) -> Plan:
    """``users`` x ``per_user`` distinct valid events of all four types, shuffled (so out of order), a share
    of them late (occurred weeks before the user's other events), and ``dup_share`` of them published a second
    time (same body, same message id): for the ``adjacent_dups`` share of them right behind the original (a
    producer publishing again after a lost confirm: both copies tend to land in one batch, docs/RELIABILITY.md
    §5.4), for the others at a random position at least ``min_gap`` later (never in the same batch)."""
    user_ids = [f"{tag}-u{i}" for i in range(users)]
    other = (1 - search_share) / 3
    events = []
    seen: set[str] = set()
    for u, user in enumerate(user_ids):
        for k in range(per_user):
            et = rng.choices(EVENT_TYPES, weights=(search_share, other, other, other))[0]
            if rng.random() < late_share:
                when = T0 - timedelta(days=rng.uniform(60, 400))  # late: far behind everything else
            else:
                when = T0 - timedelta(days=rng.uniform(0, 40))
            when = when.replace(microsecond=rng.randrange(1_000_000))
            if et == "search":
                ref = f"{tag} phrase {u} {k}" if unique_phrases else f"{tag} {rng.choice(PHRASES)}"
            else:
                ref = rng.choice(products)
            event = make_event(user, et, ref, when)
            if event.message_id in seen:  # practically impossible (microsecond times), but keep `distinct` exact
                continue
            seen.add(event.message_id)
            events.append(event)
    rng.shuffle(events)
    bodies = [Body(serialise(e), e.message_id) for e in events]
    for _ in range(int(len(events) * dup_share)):
        i = rng.randrange(max(1, len(bodies) - min_gap))
        original = bodies[i]
        later = rng.randrange(min(i + min_gap, len(bodies)), len(bodies) + 1)
        bodies.insert(i + 1 if rng.random() < adjacent_dups else later, original)
    return Plan(bodies, len(events), user_ids)


PHRASES = ("wireless headphones", "running shoes", "coffee grinder", "usb c cable", "standing desk",
           "gaming mouse", "yoga mat", "rain jacket", "espresso machine", "led desk lamp", "hiking boots",
           "mechanical keyboard", "water bottle", "phone case", "air fryer", "bluetooth speaker")


def interleave(rng: random.Random, *streams: list[Body]) -> list[Body]:
    """Merge streams at random positions, each stream keeping its own order."""
    tagged = [(i, b) for i, s in enumerate(streams) for b in s]
    slots = [i for i, _ in tagged]
    rng.shuffle(slots)
    iters = [iter(s) for s in streams]
    return [next(iters[i]) for i in slots]


# ---- publishing -----------------------------------------------------------------------------------


class Feeder(threading.Thread):
    """Publishes a plan with publisher confirms, at ``rate`` bodies/s (None: as fast as confirms allow).

    Valid bodies are written to ``events_path`` (one line each, exactly the bytes published); malformed ones
    to ``bad_path`` as JSON records (base64 body, message id, content type). It publishes through the project's
    ``broker.Publisher`` (a nack: again on a fresh channel). A lost connection (e.g. the broker closing it, a
    cluster node dying) is reopened on the first reachable URL of the DSN and the unconfirmed body published
    again — written again as well, since it may now be in the queue twice.
    """

    def __init__(self, dsn: str, topo: Topology, plan: Plan, events_path: Path, bad_path: Path | None = None,
                 rate: float | None = None):
        super().__init__(name="feeder", daemon=True)
        self.dsn = dsn
        self.topo = topo
        self.plan = plan
        self.events_path = events_path
        self.bad_path = bad_path
        self.rate = rate
        self.published = 0  # publishes confirmed (re-sends included)
        self.resent = 0
        self.nacks = 0  # nacks answered on a fresh channel by the publisher
        self.reconnects = 0
        self.longest_publish_s = 0.0  # the longest wait for one body's confirm, reconnects included
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the scenario
            self.error = exc
        finally:
            self.done.set()

    def _connect(self) -> broker.Publisher:
        deadline = time.monotonic() + 60
        while True:
            try:
                return broker.Publisher(broker.connect(self.dsn, name="reliability-feeder"))
            except broker.CONNECTION_ERRORS:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _run(self) -> None:
        pub = self._connect()
        started = time.monotonic()
        with open(self.events_path, "ab") as good, open(self.bad_path or os.devnull, "ab") as bad:
            for n, b in enumerate(self.plan.bodies):
                if self.rate:
                    lag = started + n / self.rate - time.monotonic()
                    if lag > 0:
                        time.sleep(lag)
                props = pika.BasicProperties(content_type=b.content_type, delivery_mode=2, message_id=b.message_id,
                                             headers={"x-published-at": int(time.time() * 1000)})
                attempt = 0
                began = time.monotonic()
                while True:
                    try:
                        pub.send(self.topo.exchange, self.topo.queue, b.body, props, what=f"body {n}")
                        break
                    except broker.CONNECTION_ERRORS:
                        attempt += 1
                        if attempt > 20:
                            raise
                        self.nacks += pub.nacks
                        with contextlib.suppress(Exception):
                            pub.connection.close()
                        pub = self._connect()
                        self.reconnects += 1
                        if attempt == 1:
                            self.resent += 1
                        # the body may or may not have reached the queue: record it as published either way
                        self._record(b, good, bad)
                self.longest_publish_s = max(self.longest_publish_s, time.monotonic() - began)
                self._record(b, good, bad)
                self.published += 1
        self.nacks += pub.nacks
        with contextlib.suppress(Exception):
            pub.connection.close()

    @staticmethod
    def _record(b: Body, good, bad) -> None:
        if b.valid:
            good.write(b.body + b"\n")
        else:
            bad.write(json.dumps({"message_id": b.message_id, "kind": b.kind, "content_type": b.content_type,
                                  "body_b64": base64.b64encode(b.body).decode()}).encode() + b"\n")


# ---- the workers ----------------------------------------------------------------------------------


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


# ---- private services -----------------------------------------------------------------------------


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


# ---- probes ---------------------------------------------------------------------------------------


class Probe:
    """Live state: ready counts by passive declare, profile event counts in MongoDB, unacked via rabbitmqctl."""

    def __init__(self, settings: Settings, topo: Topology, vhost: str, ctl: Callable[..., str] = rabbitmqctl):
        self.settings = settings
        self.topo = topo
        self.vhost = vhost
        self.ctl = ctl  # rabbitmqctl of the broker the settings name (tests/cluster: a node of the cluster that is up)
        self._conn = None
        self._store = Store(settings.mongodb_url, settings.mongodb_db, timeout_ms=2000)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        self._store.close()

    def ready(self) -> dict[str, int] | None:
        """Ready messages of every queue of the topology; None while the broker connection is being lost."""
        try:
            if self._conn is None or not self._conn.is_open:
                self._conn = broker.connect(self.settings.rabbitmq_dsn, name="reliability-probe")
            out = {}
            for q in self.topo.queues():
                state = broker.queue_depth(self._conn, q)
                out[q] = state[0] if state else 0
            return out
        except broker.CONNECTION_ERRORS:
            self._conn = None
            return None

    def backlog(self, ready: dict[str, int]) -> int:
        return sum(n for q, n in ready.items() if q != self.topo.failed_queue)

    def applied(self) -> int | None:
        """Sum of event_count over the stored profiles; None while MongoDB is unreachable."""
        try:
            return sum(d.get("event_count", 0) for d in self._store.users.find(
                {}, {"event_count": 1, "_id": 0}, batch_size=500))
        except Exception:
            return None

    def failed_records(self) -> int | None:
        try:
            return self._store.failed.count_documents({})
        except Exception:
            return None

    def unacked(self) -> dict[str, tuple[int, int]]:
        """(ready, unacked) of the main and retry queues, straight from the broker (management stats lag 5 s)."""
        out = self.ctl("-q", "list_queues", "-p", self.vhost, "name", "messages_ready",
                       "messages_unacknowledged", "--formatter", "json")
        mine = set(self.topo.queues()) - {self.topo.failed_queue}
        return {q["name"]: (int(q["messages_ready"] or 0), int(q["messages_unacknowledged"] or 0))
                for q in json.loads(out or "[]") if q["name"] in mine}


def max_attempts(redis_url: str, prefix: str, message_ids: Sequence[str]) -> int:
    """The highest attempt count the workers journaled at one of these redelivered messages (0 when none, or
    Redis down).

    Injectors of destructive faults (kill -9, closed connections) wait while it is >= 2: a message redelivered
    after a death and whose solo attempt dies again twice is, by design, taken for a poison message — a fault
    injected at random must not hit the same innocent message three times in a row.
    """
    client = redis_lib.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    try:
        best = 0
        for i in range(0, len(message_ids), 5000):
            values = client.mget([f"{prefix}attempts:{m}" for m in message_ids[i:i + 5000]])
            best = max(best, *(int(v or 0) for v in values))
        return best
    except redis_lib.RedisError:
        return 0
    finally:
        client.close()


def failed_queue_messages(settings: Settings, topo: Topology, timeout: float = 120) -> list[tuple[str, dict]]:
    """(message_id, headers) of every message in the failed queue, read without removing anything (fetched
    unacked, returned by closing the channel)."""
    conn = broker.connect(settings.rabbitmq_dsn, name="reliability-failed-walk")
    try:
        ch = conn.channel()
        total = ch.queue_declare(topo.failed_queue, passive=True).method.message_count
        got: list[tuple[str, dict]] = []
        if total:
            ch.basic_qos(prefetch_count=0)
            ch.basic_consume(topo.failed_queue, lambda _c, _m, p, _b: got.append(
                (p.message_id, dict(p.headers or {}))), auto_ack=False)
            deadline = time.monotonic() + timeout
            while len(got) < total and time.monotonic() < deadline:
                conn.process_data_events(time_limit=0.2)
        ch.close()
        assert len(got) == total, f"read {len(got)} of {total} failed messages"
        return got
    finally:
        conn.close()


# ---- one scenario ---------------------------------------------------------------------------------


class Scenario:
    """Owns the run of one scenario: topology, plan, feeder, supervisor, drain, stop, oracle, report."""

    def __init__(self, name: str, env, workers: Workers, tmp: Path, *, vhost: str = "/", seed: int = 0,
                 ctl: Callable[..., str] = rabbitmqctl):
        self.name = name
        self.env = env
        self.workers = workers
        self.tmp = tmp
        self.vhost = vhost
        self.rng = random.Random(f"{name}-{seed}")
        self.events_path = tmp / "events.jsonl"
        self.bad_path = tmp / "bad.jsonl"
        self.faults = 0
        self.extra: dict = {}
        self.started = time.monotonic()
        self.settings = env.settings()
        self.topo = prepare(self.settings)
        self.tag = env["MONGODB_DB"]
        self.plan: Plan | None = None
        self.feeders: list[Feeder] = []
        self.supervisor: Supervisor | None = None
        self.probe = Probe(self.settings, self.topo, vhost, ctl)
        self._ids: list[str] | None = None
        self.failed_headers: dict[str, dict] = {}
        self.phases: dict[str, float] = {}
        self._mark = time.monotonic()

    def phase(self, name: str) -> None:
        """Record the seconds since the previous phase mark under ``name`` (in the report)."""
        now = time.monotonic()
        self.phases[name] = round(now - self._mark, 1)
        self._mark = now

    # -- setup --

    def seed_products(self, n: int = 24) -> list[str]:
        ids = [f"{self.tag}-p{i}" for i in range(n)]
        seed_products(self.settings, ids)
        return ids

    def publish(self, plan: Plan, rate: float | None = None) -> Feeder:
        """Start publishing ``plan`` (added to what the scenario published before) in a feeder thread."""
        if self.plan is None:
            self.plan = Plan([], 0, [])
        self.plan.bodies += plan.bodies
        self.plan.distinct += plan.distinct
        self.plan.users += plan.users
        self.plan.bad_ids |= plan.bad_ids
        feeder = Feeder(self.settings.rabbitmq_dsn, self.topo, plan, self.events_path, self.bad_path, rate)
        self.feeders.append(feeder)
        feeder.start()
        return feeder

    @property
    def feeder(self) -> Feeder:
        return self.feeders[-1]

    def feeding(self) -> bool:
        return any(not f.done.is_set() for f in self.feeders)

    def wait_published(self, timeout: float = 300) -> None:
        for f in self.feeders:
            assert f.done.wait(timeout), f"publishing not finished after {timeout}s"
            assert f.error is None, f"feeder failed: {f.error!r}"

    def start_workers(self, k: int, prefetch: int = 100, metrics_ports: Sequence[int] = (),
                      **env_overrides: str) -> Supervisor:
        args = ("--prefetch", str(prefetch), "--time-limit", str(sized(900, 7200)))
        self.supervisor = Supervisor(self.workers, self.env.subprocess_env(**env_overrides), args, k, metrics_ports)
        return self.supervisor

    # -- faults --

    def inject(self, n: int, action: Callable[[int], bool], gap: tuple[float, float],
               guard: Callable[[], bool] | None = None, timeout: float = 600) -> None:
        """``n`` injections of ``action(i)`` (returns False when it could not act now: tried again shortly),
        each after a random delay in ``gap`` seconds, waiting on ``guard()`` to allow it."""
        deadline = time.monotonic() + timeout
        done = 0
        while done < n:
            assert time.monotonic() < deadline, f"{done} of {n} faults injected in {timeout}s"
            time.sleep(self.rng.uniform(*gap))
            if guard is not None:
                wait_for(guard, timeout=max(1.0, deadline - time.monotonic()), interval=0.02, what="fault guard")
            if action(done):
                done += 1
                self.faults += 1

    def poison_guard(self) -> bool:
        assert self.plan is not None
        if self._ids is None:
            self._ids = sorted({b.message_id for b in self.plan.bodies if b.message_id})
        return max_attempts(self.env["REDIS_URL"], self.env["REDIS_KEY_PREFIX"], self._ids) < 2

    # -- the end --

    def expected_applied(self) -> int:
        assert self.plan is not None
        return self.plan.distinct

    def wait_drained(self, timeout: float = 300, settle: float = 15.0) -> None:
        """Until nothing is left to do: everything published, main and retry queues empty, the expected events
        in the profiles and the expected messages in `failed`, and no unacked message anywhere (rabbitmqctl).
        If the counts never match but the queues stay empty for ``settle`` seconds, it returns anyway and the
        oracle reports what is missing."""
        assert self.plan is not None and self.feeders and self.supervisor is not None
        self.wait_published(timeout)
        self.phase("published")
        deadline = time.monotonic() + timeout
        empty_since: float | None = None
        want_applied, want_failed = self.expected_applied(), len(self.plan.bad_ids)
        last: dict = {}
        trace = open(self.tmp / "drain.log", "a")  # noqa: SIM115 - closed below
        traced = 0.0
        while True:
            if time.monotonic() - traced >= 1.0:
                traced = time.monotonic()
                trace.write(f"{time.strftime('%H:%M:%S')} {json.dumps(last, default=str)}\n")
                trace.flush()
            assert time.monotonic() < deadline, (f"not drained after {timeout}s: {last}\n"
                                                 f"{self.supervisor.describe()}")
            ready, applied = self.probe.ready(), self.probe.applied()
            last = {"ready": ready, "applied": applied, "want_applied": want_applied, "want_failed": want_failed}
            if ready is None or applied is None:
                empty_since = None
                time.sleep(0.2)
                continue
            if self.probe.backlog(ready):
                empty_since = None
            elif empty_since is None:
                empty_since = time.monotonic()
            complete = applied == want_applied and ready[self.topo.failed_queue] == want_failed
            if empty_since is not None and (complete or time.monotonic() - empty_since > settle):
                counts = self.probe.unacked()
                last["rabbitmqctl"] = counts
                if all(r == 0 and u == 0 for r, u in counts.values()):
                    trace.close()
                    self.phase("drained")
                    if not complete:
                        print(f"\ndrained without the expected counts: {last}")
                    return
            time.sleep(0.2)

    def verify(self, **env_overrides: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "myshop_ops", "verify", "--events", str(self.events_path),
             "--json", "--max-problems", "10"],
            env=self.env.subprocess_env(**env_overrides), capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert "Traceback" not in done.stderr, done.stderr
        try:
            report = json.loads(done.stdout)
        except ValueError:
            raise AssertionError(f"verify rc={done.returncode}: {done.stdout}\n{done.stderr}") from None
        report["exit_code"] = done.returncode
        return report

    def finish(self, *, expect_restarts: int | None = None, verify_env: dict[str, str] | None = None,
               failed_at_least_once: bool = False) -> dict:
        """Stop the workers (SIGTERM, exit 0 each), run the oracle, check the failed queue, write the report.

        ``failed_at_least_once``: a failed copy may be in `failed` twice (each with its record), as when a broker node
        stops between a copy's confirm and the original's ack (docs/RELIABILITY.md §1.1: a duplicate copy, never a
        loss); every expected message must still be there, and nothing else."""
        assert self.plan is not None and self.supervisor is not None and self.feeders
        sup = self.supervisor
        codes = sup.stop()
        self.phase("stopped")
        bad_exits = {n: c for n, c in codes.items() if c != 0}
        assert not bad_exits, f"workers did not exit 0 on SIGTERM: {bad_exits}\n{sup.describe()}"
        assert not sup.crashes(), f"unexpected worker deaths: {sup.crashes()}\n{sup.describe()}"
        if expect_restarts is not None:
            assert sup.restarts == expect_restarts, f"{sup.restarts} restarts\n{sup.describe()}"
        ready = self.probe.ready()
        assert ready is not None and self.probe.backlog(ready) == 0, f"messages left after the stop: {ready}"
        failed = failed_queue_messages(self.settings, self.topo)
        failed_ids = [m for m, _ in failed]
        report = self.verify(**(verify_env or {}))
        self.phase("verified")
        applied = self.probe.applied()
        failed_records = self.probe.failed_records()
        self.probe.close()
        row = {
            "scenario": self.name,
            "soak": SOAK,
            "faults": self.faults,
            "published": sum(f.published for f in self.feeders),
            "distinct": self.plan.distinct,
            "applied": applied,
            "failed": len(failed_ids),
            "lost": report.get("events_lost"),
            "duplicated": report.get("events_duplicated"),
            "restarts": sup.restarts,
            "seconds": round(time.monotonic() - self.started, 1),
            "workers_started": len(sup.all),
            "resent": sum(f.resent for f in self.feeders),
            "failed_duplicates": len(failed_ids) - len(set(failed_ids)),
            "publish_nacks": sum(f.nacks for f in self.feeders),
            "longest_publish_s": round(max(f.longest_publish_s for f in self.feeders), 2),
            **{f"worker_{k}": v for k, v in sup.totals().items()},
            "phases": self.phases,
            **self.extra,
        }
        write_report(row)
        assert report["exit_code"] == 0 and report["ok"] is True, f"verify: {report}"
        assert report["events_lost"] == 0 and report["events_duplicated"] == 0, report
        assert report["events"] == self.plan.distinct, report
        assert applied == self.expected_applied(), (applied, self.expected_applied(), report)
        assert failed_at_least_once or len(failed_ids) == len(set(failed_ids)), "a message is in `failed` twice"
        unexpected, missing = set(failed_ids) - self.plan.bad_ids, self.plan.bad_ids - set(failed_ids)
        assert not unexpected and not missing, (
            f"failed queue: {len(failed_ids)} messages, expected {len(self.plan.bad_ids)}; unexpected "
            f"{sorted(unexpected)[:10]}, missing {sorted(missing)[:10]}")
        assert failed_records == len(failed_ids), f"{failed_records} failed_messages records, {len(failed_ids)} failed"
        self.failed_headers = dict(failed)
        return row


def write_report(row: dict) -> None:
    path = report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"at": datetime.now().astimezone().isoformat(timespec="seconds"), "run": RUN, **row})
    with open(path, "a") as f:
        f.write(line + "\n")
    print(f"\nRELIABILITY {line}")
