"""Synthetic shop events for `myshop generate-test-events`: the plan, the events, the record file and the
publish-to-profile latencies of ``--wait``. No CLI code here (the command is ``myshop_ops/cli/generate.py``).

Events are valid contract-v1 events built with :func:`contract.make_event`:

- user ids are the decimal strings ``start .. start + users - 1``;
- events go out round-robin over the users (event 0 of every user, then event 1, ...), so the events of
  one user are published in their own order, which is also the order of their ``occurred_at``;
- ``occurred_at`` is spread over the last 7 days, strictly increasing per user, never in the future;
  every time of a run carries the run's nonce in its microseconds, so a re-run makes new message ids
  (new events, not duplicates the consumers would drop);
- ``mixed`` draws from a shuffled bag of 20 types (view 9, search 5, click 4, purchase 2) whose first four
  slots hold one of each type, so any run of 4 events or more has all four types;
- search phrases come from :data:`SEARCH_PHRASES`; product ids from the caller's pool (ids read from
  ``product_embeddings`` for the configured model and dimensions), with a skew towards the first ones.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import secrets
import stat
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingConnection

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.management import Management, ManagementError
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import EVENT_TYPES, make_event, serialise

EVENT_TYPE_CHOICES: tuple[str, ...] = ("mixed", *EVENT_TYPES)
PRODUCT_TYPES = frozenset(t for t in EVENT_TYPES if t != "search")
MAX_USERS = 1_000_000
MAX_EVENTS_PER_USER = 10_000  # keeps >= 60 s between a user's events over the 7-day span
MAX_EVENTS = 1_000_000  # a run is built in memory before publishing (about 0.6 KB per event)
SPAN_S = 7 * 86_400  # occurred_at spread over the last 7 days
PRODUCT_POOL = 1000  # product ids read from product_embeddings for a run
IN_CHUNK = 10_000  # user ids per `$in` query
DEFAULT_POLL_S = 0.15

# A realistic type mix for `mixed`; the first four slots hold one of each type (any 4 events cover all types).
_MIX_REST = ["product_view"] * 8 + ["search"] * 4 + ["product_click"] * 3 + ["product_purchase"]

SEARCH_PHRASES: tuple[str, ...] = (
    "wireless headphones", "noise cancelling headphones", "bluetooth speaker waterproof", "running shoes men",
    "running shoes women size 39", "trail running shoes", "yoga mat non slip", "adjustable dumbbells",
    "standing desk", "ergonomic office chair", "mechanical keyboard", "usb c hub", "4k monitor 27 inch",
    "gaming mouse wireless", "laptop backpack", "laptop stand aluminium", "phone case iphone 15",
    "screen protector", "fast charger 65w", "power bank 20000mah", "smart watch fitness tracker",
    "electric toothbrush", "hair dryer ionic", "coffee grinder burr", "espresso machine", "french press",
    "cast iron skillet", "non stick frying pan", "chef knife", "air fryer 5l", "slow cooker",
    "blender for smoothies", "water bottle insulated", "lunch box bento", "kids rain jacket",
    "winter coat women", "merino wool socks", "leather wallet men", "sunglasses polarized",
    "hiking backpack 30l", "camping tent 2 person", "sleeping bag summer", "led desk lamp",
    "robot vacuum cleaner", "cordless drill", "garden hose 30m", "plant pots ceramic", "scented candles",
    "bed sheets cotton queen", "memory foam pillow", "blackout curtains", "board games for adults",
    "lego technic", "puzzle 1000 pieces", "children's books age 5", "notebook a5 dotted", "fountain pen",
    "watercolor paint set", "dog food grain free", "cat scratching post", "gift ideas for dad",
    "birthday gift for her", "organic green tea", "protein powder vanilla", "vitamin d3",
)


class NoProducts(Exception):
    """The plan needs product events but product_embeddings holds no product of the configured model."""


@dataclass(frozen=True)
class Plan:
    users: int = 100
    events_per_user: int = 50
    event_type: str = "mixed"
    start_user_id: int = 500_000
    delay_ms: int = 0

    @property
    def total(self) -> int:
        return self.users * self.events_per_user

    @property
    def user_ids(self) -> list[str]:
        return [str(self.start_user_id + u) for u in range(self.users)]

    @property
    def types(self) -> tuple[str, ...]:
        return EVENT_TYPES if self.event_type == "mixed" else (self.event_type,)

    @property
    def needs_products(self) -> bool:
        return any(t in PRODUCT_TYPES for t in self.types)

    def user_index(self, i: int) -> int:
        """The user (0-based) of the i-th published event (round-robin order)."""
        return i % self.users

    def problems(self) -> list[str]:
        """What is wrong with the plan, one line each (empty when it can run)."""
        out = []
        if self.event_type not in EVENT_TYPE_CHOICES:
            out.append(f"--event-type {self.event_type!r}: one of {', '.join(EVENT_TYPE_CHOICES)}")
        if not 1 <= self.users <= MAX_USERS:
            out.append(f"--users {self.users}: 1..{MAX_USERS}")
        if not 1 <= self.events_per_user <= MAX_EVENTS_PER_USER:
            out.append(f"--events-per-user {self.events_per_user}: 1..{MAX_EVENTS_PER_USER}")
        if self.start_user_id < 0:
            out.append(f"--start-user-id {self.start_user_id}: 0 or more")
        if self.delay_ms < 0:
            out.append(f"--delay-ms {self.delay_ms}: 0 or more")
        if not out and self.total > MAX_EVENTS:
            out.append(f"--users x --events-per-user = {self.total:,} events: at most {MAX_EVENTS:,} per run "
                       "(run the command several times with other --start-user-id values)")
        return out

    def describe(self, *, exchange: str, queue: str, broker: str) -> str:
        """One paragraph for the confirmation prompt (``broker`` must already be masked)."""
        last = self.start_user_id + self.users - 1
        users = f"user {self.start_user_id}" if self.users == 1 else f"users {self.start_user_id}..{last}"
        pace = f", {self.delay_ms} ms apart" if self.delay_ms else ""
        return (f"Publish {self.total:,} {self.event_type} events ({self.events_per_user:,} per user for "
                f"{self.users:,} {users}){pace} to exchange '{exchange}' (routing key and queue '{queue}') "
                f"on {broker}")


def product_pool(store: Store, model: str, dimensions: int, limit: int = PRODUCT_POOL) -> list[str]:
    """Up to ``limit`` product ids stored with a vector of the configured model and dimensions (one query)."""
    return sorted({str(pid) for pid in store.tagged_product_ids(model, dimensions, limit)})


@dataclass
class Run:
    """The messages of one run, in publish order, and what ``--wait`` needs to know about each."""

    plan: Plan
    run_id: str
    messages: list[tuple[bytes, str]]  # (body, message_id)
    product_ids: list[str | None]  # per event (None for search)
    by_type: Counter = field(default_factory=Counter)

    def used_products(self) -> set[str]:
        return {p for p in self.product_ids if p is not None}


def synthesize(plan: Plan, products: Sequence[str], *, now: datetime | None = None, seed: int | None = None) -> Run:
    """Build every event of the plan (see the module docstring). Raises NoProducts when products are needed
    and ``products`` is empty."""
    if plan.needs_products and not products:
        raise NoProducts("no product vectors")
    seed = secrets.randbits(64) if seed is None else seed
    rng = random.Random(seed)
    nonce_us = seed % 1_000_000
    now_s = int((now or datetime.now(UTC)).timestamp())
    slot = SPAN_S // plan.events_per_user  # >= 60 s
    base = now_s - SPAN_S
    bag = list(EVENT_TYPES)
    rng.shuffle(bag)
    rest = list(_MIX_REST)
    rng.shuffle(rest)
    bag += rest
    users = plan.user_ids
    pool = list(products)
    messages: list[tuple[bytes, str]] = []
    refs: list[str | None] = []
    by_type: Counter = Counter()
    single = plan.event_type if plan.event_type != "mixed" else None
    for k in range(plan.events_per_user):
        for user in users:
            i = len(messages)
            etype = single or bag[i % len(bag)]
            seconds = base + k * slot + rng.randrange(max(1, slot * 4 // 5))
            when = datetime.fromtimestamp(seconds, UTC).replace(microsecond=nonce_us)
            if etype == "search":
                ref = rng.choice(SEARCH_PHRASES)
                refs.append(None)
            else:
                ref = pool[int(len(pool) * rng.random() ** 2)]  # popular products first
                refs.append(ref)
            event = make_event(user, etype, ref, when)
            messages.append((serialise(event), event.message_id))
            by_type[etype] += 1
    return Run(plan=plan, run_id=f"{seed:016x}", messages=messages, product_ids=refs, by_type=by_type)


class RecordRefused(ValueError):
    """``--record FILE`` cannot be written safely; ``str()`` is one line for the operator."""


def record_problem(path: Path) -> str | None:
    """Why ``--record path`` would be refused (checked before publishing; Recorder enforces it), or None."""
    if path.is_symlink():
        return f"{path}: is a symbolic link: refusing to follow it (give the file's real path)"
    if path.exists() and not path.is_file():
        return f"{path}: not a regular file"
    return None


class Recorder:
    """``--record FILE``: the exact published bodies as JSON lines, in publish order. A new file is created; an
    existing regular file is overwritten. Never through a symbolic link (O_NOFOLLOW: a link planted where the file
    will be cannot redirect the write to its target), nor into a FIFO, a device or a file with other hard links:
    those raise RecordRefused."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO never waits
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            raise RecordRefused(record_problem(self.path) or f"{self.path}: {exc.strerror or exc}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            os.close(fd)
            raise RecordRefused(f"{self.path}: not a regular file" if not stat.S_ISREG(info.st_mode)
                                else f"{self.path}: has other hard links: refusing to overwrite what they name")
        os.set_blocking(fd, True)
        os.ftruncate(fd, 0)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self.written = 0

    def write(self, body: bytes) -> None:
        self._file.write(body)
        self._file.write(b"\n")
        self.written += 1

    def close(self) -> None:
        self._file.close()


# ---- --wait: visibility of the events in the profiles ------------------------------------------------


def profile_counts(store: Store, user_ids: Sequence[str]) -> list[dict]:
    """``user_id``, ``event_count``, ``updated_at`` of the users' profiles (one ``$in`` query per 10k ids)."""
    out: list[dict] = []
    for start in range(0, len(user_ids), IN_CHUNK):
        out.extend(store.profile_progress(user_ids[start:start + IN_CHUNK]))
    return out


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def expected_sent_times(
    run: Run, status_ok: Callable[[int], bool], sent_at: Sequence[float], usable_products: set[str] | None = None
) -> tuple[dict[str, list[float]], int]:
    """Per user, the publish times of the events that must show in its profile, in publish order; and the
    number of published events that cannot change a profile (their product has no usable vector: the
    worker skips them). ``usable_products`` None means every product is usable."""
    users = run.plan.user_ids
    expected: dict[str, list[float]] = {u: [] for u in users}
    unusable = 0
    for i in range(len(run.messages)):
        if not status_ok(i):
            continue
        pid = run.product_ids[i]
        if pid is not None and usable_products is not None and pid not in usable_products:
            unusable += 1
            continue
        expected[users[run.plan.user_index(i)]].append(sent_at[i])
    return {u: times for u, times in expected.items() if times}, unusable


def _epoch(value: object, fallback: float) -> float:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return fallback


class VisibilityTracker:
    """Which events are visible in the profiles, and when.

    Per user the polls record the observed ``(event_count, updated_at)`` history. The user's j-th expected
    event (1-based) is visible once ``event_count - baseline >= j``; its visibility time is the ``updated_at``
    of the first observed state that shows it (written by the worker; the poll time if the document has no
    ``updated_at``). When several writes happen between two polls only the last is seen, so a latency is an
    upper bound at the poll resolution.
    """

    def __init__(self, expected: dict[str, list[float]], baseline: dict[str, int] | None = None):
        self.expected = expected
        self.baseline = {u: int((baseline or {}).get(u, 0)) for u in expected}
        self.history: dict[str, list[tuple[int, float]]] = {u: [] for u in expected}
        self.visible_at: dict[str, array] = {u: array("d") for u in expected}  # per user, per visible event
        self.total = sum(len(t) for t in expected.values())
        self.observed = 0
        self._pending = set(expected)

    @property
    def done(self) -> bool:
        return not self._pending

    def pending_users(self) -> list[str]:
        return sorted(self._pending)

    def observe(self, docs: Iterable[dict], seen_at: float) -> None:
        for doc in docs:
            user, count = doc.get("user_id"), doc.get("event_count")
            if not isinstance(user, str) or user not in self._pending:  # an array holding the id matches `$in` too
                continue
            count = int(count) if isinstance(count, int | float) and math.isfinite(count) else 0  # any BSON type
            at = _epoch(doc.get("updated_at"), seen_at)
            hist = self.history[user]
            if hist and hist[-1] == (count, at):
                continue
            hist.append((count, at))
            visible = self.visible_at[user]
            want = len(self.expected[user])
            reached = min(count - self.baseline[user], want)
            while len(visible) < reached:
                visible.append(at)
                self.observed += 1
            if len(visible) >= want:
                self._pending.discard(user)

    def latencies_ms(self) -> list[float]:
        """Publish-to-profile latency of every visible event, sorted (clamped at 0: the store keeps
        milliseconds, and another host's clock may be slightly behind)."""
        out = []
        for user, visible in self.visible_at.items():
            sent = self.expected[user]
            out.extend(max(0.0, (vis - sent[j]) * 1000) for j, vis in enumerate(visible))
        out.sort()
        return out

    def last_visible_at(self) -> float | None:
        return max((v[-1] for v in self.visible_at.values() if v), default=None)


@dataclass
class WaitOutcome:
    completed: bool
    expected: int
    observed: int
    waited_s: float
    drain_s: float | None  # end of publishing -> the last event's profile write
    latencies_ms: list[float]
    unusable: int = 0
    queue_ready: int | None = None  # ready messages at the last poll
    consumers: int | None = None
    polls: int = 0
    queues: list[QueueCount] | None = None  # every queue of the topology, read once when it gave up

    def summary(self) -> dict:
        lat = self.latencies_ms
        return {
            "p50": _round(percentile(lat, 50)),
            "p95": _round(percentile(lat, 95)),
            "p99": _round(percentile(lat, 99)),
            "max": _round(lat[-1] if lat else None),
        }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def wait_visible(
    tracker: VisibilityTracker,
    fetch: Callable[[list[str]], Iterable[dict]],
    *,
    publish_end: float,
    timeout: float,
    interval: float = DEFAULT_POLL_S,
    queue_state: Callable[[], tuple[int, int] | None] | None = None,
    on_poll: Callable[[VisibilityTracker], None] | None = None,
) -> WaitOutcome:
    """Poll until every expected event is visible or ``timeout`` seconds pass.

    ``fetch(user_ids)`` returns the profiles' ``user_id``/``event_count``/``updated_at`` (one ``$in`` query
    per poll, only users still pending); ``queue_state()`` the (ready, consumers) of the queue;
    ``publish_end`` is the wall-clock time publishing ended (the last confirm).
    """
    start = time.monotonic()
    deadline = start + timeout
    polls = 0
    state: tuple[int, int] | None = None
    while True:
        polls += 1
        tracker.observe(fetch(tracker.pending_users()), time.time())
        if queue_state is not None:
            state = queue_state()
        if on_poll is not None:
            on_poll(tracker)
        if tracker.done or time.monotonic() >= deadline:
            break
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
    last = tracker.last_visible_at()
    drain = None if not tracker.done or last is None else max(0.0, last - publish_end)
    return WaitOutcome(
        completed=tracker.done,
        expected=tracker.total,
        observed=tracker.observed,
        waited_s=time.monotonic() - start,
        drain_s=drain,
        latencies_ms=tracker.latencies_ms(),
        queue_ready=None if state is None else state[0],
        consumers=None if state is None else state[1],
        polls=polls,
    )


# ---- --wait gave up: where the missing events are ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueCount:
    """One queue of the topology when ``--wait`` gives up: where a run's missing events can be."""

    queue: str
    role: str  # main, retry, failed, unrouted
    ready: int | None  # None: the queue does not exist or could not be read
    unacked: int | None = None  # main queue: delivered to a worker, not acked yet (management API; None: unknown)
    consumers: int | None = None  # main queue
    delay_s: float | None = None  # retry queues: how long a message waits there

    def as_json(self) -> dict:
        return {"queue": self.queue, "role": self.role, "ready": self.ready, "unacked": self.unacked,
                "consumers": self.consumers}


def queue_counts(connection: BlockingConnection, topo: Topology, api: Management | None) -> list[QueueCount]:
    """Ready messages of every queue of the topology (passive declares), the main queue's consumers, and its unacked
    messages from ``api`` when it answers."""
    def depth(queue: str) -> tuple[int, int] | None:
        try:
            return broker.queue_depth(connection, queue)
        except (pex.AMQPError, OSError):
            return None

    unacked = None
    if api is not None:
        with contextlib.suppress(ManagementError):
            info = api.queue(topo.queue)
            unacked = info.unacked if info is not None else None
    main = depth(topo.queue)
    out = [QueueCount(topo.queue, "main", main and main[0], unacked, main and main[1])]
    for attempt, delay_ms in enumerate(topo.retry_delays_ms, start=1):
        name = topo.retry_queue(attempt)
        out.append(QueueCount(name, "retry", (depth(name) or (None,))[0], delay_s=delay_ms / 1000))
    for name, role in ((topo.failed_queue, "failed"), (topo.unrouted, "unrouted")):
        out.append(QueueCount(name, role, (depth(name) or (None,))[0]))
    return out


def where_missing(counts: Sequence[QueueCount]) -> str:
    """What the queues hold (those holding something, the main queue always) and what to do, for the one line
    ``--wait`` ends with when it gives up."""
    held = [c for c in counts if c.role == "main" or c.ready]
    parts = []
    for c in held:
        if c.role == "main":
            text = f"'{c.queue}' {'?' if c.ready is None else f'{c.ready:,}'} ready"
            text += "" if c.unacked is None else f", {c.unacked:,} unacked"
            text += "" if c.consumers is None else f", {c.consumers} consumer(s)"
        else:
            text = f"'{c.queue}' {c.ready:,}"
        parts.append(text)
    others = "" if len(held) == len(counts) else "; every other queue empty"
    return f"queues: {'; '.join(parts)}{others}; {_what_to_do(counts)}"


def _what_to_do(counts: Sequence[QueueCount]) -> str:
    main = next(c for c in counts if c.role == "main")
    retry = [c for c in counts if c.role == "retry" and c.ready]
    by_role = {c.role: c.ready or 0 for c in counts if c.role in ("failed", "unrouted")}
    todo = []
    if retry:
        longest = max(c.delay_s or 0 for c in retry)
        todo.append(f"{sum(c.ready or 0 for c in retry):,} message(s) wait in retry queues and go back to "
                    f"'{main.queue}' within {longest:g} s: wait longer (--wait-timeout)")
    busy = (main.ready or 0) + (main.unacked or 0)
    if busy and main.consumers == 0:
        todo.append(f"no worker consumes '{main.queue}': start `myshop consume`")
    elif busy:
        todo.append(f"the workers have {busy:,} message(s) left: wait longer (--wait-timeout) or add workers")
    if by_role.get("failed"):
        todo.append(f"{by_role['failed']:,} in the failed queue: `myshop failed show`")
    if by_role.get("unrouted"):
        todo.append(f"{by_role['unrouted']:,} matched no binding: `myshop unrouted show`")
    return "; ".join(todo) or ("no queue holds a message: see the workers' logs for skipped events, and "
                               "`myshop failed show`")
