"""A fast confirmed publisher: pika SelectConnection with a window of unconfirmed messages in flight.

Waiting for each confirm caps a publisher at about 1k messages/s (the broker confirms a persistent
message only once its disk batch is synced); keeping up to ``window`` (default 1000) messages
unconfirmed reached 10-12k/s on the project's 2-core box (``notes/performance-anchors.md`` section 2).

Every message is published persistent (``delivery_mode=2``), ``content_type=application/json``, with
its AMQP ``message_id`` and the ``x-published-at`` header (epoch ms, as every publisher of the project sets it:
the worker's queue-wait metric), and *mandatory*: a message no queue takes comes back as Basic.Return (before
its Basic.Ack) and is counted as failed (``multiple`` honoured for both acks and nacks). A message is *published*
only once the broker confirmed it and did not return it.

A Basic.Nack is answered on a fresh channel: the nacked channel gets no new publishes (its confirms still settle
what it carries, then it is closed), the nacked messages go again first on the new one, each at most
NACK_ATTEMPTS times before it counts as nacked (RabbitMQ 3.10 nacks every publish of a channel opened during a
quorum leader election until the old leader returns; a fresh channel ends it: notes/rabbitmq-cluster.md). A
connection RabbitMQ blocks (memory or disk alarm anywhere in the cluster) is reported through ``on_blocked`` and
waited out for ``broker.BLOCKED_TIMEOUT_S`` at most, then the run stops with that reason.

``sent_at[i]`` is the wall-clock time (``time.time()``) at which message ``i`` was handed to pika's
``basic_publish`` (the frames leave on the next turn of the I/O loop): the publish time the
``--wait`` latencies of ``generate-test-events`` are measured from.

The connection goes to the first reachable URL of ``RABBITMQ_DSN`` (comma-separated for failover,
tried in turn like :func:`myshop_ops.adapters.broker.connect`). A connection or channel lost in the middle of
a run is not retried: the unconfirmed and unsent messages are counted as failed and the reason is
given in ``PublishResult.error`` (re-running publishes new events; consumers deduplicate by id anyway).
"""

from __future__ import annotations

import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pika
import pika.exceptions as pex
from pika.spec import Basic

from myshop_ops.adapters.broker import (
    BLOCKED_TIMEOUT_S,
    H_PUBLISHED_AT,
    NACK_PAUSES_S,
    PERSISTENT,
    BrokerError,
    connection_parameters,
    dsn_urls,
)
from myshop_ops.adapters.config import mask_url

DEFAULT_WINDOW = 1000
CHUNK = 256  # messages published per turn of the I/O loop, so confirms are read in between
NACK_ATTEMPTS = len(NACK_PAUSES_S) + 1  # publishes of one message, each on a fresh channel, before it counts as nacked

PENDING, OK, NACKED, RETURNED, LOST, UNSENT = range(6)


def _cause(exc: BaseException) -> BaseException | None:
    """What a pika connection error wraps: AMQPConnectionError(args) -> AMQPConnectionWorkflowFailed(exceptions)
    -> AMQPConnectorSocketConnectError(exception) -> the OSError."""
    for attr in ("exceptions", "exception"):
        inner = getattr(exc, attr, None)
        if isinstance(inner, list | tuple) and inner and isinstance(inner[-1], BaseException):
            return inner[-1]
        if isinstance(inner, BaseException):
            return inner
    return next((a for a in exc.args if isinstance(a, BaseException)), None)


def _open_error_text(url: str, exc: BaseException) -> str:
    """One line for a failed connection attempt, shaped like broker.connect's."""
    reason = exc
    for _ in range(10):
        inner = _cause(reason)
        if inner is None:
            break
        reason = inner
    if isinstance(reason, pex.ProbableAuthenticationError | pex.AuthenticationError):
        return f"{mask_url(url)}: authentication refused (check the user and password)"
    return f"{mask_url(url)}: {type(reason).__name__} {reason}".strip()


@dataclass
class PublishResult:
    """The outcome of one run. ``status[i]`` is one of OK, NACKED, RETURNED, LOST, UNSENT."""

    total: int
    published: int = 0
    failed: int = 0
    nacked: int = 0
    returned: int = 0
    lost: int = 0
    unsent: int = 0
    duration_s: float = 0.0  # first basic_publish -> last confirm
    started_at: float = 0.0  # wall clock of the first basic_publish
    status: bytearray = field(default_factory=bytearray)
    sent_at: array = field(default_factory=lambda: array("d"))
    error: str | None = None  # why the run stopped early, one line
    broker: str = ""  # the masked URL the run was published through
    republished: int = 0  # nacked publishes sent again on a fresh channel
    channels: int = 0  # channels opened (1 + one per nack stall)
    blocked_s: float = 0.0  # time the connection was blocked by a resource alarm

    @property
    def rate(self) -> float | None:
        """Published messages per second, None for an empty or instantaneous run."""
        return self.published / self.duration_s if self.published and self.duration_s > 0 else None

    @property
    def ms_per_event(self) -> float | None:
        return self.duration_s * 1000 / self.published if self.published else None


class WindowedPublisher:
    """Publish a sequence of ``(body, message_id)`` with up to ``window`` unconfirmed messages in flight.

    ``delay_s`` > 0 spaces the publishes that far apart (rate limiting, on an absolute schedule so the
    spacing does not drift). ``on_settled(index, ok)`` is called for every message in publish order once
    it and all before it are settled (``--record`` writes there); ``on_progress(settled)`` at most every
    ``progress_every`` seconds and at the end; ``on_blocked(blocked, reason)`` when RabbitMQ blocks the connection
    (a resource alarm) and when it unblocks it.
    """

    def __init__(
        self,
        dsn: str,
        exchange: str,
        routing_key: str,
        *,
        window: int = DEFAULT_WINDOW,
        delay_s: float = 0.0,
        name: str = "myshop-publisher",
        on_settled: Callable[[int, bool], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
        progress_every: float = 0.1,
        on_blocked: Callable[[bool, str], None] | None = None,
    ):
        if window < 1:
            raise ValueError("window must be at least 1")
        self.urls = dsn_urls(dsn)
        self.exchange = exchange
        self.routing_key = routing_key
        self.window = window
        self.delay_s = max(0.0, delay_s)
        self.name = name
        self.on_settled = on_settled
        self.on_progress = on_progress
        self.progress_every = progress_every
        self.on_blocked = on_blocked

    # ---- the run --------------------------------------------------------------------------------

    def run(self, messages: Sequence[tuple[bytes, str]]) -> PublishResult:
        """Publish every message and wait for every confirm. Raises BrokerError if no URL can be reached."""
        self._reset(messages)
        if not self.urls:
            raise BrokerError("RabbitMQ unreachable: RABBITMQ_DSN holds no URL")
        for url in self.urls:  # failover: the first URL that opens carries the whole run
            self._url = url
            self._connection = pika.SelectConnection(
                connection_parameters(url, name=self.name),
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_closed,
            )
            self._connection.add_on_connection_blocked_callback(self._on_blocked)
            self._connection.add_on_connection_unblocked_callback(self._on_unblocked)
            try:
                self._connection.ioloop.start()
            finally:
                self._connection.ioloop.close()
            if self._result.broker:
                return self._result
        raise BrokerError(
            "RabbitMQ unreachable: " + "; ".join(self._open_errors) + " (is RabbitMQ running? check RABBITMQ_DSN)"
        )

    def _reset(self, messages: Sequence[tuple[bytes, str]]) -> None:
        """The state of one run."""
        self._messages = messages
        self._total = n = len(messages)
        self._result = PublishResult(total=n, status=bytearray(n), sent_at=array("d", bytes(8 * n)))
        self._next = 0  # next new index to publish
        self._settled = 0
        self._redo: deque[int] = deque()  # nacked indices to publish again, on the current channel
        self._attempts = bytearray(n)  # publishes of each index so far
        self._pending: dict = {}  # channel -> {delivery tag: index} not confirmed yet (tags ascending)
        self._tag: dict = {}  # channel -> last delivery tag used on it
        self._ready = False  # the current channel is in confirm mode
        self._blocked_since: float | None = None
        self._frontier = 0  # lowest index not settled yet; everything below was released in order
        self._returned: set[str] = set()
        self._scheduled = False
        self._finished = False
        self._open_errors: list[str] = []
        self._url = ""
        self._connection: pika.SelectConnection | None = None
        self._channel = None
        self._t0 = 0.0
        self._last_progress = 0.0
        self._props = lambda mid, sent: pika.BasicProperties(
            content_type="application/json", delivery_mode=PERSISTENT, message_id=mid,
            headers={H_PUBLISHED_AT: int(sent * 1000)},
        )

    def _on_open_error(self, connection, exc: BaseException) -> None:
        self._open_errors.append(_open_error_text(self._url, exc))
        connection.ioloop.stop()

    def _on_open(self, connection) -> None:
        self._result.broker = mask_url(self._url)
        self._open_channel()

    def _open_channel(self) -> None:
        if self._finished:
            return
        self._ready = False
        self._result.channels += 1
        self._connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel) -> None:
        self._channel = channel
        self._pending[channel] = {}
        self._tag[channel] = 0
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(lambda frame, ch=channel: self._on_confirm(ch, frame),
                                 callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame) -> None:
        self._ready = True
        if not self._t0:
            self._t0 = time.monotonic()
            self._result.started_at = time.time()
        if self._total == 0:
            self._finish()
        else:
            self._pump()

    def _on_blocked(self, _connection, frame) -> None:
        if self._blocked_since is None:
            self._blocked_since = time.monotonic()
            if self.on_blocked is not None:
                self.on_blocked(True, str(getattr(frame.method, "reason", "") or "resource alarm"))

    def _on_unblocked(self, _connection, _frame) -> None:
        if self._blocked_since is not None:
            self._result.blocked_s += time.monotonic() - self._blocked_since
            self._blocked_since = None
            if self.on_blocked is not None:
                self.on_blocked(False, "")

    # ---- publishing -----------------------------------------------------------------------------

    def _kick(self, delay: float = 0.0) -> None:
        if not self._scheduled and not self._finished:
            self._scheduled = True
            self._connection.ioloop.call_later(delay, self._pump)

    def _send(self, i: int) -> bool:
        """Publish index ``i`` on the current channel; False when the channel or connection is gone (aborted)."""
        ch = self._channel
        body, mid = self._messages[i]
        try:
            ch.basic_publish(self.exchange, self.routing_key, body, self._props(mid, self._result.sent_at[i]),
                             mandatory=True)
        except (pex.AMQPError, OSError) as exc:  # channel or connection closed under us
            self._abort(f"publishing failed: {type(exc).__name__} {exc}".strip())
            return False
        self._tag[ch] += 1
        self._pending[ch][self._tag[ch]] = i
        self._attempts[i] += 1
        self._result.status[i] = PENDING
        return True

    def _pump(self) -> None:
        self._scheduled = False
        if self._finished or not self._ready:
            return
        res = self._result
        sent_at = res.sent_at
        window = self.window
        budget = CHUNK
        now = time.time
        while self._redo:  # nacked ones first, on this fresh channel (their first publish time is kept)
            if budget == 0:
                self._kick()
                return
            i = self._redo.popleft()
            if not self._send(i):
                return
            res.republished += 1
            budget -= 1
        while self._next < self._total and self._next - self._settled < window:
            if budget == 0:
                self._kick()
                return
            i = self._next
            if self.delay_s:
                wait = self._t0 + i * self.delay_s - time.monotonic()
                if wait > 0:
                    self._kick(wait)
                    return
            sent_at[i] = now()
            if not self._send(i):
                return
            self._next = i + 1
            budget -= 1

    # ---- confirms -------------------------------------------------------------------------------

    def _on_return(self, _channel, _method, properties, _body) -> None:
        # Basic.Return of a mandatory message precedes its Basic.Ack; its ack settles it as RETURNED.
        self._returned.add(properties.message_id or "")

    def _on_confirm(self, channel, frame) -> None:
        method = frame.method
        ok = isinstance(method, Basic.Ack)
        pending = self._pending.get(channel, {})
        if method.multiple:
            indices = []
            while pending and next(iter(pending)) <= method.delivery_tag:
                indices.append(pending.pop(next(iter(pending))))
        else:
            indices = [i for i in (pending.pop(method.delivery_tag, None),) if i is not None]
        if ok:
            for i in indices:
                self._settle(i, True)
        else:
            self._nacked(channel, indices)
        if channel is not self._channel and not pending:
            self._retire(channel)
        self._release()
        if self._settled == self._total:
            self._finish()
        else:
            self._maybe_progress()
            self._kick()

    def _nacked(self, channel, indices: list[int]) -> None:
        """Nacked: again on a fresh channel, unless a message has had all its attempts."""
        for i in indices:
            if self._attempts[i] >= NACK_ATTEMPTS:
                self._settle(i, False)
            else:
                self._redo.append(i)
        if indices and channel is self._channel and self._ready:  # the first nack of this channel: replace it
            self._ready = False  # nothing more on it; the fresh one opens after the pause of the attempt reached
            worst = max(self._attempts[i] for i in indices)
            self._connection.ioloop.call_later(NACK_PAUSES_S[min(worst, len(NACK_PAUSES_S)) - 1], self._open_channel)

    def _retire(self, channel) -> None:
        self._pending.pop(channel, None)
        self._tag.pop(channel, None)
        if channel.is_open:
            channel.close()

    def _settle(self, i: int, ok: bool) -> None:
        res = self._result
        if i >= self._next or res.status[i] != PENDING:
            return
        if not ok:
            res.status[i] = NACKED
            res.nacked += 1
        elif self._returned and self._messages[i][1] in self._returned:
            res.status[i] = RETURNED
            res.returned += 1
        else:
            res.status[i] = OK
            res.published += 1
        self._settled += 1

    def _release(self) -> None:
        status, callback = self._result.status, self.on_settled
        i = self._frontier
        while i < self._next and status[i] != PENDING:
            if callback is not None:
                callback(i, status[i] == OK)
            i += 1
        self._frontier = i

    def _maybe_progress(self) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        if now - self._last_progress >= self.progress_every:
            self._last_progress = now
            self.on_progress(self._settled)

    # ---- the end --------------------------------------------------------------------------------

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        res = self._result
        res.duration_s = time.monotonic() - self._t0 if self._t0 else 0.0
        res.failed = res.nacked + res.returned + res.lost + res.unsent
        if self.on_progress is not None:
            self.on_progress(self._settled)
        conn = self._connection
        if conn is not None and conn.is_open:
            conn.close()
        else:
            conn.ioloop.stop()

    def _abort(self, reason: str) -> None:
        """The channel or connection is gone: unconfirmed messages are lost, unsent ones never go."""
        if self._finished:
            return
        res = self._result
        res.error = res.error or reason
        for i in range(self._frontier, self._total):
            if i < self._next:
                if res.status[i] == PENDING:
                    res.status[i] = LOST
                    res.lost += 1
            else:
                res.status[i] = UNSENT
                res.unsent += 1
        self._settled = self._total
        self._release()
        self._finish()

    def _on_channel_closed(self, channel, reason: BaseException) -> None:
        if self._finished:
            return
        if channel is not self._channel:  # a nacked channel: what it still carried goes again on the current one
            left = self._pending.pop(channel, {})
            self._tag.pop(channel, None)
            self._redo.extend(left.values())
            self._kick()
            return
        self._abort(f"RabbitMQ closed the channel: {_reason_text(reason)}")

    def _on_closed(self, connection, reason: BaseException) -> None:
        if not self._finished:
            self._abort(f"RabbitMQ connection lost: {_reason_text(reason)}")
        connection.ioloop.stop()


def _reason_text(reason: BaseException) -> str:
    if isinstance(reason, pex.ConnectionBlockedTimeout):
        return (f"blocked by a RabbitMQ resource alarm (memory or disk) for {BLOCKED_TIMEOUT_S}s "
                "(rabbitmq-diagnostics alarms)")
    if isinstance(reason, pex.ChannelClosedByBroker | pex.ConnectionClosedByBroker):
        return f"{reason.reply_code} {reason.reply_text}"
    return f"{type(reason).__name__} {reason}".strip()
