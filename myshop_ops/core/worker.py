"""The consume loop: take what is delivered, run it through the pipeline, publish copies, ack.

All pika calls happen on the main thread; a batch runs on a helper thread while the main thread
keeps the connection serviced (heartbeats, new deliveries buffered for the next batch).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pika.exceptions as pex
from pika.spec import Basic, BasicProperties
from pymongo.errors import PyMongoError

from myshop_ops.adapters import broker, failures
from myshop_ops.adapters.broker import Publisher, Topology, published_at
from myshop_ops.adapters.config import ConfigError, Settings
from myshop_ops.adapters.dedup import RedisError, RedisState
from myshop_ops.adapters.embeddings import PhraseEmbedder, make_provider
from myshop_ops.adapters.metrics import Observer
from myshop_ops.adapters.notify import Notifier
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import MAX_BODY_BYTES, InvalidMessage
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_FAIL, EXIT_OK
from myshop_ops.base.values import Properties, read_properties
from myshop_ops.core.limits import Limits
from myshop_ops.core.pipeline import BatchResult, Item, Pipeline, Status, StoreUnavailable
from myshop_ops.core.ports import Channel, Connection, EventState, Phrases, ProfileStore
from myshop_ops.core.retry_routing import message_id_of
from myshop_ops.core.settlement import Outgoing, settle
from myshop_ops.core.window import BatchWindow, user_of

log = logging.getLogger(__name__)

IDLE_WAIT = 0.5  # seconds the loop blocks for deliveries before re-checking the stop conditions
# a retry or failed copy no queue takes (on a cluster: the classic delay/failed queue's node is down) is tried again
# on the same connection for this long, the batch held unacked: reconnecting would redeliver it, and each
# redelivery counts towards the quorum delivery limit, past which the broker dead-letters it at most once
UNROUTABLE_WAIT_S = 300.0
SOLO_ATTEMPTS = 2  # a message whose solo attempts killed this many workers goes to failed as poison
BODY_PREFIX_BYTES = 4096  # what is kept of a body over the contract's limit: enough to see what it was
# A batch claims its users in Redis for CLAIM_TTL_S (renewed while it runs, released after its write), so two workers
# never fold the same user at once; a delivery whose user another worker holds is kept, unacked, and tried again
# after KEEP_RETRY_S. A dead worker's claims free themselves when the TTL runs out.
CLAIM_TTL_S = 10.0
KEEP_RETRY_S = 0.05
KEEP_MAX_S = 3 * CLAIM_TTL_S  # a delivery kept this long is processed anyway (a claim key that never expires)


class PoisonMessage(Exception):
    """A message that kept killing the worker processing it on its own (crash, OOM kill, kill -9)."""


@dataclass(slots=True)
class Delivery:
    """A delivery as the worker keeps it: its properties parsed (``values.read_properties``: nothing behind this
    sees a raw pika value) and its body bounded (over the contract's MAX_BODY_BYTES only a BODY_PREFIX_BYTES
    prefix is kept, and ``size`` says how large it was)."""

    tag: int
    body: bytes
    properties: Properties
    redelivered: bool = False
    # attempts at a redelivered message since it came back, from the Redis journal (not counting the one about to
    # start); None: not read yet (or fresh), -1: unknown (Redis down)
    attempts: int | None = None
    size: int = -1  # the body's size as delivered; -1: len(body)
    user: str | None = None  # the body's user id, read cheaply on arrival (None: not an event, or not read)
    kept_since: float | None = None  # first kept for a later batch (its user claimed by another worker)

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.body)

    @classmethod
    def arrived(cls, tag: int, body: bytes, properties: object, redelivered: bool = False) -> Delivery:
        """What pika hands over, parsed and bounded once: the one place a raw delivery is read."""
        size = len(body)
        if size > MAX_BODY_BYTES:
            body = bytes(body[:BODY_PREFIX_BYTES])  # a copy: the large body is freed when pika drops it
        return cls(tag, body, read_properties(properties), bool(redelivered), size=size)

    @property
    def oversize(self) -> bool:
        """Larger than the contract allows: only a prefix was kept, it fails without being parsed."""
        return self.size > MAX_BODY_BYTES

    @property
    def key(self) -> str:
        return message_id_of(self.body, self.properties.message_id)

    @property
    def kind(self) -> str:
        """fresh | first (first attempt after a crash or connection loss) | suspect (a retry of that died too)."""
        if not self.redelivered:
            return "fresh"
        return "first" if self.attempts == 0 else "suspect"


@dataclass
class Totals:
    batches: int = 0
    applied: int = 0
    duplicate: int = 0
    skipped: int = 0
    erased: int = 0  # events of erased users from before their erasure: acked without effect
    retried: int = 0
    failed: int = 0
    writes: int = 0
    reads: int = 0  # profiles read from the store (not in this worker's cache of what it wrote last)
    conflicts: int = 0
    kept: int = 0  # deliveries kept for a later batch because another worker held their user

    @property
    def processed(self) -> int:
        return self.applied + self.duplicate + self.skipped + self.erased + self.retried + self.failed


class Worker:
    """``myshop consume``: one process, one connection, micro-batches of at most ``prefetch`` messages."""

    def __init__(
        self,
        settings: Settings,
        *,
        queue: str | None = None,
        prefetch: int = 200,
        limits: Limits | None = None,
        store: ProfileStore | None = None,
        redis: EventState | None = None,
        phrases: Phrases | None = None,
        notifier: Notifier | None = None,
        observer: Observer | None = None,
        connect: Callable[[], Connection] | None = None,
    ):
        """Each dependency left out is built from ``settings``; ``connect`` opens the consuming connection (default:
        broker.connect to RABBITMQ_DSN; the unit tests pass tests/support/stubs.py's StubBroker.connect)."""
        self.settings = settings
        self.topology = Topology.from_settings(settings, queue)
        self.prefetch = prefetch
        self.limits = limits or Limits()
        self.store = store or Store.from_settings(settings)
        self.redis = redis or RedisState.from_settings(settings)
        self.observer = observer or Observer()
        self.phrases = phrases or PhraseEmbedder(self.observer.instrument(make_provider(settings)), self.redis,
                                                 ttl=settings.cache_ttl)
        self.pipeline = Pipeline(settings, self.store, self.redis, self.phrases, embedder=lambda space: PhraseEmbedder(
            self.observer.instrument(make_provider(space.settings(settings))), self.redis, ttl=settings.cache_ttl))
        self.totals = Totals()
        self.notifier = notifier or Notifier()
        self._last_status = 0.0
        self._buffer: list[Delivery] = []  # delivered and ready to process, in delivery order
        self.token = uuid.uuid4().hex  # this worker's name on its claims
        self._claimed: list[str] = []  # the users the running batch holds
        self._kept_at: float | None = None  # when the front of the buffer was last kept (its users held elsewhere)
        # EMBEDDING_BATCH_ENABLED: fresh deliveries wait here (unacked) until their user has been quiet
        self.window: BatchWindow[Delivery] | None = (
            BatchWindow(settings.batch_window, max_held=max(1, prefetch * 4 // 5)) if settings.batch_enabled else None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self._connect = connect or (lambda: broker.connect(settings.rabbitmq_dsn, name="myshop-consume"))
        self._connection: Connection | None = None
        self._publisher: Publisher | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    def check_dependencies(self) -> None:
        """Raise if MongoDB or RabbitMQ cannot be reached (exit code 3), or ConfigError when the indexes the
        worker's correctness relies on are missing (exit code 2). Redis down only degrades."""
        self.store.ping()
        missing = self.store.missing_indexes()
        if missing:
            names = ", ".join(f"{c}.{i}" for c, i in missing)
            raise ConfigError("MONGODB_DB", self.settings.mongodb_db,
                              f"a database with the required indexes (missing: {names}); run `myshop setup-indexes`")
        try:
            self.redis.ping()
        except RedisError as exc:
            log.warning("Redis unreachable at start: deduplication falls back to MongoDB, no phrase cache",
                        extra={"error": failures.reason(exc)})
        broker.connect(self.settings.rabbitmq_dsn, name="myshop-check").close()

    def run(self) -> int:
        """Consume until a stop condition; returns the exit code (0 planned stop, 1 crash)."""
        backoff = 1.0
        code = EXIT_OK
        try:
            while not self.limits.check():
                try:
                    self._consume()
                    backoff = 1.0
                except broker.CONNECTION_ERRORS as exc:
                    self.observer.attached(False)
                    self._buffer.clear()
                    self._kept_at = None
                    if self.window is not None:
                        self.window.release_all()  # unacked: the broker redelivers them
                    delay = min(backoff, 30.0) * (0.5 + random.random())
                    log.warning("broker connection lost, reconnecting",
                                extra={"error": failures.reason(exc), "retry_in_s": round(delay, 2)})
                    self.notifier.status(f"reconnecting to RabbitMQ in {delay:.1f}s")
                    self._close_connection()
                    self._sleep(delay)
                    backoff *= 2
        except ConfigError as exc:
            log.error("worker stopped: %s", exc)
            self.limits.stop(str(exc))
            code = EXIT_CONFIG
        except Exception:
            log.exception("worker crashed")
            code = EXIT_FAIL
        finally:
            self.observer.attached(False)
            self.notifier.stopping(f"stopping: {self.limits.reason or 'crash'}")
            self._close_connection()
            self._executor.shutdown(wait=True)
        log.info("worker stopped", extra={"reason": self.limits.reason, **vars(self.totals)})
        return code

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.limits.check():
            self._alive()  # the loop is turning, waiting for the broker: no restart needed
            time.sleep(min(0.1, deadline - time.monotonic()))

    def _close_connection(self) -> None:
        conn, self._connection, self._publisher = self._connection, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:
                log.debug("closing the broker connection failed", exc_info=True)

    def _consume(self) -> None:
        self._connection = conn = self._connect()
        self._publisher = Publisher(conn, on_blocked=self._on_blocked, tick=self._alive)
        channel = conn.channel()
        channel.basic_qos(prefetch_count=self.prefetch)
        try:
            channel.basic_consume(self.topology.queue, self._on_message)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:  # a deployment error: reconnecting cannot fix it
                raise ConfigError("RABBITMQ_QUEUE", self.topology.queue,
                                  "an existing queue (it does not exist: run `myshop setup-transports`)") from None
            raise
        log.info("consuming", extra={"queue": self.topology.queue, "prefetch": self.prefetch})
        self.notifier.ready(f"consuming {self.topology.queue}")
        self.observer.attached(True)
        last_flag_check = 0.0
        while not self.limits.check():
            self._alive()
            conn.process_data_events(time_limit=self._idle_wait())
            if self.window is not None:
                self._buffer += self.window.release(time.monotonic())
            if time.monotonic() - last_flag_check > 1.0:
                last_flag_check = time.monotonic()
                if self.redis.stop_requested(self.limits.started_wall):
                    self.limits.stop("stop-workers requested")
            if self._buffer and not self.limits.check():
                conn.process_data_events(time_limit=0)  # what is already on the socket joins this batch
                self._run_batch(channel)
        channel.close()  # unprocessed deliveries go back to the queue

    def _on_blocked(self, blocked: bool, reason: str) -> None:
        """RabbitMQ blocks this connection (a memory or disk alarm anywhere in the cluster): copies to the retry and
        failed queues wait, so does the batch's ack (BLOCKED_TIMEOUT_S at most, then a reconnect)."""
        self.observer.publish_blocked(blocked)  # /readyz says not ready: this worker cannot settle now
        self.notifier.status(f"RabbitMQ blocks publishing ({reason}): waiting" if blocked else "publishing again")

    def _idle_wait(self) -> float:
        due = self.window.next_due(time.monotonic()) if self.window is not None else None
        if self._kept_at is not None:  # kept deliveries try their claims again soon
            due = min(due if due is not None else KEEP_RETRY_S, KEEP_RETRY_S)
        return IDLE_WAIT if due is None else min(IDLE_WAIT, due)

    def _alive(self) -> None:
        """The loop turned: feed systemd's watchdog and the liveness probe."""
        self.notifier.watchdog()
        self.observer.turned()

    def _on_message(self, _ch, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
        delivery = Delivery.arrived(method.delivery_tag, body, properties, method.redelivered)
        if not delivery.oversize:
            delivery.user = user_of(delivery.body)
        if self.window is None or delivery.redelivered or delivery.user is None:
            self._buffer.append(delivery)
        else:
            self.window.hold(delivery.user, delivery, time.monotonic())

    # ---- one batch ------------------------------------------------------------------------------

    def _take_batch(self) -> list[Delivery]:
        """The next batch, taken from a run at the front of the buffer: fresh deliveries; or redelivered ones on their
        first attempt since they came back; or one suspect alone, a redelivered message whose batch died again (a
        message that kills workers must not take batches down with it). Of the run, what ``_claim`` grants, up to
        the size; the rest stays in the buffer, in order (empty: every user of the run is held elsewhere)."""
        size = self.prefetch
        remaining = self.limits.remaining_messages()
        if remaining is not None:
            size = min(size, remaining)
        if self._buffer[0].redelivered and self._buffer[0].attempts is None:
            run = list(itertools.takewhile(lambda d: d.redelivered and d.attempts is None, self._buffer))
            counts = self.redis.attempts([d.key for d in run]) or [-1] * len(run)
            for delivery, count in zip(run, counts, strict=True):
                delivery.attempts = count
        kind = self._buffer[0].kind
        run = [self._buffer[0]] if kind == "suspect" else [
            *itertools.takewhile(lambda d: d.kind == kind, self._buffer)]
        batch = self._claim(run)[:size]
        taken = {id(d) for d in batch}
        self._buffer[:len(run)] = [d for d in run if id(d) not in taken]  # kept, or past the size: a later batch
        if kind != "fresh" and batch:
            self.redis.count_attempts([d.key for d in batch])
        return batch

    def _claim(self, batch: list[Delivery]) -> list[Delivery]:
        """What of ``batch`` this worker may fold now: the deliveries whose user it could claim (or that have none).
        The others are kept in the buffer, unacked and uncounted, for a later batch; with Redis down every delivery
        goes (the conditional write alone keeps the profiles exact)."""
        users = list(dict.fromkeys(d.user for d in batch if d.user is not None))
        claimed = self.redis.claim(users, self.token, int(CLAIM_TTL_S * 1000), self.pipeline.model,
                                   self.pipeline.dimensions)
        if claimed is None:
            self._claimed, self._kept_at = [], None
            return batch
        self._claimed = [u for u, c in zip(users, claimed.codes, strict=True) if c]
        # written by another worker since this one cached it: the profile it left, else a read
        self.pipeline.forget(u for u, c in zip(users, claimed.codes, strict=True) if c == 1)
        self.pipeline.remember(claimed.profiles)
        granted, now = set(self._claimed), time.monotonic()
        taken, kept = [], []
        for d in batch:
            free = d.user is None or d.user in granted or now - (d.kept_since or now) > KEEP_MAX_S
            (taken if free else kept).append(d)
        for d in kept:
            d.kept_since = d.kept_since or now
        self._kept_at = now if kept else None
        self.totals.kept += len(kept)
        return taken

    def _run_batch(self, channel) -> None:
        if self._kept_at is not None and time.monotonic() - self._kept_at < KEEP_RETRY_S:
            return  # the front of the buffer waits for users other workers hold: not again at once
        started = time.perf_counter()
        batch = self._take_batch()
        if not batch:
            return
        head = batch[0]
        redelivered = [d.key for d in batch if d.redelivered]
        try:
            try:
                if head.kind == "suspect" and head.attempts >= 1 + SOLO_ATTEMPTS:
                    error = PoisonMessage(f"{head.attempts - 1} workers died processing this message alone")
                    result = BatchResult(items=[Item(body=head.body, status=Status.FAILED, error=error)])
                else:
                    result = self._process(batch)
            finally:  # the write is done (or the batch cut): other workers may fold these users now
                self.redis.release(self._claimed, self.token, self.pipeline.cached(self._claimed))
                self._claimed = []
            self._settle(channel, batch, result)
        except broker.CONNECTION_ERRORS:
            # the broker cut the batch (a lost node, a connection closed, an alarm outlasting BLOCKED_TIMEOUT_S), not
            # its messages: their redeliveries are not attempts that died (the poison journal counts worker deaths)
            self.redis.attempts_done(redelivered)
            raise
        self.redis.attempts_done(redelivered)
        self._observe(batch, result, time.perf_counter() - started)
        self._alive()
        if time.monotonic() - self._last_status > 1.0:
            self._last_status = time.monotonic()
            t = self.totals
            self.notifier.status(f"processed {t.processed}, applied {t.applied}, failed {t.failed}, "
                                 f"retried {t.retried}")
        if any(isinstance(i.error, StoreUnavailable) for i in result.items):
            self._wait_for_store()

    def _process(self, batch: list[Delivery]) -> BatchResult:
        """Run the pipeline on the batch thread while this thread keeps the connection serviced; a body over the
        contract's limit fails there and then (only its prefix was kept)."""
        conn = self._connection
        future = self._executor.submit(_through, self.pipeline, batch)
        future.add_done_callback(lambda _f: _wake(conn))
        renewed = time.monotonic()
        try:
            while not future.done():
                conn.process_data_events(time_limit=IDLE_WAIT)  # heartbeats keep flowing; returns when woken
                self._alive()  # a slow provider is not a hung worker
                if self._claimed and time.monotonic() - renewed > CLAIM_TTL_S / 3:  # a slow batch keeps its users
                    renewed = time.monotonic()
                    self.redis.claim(self._claimed, self.token, int(CLAIM_TTL_S * 1000), self.pipeline.model,
                                     self.pipeline.dimensions)
        except broker.CONNECTION_ERRORS:
            future.result()  # let the batch land; its messages come back and are deduplicated
            raise
        return future.result()

    def _wait_for_store(self) -> None:
        """MongoDB failed: stop taking messages (they stay delivered, unacked) until it answers again."""
        delay = 0.5
        self.observer.store_available(False)
        while not self.limits.check():
            try:
                self.store.ping()
                log.info("MongoDB is back")
                self.observer.store_available(True)
                return
            except PyMongoError as exc:
                wait = min(delay, 30.0) * (0.5 + random.random())
                log.warning("MongoDB unavailable, pausing",
                            extra={"error": failures.reason(exc), "retry_in_s": round(wait, 2)})
                self.notifier.status(f"waiting for MongoDB ({wait:.1f}s)")
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and not self.limits.check():
                    self._connection.process_data_events(time_limit=0.1)
                    self._alive()  # waiting out an outage is healthy; a restart would not help
                delay *= 2

    def _observe(self, batch: list[Delivery], result: BatchResult, seconds: float) -> None:
        now = time.time()
        waits = [now - t for t in (published_at(d.properties) for d in batch) if t is not None]
        statuses = [(i.status, i.event.event_type if i.event else "invalid") for i in result.items]
        self.observer.batch(statuses, seconds, waits, result.conflicts)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch settled", extra={"size": len(batch), "duration_ms": round(seconds * 1000, 2),
                                              **dict(result.counts), "writes": result.writes})

    def _publish_copy(self, exchange: str, routing_key: str, body: bytes, **kwargs) -> None:
        """Publish a retry or failed copy; an unroutable one is tried again for UNROUTABLE_WAIT_S while the
        connection stays serviced and the batch unacked (no redelivery), then the error is raised."""
        deadline = time.monotonic() + UNROUTABLE_WAIT_S
        pause = 0.5
        while True:
            try:
                self._publisher.publish(exchange, routing_key, body, **kwargs)
                return
            except broker.Unroutable as exc:
                if time.monotonic() >= deadline or self.limits.check():
                    raise
                log.warning("copy unroutable, holding the batch and trying again", extra={
                    "error": str(exc), "retry_in_s": pause,
                    "gives_up_in_s": round(deadline - time.monotonic())})
                self.notifier.status(f"copy to '{exchange or routing_key}' unroutable: retrying")
                until = time.monotonic() + pause
                while time.monotonic() < until and not self.limits.check():
                    self._connection.process_data_events(time_limit=0.1)
                    self._alive()  # waiting for a queue's node to return is healthy; a restart would not help
                pause = min(pause * 2, 5.0)

    def _settle(self, channel: Channel, batch: list[Delivery], result: BatchResult) -> None:
        """Carry out ``settlement.settle``: publish each copy (confirmed), record the failed ones, then ack. Raises
        before the ack when a copy cannot be published: the batch stays unacked and comes back."""
        t = self.totals
        failed_before = t.failed
        plan = settle(self.topology, batch, result.items, ack_each=self.window is not None,
                      lowest_open=min((d.tag for d in self._buffer), default=None))
        for out in plan.copies:
            self._publish_copy(
                out.copy.exchange,
                out.copy.routing_key,
                out.delivery.body,
                message_id=out.message_id,
                headers=out.copy.headers,
                content_type=out.delivery.properties.content_type or "application/json",
            )
            self.observer.copied(out.copy.error_class, out.copy.failed)
            if out.copy.failed:
                t.failed += 1
            else:
                t.retried += 1
            _log_copy(out)
        records = [out.record for out in plan.copies if out.record]
        if records:
            try:
                self.store.record_failures(records)
            except Exception as exc:
                log.error("could not record failed messages in MongoDB", extra={"error": failures.reason(exc)})
        for tag, multiple in plan.acks:
            channel.basic_ack(delivery_tag=tag, multiple=multiple)
        t.batches += 1
        t.applied += len(result.by_status(Status.APPLIED))
        t.duplicate += len(result.by_status(Status.DUPLICATE))
        t.skipped += len(result.by_status(Status.SKIPPED))
        t.erased += len(result.by_status(Status.ERASED))
        t.writes += result.writes
        t.reads += result.reads
        t.conflicts += result.conflicts
        self.limits.count(len(batch), t.failed - failed_before)


def _log_copy(out: Outgoing) -> None:
    """One log line per copy: an error for a failed one, a warning for a retry."""
    copy, event = out.copy, out.item.event
    fields = {"message_id": out.message_id, "user_id": event.user_id if event else None,
              "event_type": event.event_type if event else None,
              "retry_count": copy.retry_count, "error_class": copy.error_class, "error": copy.error_message}
    if copy.ignored:
        fields["ignored_headers"] = "; ".join(copy.ignored)
    if out.record:
        fields["failure_id"] = out.record["failure_id"]
    if copy.failed:
        log.error("message failed", extra=fields)
    else:
        log.warning("message retried later", extra=fields)


def _through(pipeline: Pipeline, batch: list[Delivery]) -> BatchResult:
    """The batch's outcomes in delivery order: the pipeline's, and an InvalidMessage naming the size for each body
    over the contract's limit (never parsed: only its prefix was kept)."""
    bodies = [d.body for d in batch if not d.oversize]
    if len(bodies) == len(batch):
        return pipeline.process(bodies)
    result = pipeline.process(bodies) if bodies else BatchResult(items=[])
    processed = iter(result.items)
    result.items = [next(processed) if not d.oversize else Item(
        body=d.body, status=Status.FAILED,
        error=InvalidMessage(f"body: larger than {MAX_BODY_BYTES} bytes (got {d.size})")) for d in batch]
    result.counts[Status.FAILED] += len(batch) - len(bodies)
    return result


def _wake(conn) -> None:
    """End the connection thread's wait for I/O now (called from the batch thread when the batch is done)."""
    with contextlib.suppress(Exception):  # closed meanwhile: the connection thread is not waiting on it
        conn.add_callback_threadsafe(lambda: None)
