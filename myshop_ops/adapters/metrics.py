"""Prometheus metrics and health endpoints of a worker (`myshop consume --metrics-port N`).

Kept out of the core loop: the worker reports to an ``Observer`` (no-op by default); ``Metrics`` is the
observer that turns those reports into series, and ``serve`` exposes /metrics, /healthz and /readyz.
Names follow Prometheus conventions (base units, ``_total`` counters); the two ``messenger_*`` names are
the ones the seed deployment checklist and its dashboards use.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from myshop_ops.adapters.embeddings import EmbeddingError, Provider
from myshop_ops.adapters.release import version

# fine around 1 s (a P95 < 1 s objective)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
LIVENESS_S = 60.0  # /healthz fails when the consume loop has not turned for this long


def build_info(registry: CollectorRegistry) -> None:
    """``myshop_build_info{version="..."} 1``: which release this process runs (a rollback shows in the graph)."""
    Gauge("myshop_build_info", "The release this process runs", ["version"], registry=registry).labels(
        version=version()).set(1)


class Observer:
    """What the worker reports; every method is a no-op here."""

    def turned(self) -> None: ...

    def attached(self, attached: bool) -> None: ...

    def store_available(self, available: bool) -> None: ...

    def batch(self, statuses: Sequence[tuple[str, str]], seconds: float, waits: Sequence[float],
              conflicts: int) -> None:
        """One settled batch: (status, event_type) per message, its duration, publish-to-ack waits."""

    def copied(self, error_class: str, failed: bool) -> None: ...

    def publish_blocked(self, blocked: bool) -> None: ...

    def instrument(self, provider: Provider) -> Provider:
        """The provider the worker should call (this one, or a wrapper that measures it)."""
        return provider


class Metrics(Observer):
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        build_info(r)
        self.processed = Counter("messenger_processed_messages", "Messages settled, by outcome and event type",
                                 ["status", "event_type"], registry=r)
        self.processing = Histogram("messenger_processing_time_seconds", "Duration of one batch, receive to ack",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("myshop_queue_wait_seconds", "Publish-to-ack latency of each message",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter("myshop_retries", "Copies sent to a delay queue", ["error_class"], registry=r)
        self.dead_lettered = Counter("myshop_dead_lettered", "Copies sent to the failed queue", ["error_class"],
                                     registry=r)
        self.duplicates = Counter("myshop_duplicates", "Messages skipped as already applied", registry=r)
        self.conflicts = Counter("myshop_version_conflicts", "Optimistic-lock conflicts re-read and re-applied",
                                 registry=r)
        self.provider_requests = Counter("myshop_provider_requests", "Embedding provider calls", registry=r)
        self.provider_errors = Counter("myshop_provider_errors", "Embedding provider failures", ["kind"], registry=r)
        self.provider_seconds = Histogram("myshop_provider_request_seconds", "Embedding provider call duration",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("myshop_batch_size", "Messages per batch", buckets=BATCH_BUCKETS, registry=r)
        self.ready = Gauge("myshop_worker_ready", "1 while the consumer is attached, MongoDB answers and RabbitMQ "
                           "does not block publishing", registry=r)
        self.blocked = Gauge("myshop_publish_blocked", "1 while RabbitMQ blocks this worker's publishing (a memory or "
                             "disk alarm anywhere in the cluster): retry and failed copies wait", registry=r)
        self.last_turn = time.monotonic()
        self.is_attached = False
        self.store_ok = True
        self.publish_ok = True

    def turned(self) -> None:
        self.last_turn = time.monotonic()

    def attached(self, attached: bool) -> None:
        self.is_attached = attached
        self.ready.set(int(self.is_ready))

    def store_available(self, available: bool) -> None:
        self.store_ok = available
        self.ready.set(int(self.is_ready))

    def publish_blocked(self, blocked: bool) -> None:
        self.publish_ok = not blocked
        self.blocked.set(int(blocked))
        self.ready.set(int(self.is_ready))

    @property
    def is_ready(self) -> bool:
        return self.is_attached and self.store_ok and self.publish_ok

    def health(self) -> tuple[bool, dict]:
        age = time.monotonic() - self.last_turn
        return age < LIVENESS_S, {"loop_age_s": round(age, 3)}

    def readiness(self) -> tuple[bool, dict]:
        return self.is_ready, {"consumer_attached": self.is_attached, "mongodb": self.store_ok,
                               "publishing": self.publish_ok}

    def batch(self, statuses, seconds, waits, conflicts) -> None:
        for status, event_type in statuses:
            self.processed.labels(status, event_type).inc()
        self.duplicates.inc(sum(1 for s, _ in statuses if s == "duplicate"))
        self.processing.observe(seconds)
        self.batch_size.observe(len(statuses))
        for w in waits:
            self.queue_wait.observe(w)
        self.conflicts.inc(conflicts)

    def copied(self, error_class: str, failed: bool) -> None:
        (self.dead_lettered if failed else self.retries).labels(error_class).inc()

    def instrument(self, provider: Provider) -> Provider:
        return _TimedProvider(provider, self)


class _TimedProvider:
    """A provider that counts and times its calls."""

    def __init__(self, provider: Provider, metrics: Metrics):
        self._provider = provider
        self._metrics = metrics
        self.model = provider.model
        self.dimensions = provider.dimensions

    def embed_request(self, texts: Sequence[str]) -> list[np.ndarray | EmbeddingError]:
        m = self._metrics
        m.provider_requests.inc()
        start = time.perf_counter()
        try:
            return self._provider.embed_request(texts)
        except EmbeddingError as exc:
            m.provider_errors.labels("transient" if exc.transient else "permanent").inc()
            raise
        finally:
            m.provider_seconds.observe(time.perf_counter() - start)


class Probed(Protocol):
    registry: CollectorRegistry

    def health(self) -> tuple[bool, dict]: ...

    def readiness(self) -> tuple[bool, dict]: ...


DEFAULT_HOST = "127.0.0.1"  # reachable from this host only; --metrics-host 0.0.0.0 where a scraper must reach it
MAX_CONNECTIONS = 16  # served at once (one thread each); one more takes the slot of the oldest request still unsent
REQUEST_DEADLINE_S = 5.0  # request line and headers must arrive within this, in total; the answer has as long again
MAX_REQUEST_BYTES = 8192  # request line and headers; a longer request is answered 431 and closed
_TOO_LARGE = b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def read_head(sock: socket.socket, deadline: float, limit: int = MAX_REQUEST_BYTES) -> bytes | None:
    """The request line and headers of ``sock``, read until ``deadline`` (time.monotonic()) at the latest, whatever
    the client's pace; None when it did not arrive in time or the client closed; b"" when it is over ``limit``."""
    head = bytearray()
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            sock.settimeout(remaining)
            chunk = sock.recv(4096)
        except OSError:
            return None
        if not chunk:
            return None
        head += chunk
        if len(head) > limit:
            return b""
    return bytes(head)


class _BoundedServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that serves at most MAX_CONNECTIONS connections at once, each within
    REQUEST_DEADLINE_S. When all are taken, a new connection takes the slot of the one that has waited longest for
    its request (shut down): slow or silent clients, however many, cannot keep a prompt one from an answer."""

    daemon_threads = True
    request_queue_size = 64  # connections the kernel holds for accept(): a burst is answered or closed at once

    def __init__(self, *args, **kwargs):
        self._lock = threading.Lock()
        self._slots: set[socket.socket] = set()  # connections in service
        self._waiting: dict[socket.socket, None] = {}  # those still sending their request, oldest first
        super().__init__(*args, **kwargs)

    def connections(self) -> int:
        """Connections in service now."""
        with self._lock:
            return len(self._slots)

    def process_request(self, request, client_address) -> None:
        with self._lock:
            if len(self._slots) >= MAX_CONNECTIONS:
                if not self._waiting:  # every slot is sending an answer (each bounded by the deadline)
                    self.shutdown_request(request)
                    return
                oldest = next(iter(self._waiting))
                self._release(oldest)
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)  # its thread sees the end at once, and closes it
            self._slots.add(request)
            self._waiting[request] = None
        try:
            super().process_request(request, client_address)
        except Exception:
            with self._lock:
                self._release(request)
            raise

    def received(self, request: socket.socket) -> None:
        """The request of this connection has arrived: it is being answered, no longer evictable."""
        with self._lock:
            self._waiting.pop(request, None)

    def _release(self, request: socket.socket) -> None:
        self._slots.discard(request)
        self._waiting.pop(request, None)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._release(request)


def serve(target: Probed, port: int, host: str = DEFAULT_HOST) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz (liveness) and /readyz (readiness) of ``target`` on a daemon thread, on ``host``
    (127.0.0.1 unless told): at most MAX_CONNECTIONS at once, each request within REQUEST_DEADLINE_S and
    MAX_REQUEST_BYTES, one request per connection."""

    class Handler(BaseHTTPRequestHandler):
        server: _BoundedServer

        def handle(self) -> None:
            head = read_head(self.connection, time.monotonic() + REQUEST_DEADLINE_S)
            self.server.received(self.connection)
            self.connection.settimeout(REQUEST_DEADLINE_S)  # sending the answer (sendall: in total)
            if head == b"":
                self.wfile.write(_TOO_LARGE)
            elif head:
                self.rfile.close()
                self.rfile = io.BytesIO(head)
                self.handle_one_request()

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._send(200, generate_latest(target.registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, detail = target.health() if path == "/healthz" else target.readiness()
                body = json.dumps({"ok": ok, **detail}).encode() + b"\n"
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes are not worth a log line
            pass

    server = _BoundedServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


class QueueExporter:
    """Queue gauges for `myshop stats --serve-metrics`: one process per deployment, not one per worker."""

    def __init__(self, interval: float, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.interval = interval
        build_info(r)
        labels = ["queue", "role"]  # role: main | retry | failed | unrouted | other: alerts need no queue names
        self.depth = Gauge("messenger_queue_depth", "Ready messages in the queue", labels, registry=r)
        self.unacked = Gauge("myshop_queue_unacked", "Delivered, not yet acked (management API)", labels,
                             registry=r)
        self.consumers = Gauge("myshop_queue_consumers", "Consumers attached to the queue", labels, registry=r)
        self.failed = Gauge("myshop_failed_queue_messages", "Messages in the failed queue", registry=r)
        self.level = Gauge("myshop_queue_level", "Worst queue level: 0 ok, 1 warn, 2 critical", registry=r)
        self.members = Gauge("myshop_queue_members", "Replicas of a quorum queue (management API)", labels, registry=r)
        self.members_online = Gauge("myshop_queue_members_online", "Replicas of a quorum queue online", labels,
                                    registry=r)
        self.alarm = Gauge("myshop_rabbitmq_alarm", "1 while the node raises the alarm (memory or disk): every "
                           "publisher of the cluster is blocked", ["node", "kind"], registry=r)
        self.last_attempt = time.monotonic()
        self.error: str | None = "no collection yet"

    def update(self, report) -> None:
        """Set the gauges from a stats.Report."""
        for q in report.queues:
            self.depth.labels(q.name, q.role).set(q.ready)
            self.consumers.labels(q.name, q.role).set(q.consumers)
            if q.unacked is not None:
                self.unacked.labels(q.name, q.role).set(q.unacked)
            if q.role == "failed":
                self.failed.set(q.ready)
            if q.members is not None:
                self.members.labels(q.name, q.role).set(len(q.members["members"]))
                self.members_online.labels(q.name, q.role).set(len(q.members["online"]))
        self.alarm.clear()  # a cleared alarm leaves no series behind
        for a in report.alarms:
            self.alarm.labels(a["node"], a["kind"]).set(1)
        self.level.set(("ok", "warn", "critical").index(report.level))
        self.last_attempt, self.error = time.monotonic(), None

    def failed_collection(self, error: str) -> None:
        self.last_attempt, self.error = time.monotonic(), error

    def health(self) -> tuple[bool, dict]:
        age = time.monotonic() - self.last_attempt
        return age < 3 * self.interval + 30, {"last_collection_age_s": round(age, 3)}

    def readiness(self) -> tuple[bool, dict]:
        return self.error is None, {"error": self.error}
