"""The confirming publisher of a scenario: a thread that publishes a :class:`~.plan.Plan` and records it.

A :class:`Feeder` publishes every body with publisher confirms through the project's ``broker.Publisher``
(optionally at a steady rate, so consumption and faults overlap), reconnects and publishes again after a lost
connection, and writes every valid body to ``events.jsonl`` exactly as published (a body re-sent after a lost
connection is written again: it may be in the queue twice) — the file ``myshop verify --events`` checks.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time
from pathlib import Path

import pika

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from tests.reliability.harness.plan import Body, Plan


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
