"""Queue health for `myshop stats` and its metrics exporter (--serve-metrics): depths, consumers, rates, thresholds,
the main queue's cluster members."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.management import Management, ManagementError, QueueInfo

log = logging.getLogger(__name__)

WARN_DEPTH = 1000
CRITICAL_DEPTH = 5000
WARN_FAILED_RATIO = 0.01
LEVELS = ("ok", "warn", "critical")


@dataclass
class QueueRow:
    name: str
    role: str  # main | retry | failed | unrouted | other
    ready: int
    consumers: int
    unacked: int | None = None  # None: not known without the management API
    publish_rate: float | None = None
    deliver_rate: float | None = None
    acked_total: int | None = None
    level: str = "ok"
    notes: list[str] = field(default_factory=list)
    members: dict | None = None  # quorum queues, with the management API: Members.as_json()

    def flag(self, level: str, note: str) -> None:
        self.notes.append(note)
        if LEVELS.index(level) > LEVELS.index(self.level):
            self.level = level


@dataclass
class Report:
    queues: list[QueueRow]
    management: bool
    failed_records: int | None = None  # documents in failed_messages (None: MongoDB not asked)
    alarms: list[dict] = field(default_factory=list)  # {"node", "kind": memory|disk} raised now (management API)

    @property
    def level(self) -> str:
        return max((q.level for q in self.queues), key=LEVELS.index, default="ok")

    def as_json(self) -> dict:
        return {"level": self.level, "management": self.management, "failed_records": self.failed_records,
                "alarms": self.alarms, "queues": [asdict(q) for q in self.queues]}


@dataclass(frozen=True)
class Members:
    """Where a quorum queue's replicas are: which are down, and which node is quorum-critical (stopping it now
    would leave fewer than a majority of the members online: the queue would stop taking and delivering)."""

    members: tuple[str, ...]
    online: tuple[str, ...]
    leader: str | None

    @classmethod
    def of(cls, info: QueueInfo | None) -> Members | None:
        if info is None or info.type != "quorum" or not info.members:
            return None
        return cls(info.members, tuple(n for n in info.online if n in info.members), info.leader)

    @property
    def majority(self) -> int:
        return len(self.members) // 2 + 1

    @property
    def down(self) -> list[str]:
        return [n for n in self.members if n not in self.online]

    @property
    def critical(self) -> list[str]:
        """Online members none of which may be stopped now (all of them, or none)."""
        return list(self.online) if len(self.online) - 1 < self.majority else []

    def as_json(self) -> dict:
        return {"members": list(self.members), "online": list(self.online), "leader": self.leader,
                "down": self.down, "quorum_critical": self.critical, "majority": self.majority}

    def describe(self) -> str:
        """One line: members, leader, down, and whether a node may be restarted."""
        safe = ("quorum lost" if len(self.online) < self.majority else
                f"quorum-critical: {', '.join(self.critical)} (restart none)" if self.critical else
                "no node quorum-critical (one may be restarted)")
        down = f"; down: {', '.join(self.down)}" if self.down else ""
        return (f"{len(self.online)}/{len(self.members)} members online ({', '.join(self.members)}); "
                f"leader {self.leader or 'none'}{down}; {safe}")


def judge_members(row: QueueRow, m: Members) -> None:
    """Flag a quorum queue by its members: a majority lost is critical, a member down a warning."""
    row.members = m.as_json()
    if len(m.online) < m.majority:
        row.flag("critical", m.describe())
    elif m.down:
        row.flag("warn", m.describe())
    elif len(m.members) > 1:  # a single node's queue: nothing to say
        row.notes.append(m.describe())


class UnknownQueue(Exception):
    """A queue named on the command line does not exist."""


def role_of(topo: Topology, name: str) -> str:
    if name == topo.queue:
        return "main"
    if name == topo.failed_queue:
        return "failed"
    if name == topo.unrouted:
        return "unrouted"
    return "retry" if name in topo.queues() else "other"


def collect(connection, topo: Topology, names: list[str] | None = None,
            management: Management | None = None) -> Report:
    """One snapshot of the named queues (default: the whole topology). Ready and consumers come from AMQP
    (exact, immediate); unacked and rates from the management API when configured (sampled every few s)."""
    explicit = bool(names)
    rows = []
    for name in names or topo.queues():
        depth = broker.queue_depth(connection, name)
        role = role_of(topo, name)
        if depth is None:
            if explicit:
                raise UnknownQueue(name)
            row = QueueRow(name, role, 0, 0)
            row.flag("critical", "missing: run `myshop setup-transports`")
            rows.append(row)
            continue
        row = QueueRow(name, role, *depth)
        info = management.queue(name) if management else None
        if info is not None:
            row.unacked, row.publish_rate, row.deliver_rate = info.unacked, info.publish_rate, info.deliver_rate
            row.acked_total = info.acked_total
            if (members := Members.of(info)) is not None:
                judge_members(row, members)
        rows.append(row)
    _judge(rows)
    raised = alarms(management) if management else []
    main = next((r for r in rows if r.role == "main"), None)
    if raised and main is not None:
        main.flag("critical", "resource alarm on " + ", ".join(f"{a['node']} ({a['kind']})" for a in raised)
                  + ": every publisher of the cluster is blocked (rabbitmq-diagnostics alarms)")
    return Report(rows, management is not None, alarms=raised)


def alarms(management: Management) -> list[dict]:
    """Memory and disk alarms raised on any node: each blocks every publisher of the cluster."""
    return [{"node": n["name"], "kind": kind} for n in management.nodes()
            for kind, key in (("memory", "mem_alarm"), ("disk", "disk_free_alarm")) if n[key]]


def unsettled(connection, topo: Topology, management: Management | None = None) -> tuple[int, bool]:
    """(messages still on their way to a profile, whether anything moves them): ready in the main and retry
    queues plus the main queue's unacked (from the management API when given: sampled every few seconds, so a
    just-acked batch may still count); they move while the main queue has consumers or a retry queue holds some."""
    main = broker.queue_depth(connection, topo.queue) or (0, 0)
    retrying = sum((broker.queue_depth(connection, topo.retry_queue(i)) or (0, 0))[0]
                   for i in range(1, len(topo.retry_delays_ms) + 1))
    # unacked only exist while a consumer holds them (the AMQP count is exact, the management sample may be stale)
    info = management.queue(topo.queue) if management and main[1] else None
    return main[0] + retrying + ((info.unacked or 0) if info else 0), bool(main[1] or retrying)


def wait_settled(connection, topo: Topology, management: Management | None, timeout: float) -> int:
    """Wait up to ``timeout`` seconds for ``unsettled`` to reach 0, or until nothing moves the rest (no
    consumer, no retry pending); the connection stays serviced. Returns the last count."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            left, moving = unsettled(connection, topo, management)
        except ManagementError:  # unacked unknown: ready counts only
            management = None
            left, moving = unsettled(connection, topo)
        if not left or not moving or time.monotonic() >= deadline:
            return left
        connection.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _judge(rows: list[QueueRow]) -> None:
    main = next((r for r in rows if r.role == "main"), None)
    for row in rows:
        if row.role in ("main", "other"):
            if row.ready > CRITICAL_DEPTH:
                row.flag("critical", f"more than {CRITICAL_DEPTH} ready")
            elif row.ready > WARN_DEPTH:
                row.flag("warn", f"more than {WARN_DEPTH} ready")
            if row.ready and not row.consumers:
                row.flag("warn", "messages waiting with no consumer")
        elif row.role == "unrouted" and row.ready:
            row.flag("warn", "published with a routing key no binding matches: see `myshop unrouted show`")
        elif row.role == "failed" and row.ready:
            acked = main.acked_total if main else None
            if acked:
                ratio = row.ready / acked
                if ratio > WARN_FAILED_RATIO:
                    row.flag("warn", f"{ratio:.1%} of processed messages failed: see `myshop failed show --stats`")
            else:
                row.notes.append("see `myshop failed show`")


def export(dsn: str, topo: Topology, names: list[str] | None, management: Management | None,
           update: Callable[[Report], None], failed: Callable[[str], None], interval: float,
           stop: Callable[[], bool]) -> None:
    """Collect a snapshot every ``interval`` seconds until ``stop()``, reconnecting to the broker as needed
    (an exporter must outlive broker restarts: it reports them as not ready instead of dying)."""
    connection = None
    while not stop():
        try:
            connection = connection if connection is not None and connection.is_open else broker.connect(
                dsn, name="myshop-exporter")
            update(collect(connection, topo, names, management))
        except (broker.BrokerError, ManagementError, UnknownQueue, *broker.CONNECTION_ERRORS) as exc:
            log.warning("queue collection failed", extra={"error": str(exc)})
            failed(str(exc))
            connection = None
        deadline = time.monotonic() + interval * (0.9 + 0.2 * random.random())
        while time.monotonic() < deadline and not stop():
            if connection is not None and connection.is_open:
                try:
                    connection.process_data_events(time_limit=min(0.5, max(0.0, deadline - time.monotonic())))
                except broker.CONNECTION_ERRORS:
                    connection = None
            else:
                time.sleep(0.2)
    if connection is not None and connection.is_open:
        connection.close()
