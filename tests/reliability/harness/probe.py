"""Reading the live state of a scenario without changing it: what the drain waits on and the oracle checks.

A :class:`Probe` reads the ready counts of the topology's queues, the events applied to the stored profiles
and the ``failed_messages`` records, and the unacked counts from ``rabbitmqctl`` (the only live source);
:func:`max_attempts` reads the workers' attempt journal in Redis (fault injectors wait while a message is
near its poison limit); :func:`failed_queue_messages` lists the failed queue without consuming it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence

import redis as redis_lib

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.store import Store
from tests.support.workers import rabbitmqctl


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
