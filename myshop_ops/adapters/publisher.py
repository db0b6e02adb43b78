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
tried in turn like :func:`myshop_ops.adapters.broker.connect`). A connection lost in the middle of a run (its node
died, the broker closed it) fails over: the other URLs are tried in turn, the lost one last, in rounds
``broker.FAILOVER_PAUSE_S`` apart, for ``broker.FAILOVER_S`` at most from the loss until a publish is confirmed again;
the publishes the lost connection had not confirmed go again first on the new one, with the same message id and
publish time (one may then be in the queue twice: consumers deduplicate by message id), counted in
``PublishResult.resent``. Past the bound the run stops: unconfirmed and unsent messages count as failed and
``PublishResult.error`` names the nodes tried. A channel the broker closes (a missing exchange), or a connection
closed after ``BLOCKED_TIMEOUT_S`` blocked by an alarm (every node is blocked), stops the run the same way at once.
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
    FAILOVER_PAUSE_S,
    FAILOVER_S,
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
    broker: str = ""  # the masked URL the run was published through (the first, when it failed over)
    brokers: list[str] = field(default_factory=list)  # every URL the run connected to, in order (failover)
    republished: int = 0  # nacked publishes sent again on a fresh channel
    resent: int = 0  # publishes a lost connection had not confirmed, sent again after failing over
    channels: int = 0  # channels opened (1 + one per nack stall)
    blocked_s: float = 0.0  # time the connection was blocked by a resource alarm

    @property
    def rate(self) -> float | None:
        """Published messages per second, None for an empty or instantaneous run."""
        return self.published / self.duration_s if self.published and self.duration_s > 0 else None

    @property
    def ms_per_event(self) -> float | None:
        return self.duration_s * 1000 / self.published if self.published else None

    @property
    def failovers(self) -> int:
        """Connections lost mid-run and replaced by another (or the same URL, back)."""
        return max(0, len(self.brokers) - 1)


class WindowedPublisher:
    """Publish a sequence of ``(body, message_id)`` with up to ``window`` unconfirmed messages in flight.

    ``delay_s`` > 0 spaces the publishes that far apart (rate limiting, on an absolute schedule so the
    spacing does not drift). ``on_settled(index, ok)`` is called for every message in publish order once
    it and all before it are settled (``--record`` writes there); ``on_progress(settled)`` at most every
    ``progress_every`` seconds and at the end; ``on_blocked(blocked, reason)`` when RabbitMQ blocks the connection
    (a resource alarm) and when it unblocks it; ``on_failover(line)`` with one line for the operator each time a lost
    connection is replaced. A lost connection is given ``failover_s`` to be replaced and confirm again.
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
        on_failover: Callable[[str], None] | None = None,
        failover_s: float = FAILOVER_S,
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
        self.on_failover = on_failover
        self.failover_s = failover_s

    # ---- the run --------------------------------------------------------------------------------

    def run(self, messages: Sequence[tuple[bytes, str]]) -> PublishResult:
        """Publish every message and wait for every confirm, failing over to another URL when the connection is
        lost. Raises BrokerError if no URL can be reached at the start."""
        self._reset(messages)
        if not self.urls:
            raise BrokerError("RabbitMQ unreachable: RABBITMQ_DSN holds no URL")
        n = len(self.urls)
        first = 0
        while True:
            for k in range(n):  # one round: from ``first`` on, the URL whose connection was lost last
                index = (first + k) % n
                self._carry(index)
                if self._finished:
                    return self._result
                if self._opened:  # it opened, then was lost: the next round starts after it
                    first = (index + 1) % n
                    break
            else:
                if not self._result.brokers:
                    raise BrokerError("RabbitMQ unreachable: " + "; ".join(self._open_errors.values())
                                      + " (is RabbitMQ running? check RABBITMQ_DSN)")
                left = self._lost_at + self.failover_s - time.monotonic()
                if left <= 0:
                    self._give_up()
                    return self._result
                time.sleep(min(FAILOVER_PAUSE_S, left))

    def _carry(self, index: int) -> None:
        """Connect to URL ``index`` and run the I/O loop until the run ends, the connection fails to open or is
        lost."""
        self._url = self.urls[index]
        self._opened = False
        self._connection = pika.SelectConnection(
            connection_parameters(self._url, name=self.name),
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )
        self._connection.add_on_connection_blocked_callback(self._on_blocked)
        self._connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._looping = True
        try:
            self._connection.ioloop.start()
        except ValueError:  # pika, when the peer is gone the moment the socket connects ("Expected connected socket")
            self._open_errors[self._url] = f"{mask_url(self._url)}: the connection dropped while opening"
        finally:
            self._looping = False
            self._connection.ioloop.close()

    def _reset(self, messages: Sequence[tuple[bytes, str]]) -> None:
        """The state of one run."""
        self._messages = messages
        self._total = n = len(messages)
        self._result = PublishResult(total=n, status=bytearray(n), sent_at=array("d", bytes(8 * n)))
        self._next = 0  # next new index to publish
        self._settled = 0
        self._redo: deque[int] = deque()  # nacked indices to publish again, on the current channel
        self._resend: deque[int] = deque()  # indices a lost connection had not confirmed, ascending
        self._attempts = bytearray(n)  # publishes of each index so far
        self._pending: dict = {}  # channel -> {delivery tag: index} not confirmed yet (tags ascending)
        self._tag: dict = {}  # channel -> last delivery tag used on it
        self._ready = False  # the current channel is in confirm mode
        self._blocked_since: float | None = None
        self._frontier = 0  # lowest index not settled yet; everything below was released in order
        self._returned: set[str] = set()
        self._scheduled = False
        self._finished = False
        self._open_errors: dict[str, str] = {}  # URL -> why its last connection attempt failed
        self._url = ""
        self._opened = False  # the current attempt's connection opened
        self._looping = False  # inside the current connection's I/O loop
        self._lost_at: float | None = None  # monotonic time of the loss not yet followed by a confirm
        self._lost_reason = ""
        self._connection: pika.SelectConnection | None = None
        self._channel = None
        self._t0 = 0.0
        self._last_progress = 0.0
        self._props = lambda mid, sent: pika.BasicProperties(
            content_type="application/json", delivery_mode=PERSISTENT, message_id=mid,
            headers={H_PUBLISHED_AT: int(sent * 1000)},
        )

    def _on_open_error(self, connection, exc: BaseException) -> None:
        self._open_errors[self._url] = _open_error_text(self._url, exc)
        connection.ioloop.stop()

    def _on_open(self, connection) -> None:
        self._opened = True
        res = self._result
        res.brokers.append(mask_url(self._url))
        res.broker = res.brokers[0]
        if len(res.brokers) > 1 and self.on_failover is not None:
            self.on_failover(f"connection to {res.brokers[-2]} lost ({self._lost_reason}): going on on "
                             f"{res.brokers[-1]}, {len(self._resend):,} unconfirmed publish(es) sent again first")
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
            if self._connection.is_open:
                self._abort(f"publishing failed: {type(exc).__name__} {exc}".strip())
            else:  # the connection is going: _on_closed fails over
                self._ready = False
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
        # what a lost connection had not confirmed, then the nacked ones (their first publish time is kept)
        budget = self._again(self._resend, CHUNK)
        if budget is None:
            return
        budget = self._again(self._redo, budget)
        if budget is None:
            return
        sent_at = res.sent_at
        window = self.window
        now = time.time
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

    def _again(self, queue: deque[int], budget: int) -> int | None:
        """Publish the indices of ``queue`` (``_resend`` or ``_redo``) again, up to ``budget`` of them; the budget
        left, or None when this turn is over (budget spent: the next turn is scheduled; or the channel is gone: the
        index stays queued)."""
        while queue:
            if budget == 0:
                self._kick()
                return None
            i = queue.popleft()
            if not self._send(i):
                queue.appendleft(i)
                return None
            if queue is self._resend:
                self._result.resent += 1
            else:
                self._result.republished += 1
            budget -= 1
        return budget

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
            self._lost_at = None  # confirmed again: a later loss has the whole failover bound
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
        elif conn is not None and self._looping:
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
        if not self._connection.is_open:  # the connection is going: _on_closed fails over
            self._ready = False
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
            if isinstance(reason, pex.ConnectionBlockedTimeout):  # an alarm blocks every node: no failover
                self._abort(f"RabbitMQ connection lost: {_reason_text(reason)}")
            else:
                self._lost(reason)
        connection.ioloop.stop()

    def _lost(self, reason: BaseException) -> None:
        """The connection is gone mid-run: what it had not confirmed goes again, first, on the next one."""
        self._lost_reason = _reason_text(reason)
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        unconfirmed = [i for pending in self._pending.values() for i in pending.values()]
        for i in unconfirmed:
            self._attempts[i] -= 1  # a publish lost with its connection is no nack attempt
        self._resend = deque(sorted({*self._resend, *unconfirmed}))
        self._pending.clear()
        self._tag.clear()
        self._channel = None
        self._ready = False
        self._scheduled = False  # a pump scheduled on the lost connection's loop never runs
        if self._blocked_since is not None:
            self._result.blocked_s += time.monotonic() - self._blocked_since
            self._blocked_since = None

    def _give_up(self) -> None:
        """No URL took over within FAILOVER_S: the run stops, the unconfirmed and unsent messages failed."""
        tried = "; ".join(self._open_errors.get(u) or f"{mask_url(u)}: lost" for u in self.urls)
        self._abort(f"RabbitMQ connection to {self._result.brokers[-1]} lost ({self._lost_reason}) and no node of "
                    f"RABBITMQ_DSN took over within {self.failover_s:g}s (tried {tried}): start a node or fix "
                    "RABBITMQ_DSN, then run again")


def _reason_text(reason: BaseException) -> str:
    if isinstance(reason, pex.ConnectionBlockedTimeout):
        return (f"blocked by a RabbitMQ resource alarm (memory or disk) for {BLOCKED_TIMEOUT_S}s "
                "(rabbitmq-diagnostics alarms)")
    if isinstance(reason, pex.ChannelClosedByBroker | pex.ConnectionClosedByBroker):
        return f"{reason.reply_code} {reason.reply_text}"
    return f"{type(reason).__name__} {reason}".strip()
