"""RabbitMQ: connection with failover (at the start, and for the tools that move messages when a connection is lost
mid-run), the topology's names and policies (declared by ``transports``), a confirmed publisher that survives a
cluster's nack stall and waits out resource alarms with a bound, queue depth."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import BasicProperties

from myshop_ops.adapters.amqp_fields import encodable  # importing it: hostile header values decoded without raising
from myshop_ops.adapters.config import ConfigError, Settings, mask_url

log = logging.getLogger(__name__)

DELIVERY_LIMIT = 10  # quorum main queue: a message redelivered this often (crash loops) goes to `failed`
PERSISTENT = pika.DeliveryMode.Persistent
# a connection RabbitMQ blocks (memory or disk alarm: every publisher of the cluster) is given up after this long:
# pika closes it with ConnectionBlockedTimeout, publishers raise PublishBlocked, the worker reconnects
BLOCKED_TIMEOUT_S = 60
# a nacked publish is sent again on a fresh channel, at most this many times in all, pausing NACK_PAUSES_S between:
# RabbitMQ 3.10 nacks every publish of a channel opened during a quorum leader election until the old leader
# returns (seconds, or forever); a fresh channel ended it within 0.5 s in every run (notes/rabbitmq-cluster.md)
NACK_PAUSES_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0)
# a publisher whose connection is lost mid-run (its node died) tries the URLs of RABBITMQ_DSN in rounds this far
# apart, the lost one last, for this long from the loss until a publish is confirmed again; then it gives up
FAILOVER_S = 60
FAILOVER_PAUSE_S = 0.5


class BrokerError(Exception):
    """RabbitMQ could not be reached or refused an operation; ``str()`` is one line for the operator."""


class Unroutable(BrokerError):
    """A mandatory publish came back: no queue took it (a missing binding, or on a cluster a classic queue whose node
    is down)."""


class PublishBlocked(BrokerError):
    """A publish waited BLOCKED_TIMEOUT_S on a connection RabbitMQ blocked (memory or disk alarm) and gave up."""


# what a lost or refused connection raises: the consumer reconnects, the exporter retries
CONNECTION_ERRORS = (pex.AMQPConnectionError, pex.AMQPChannelError, pex.StreamLostError, BrokerError, ConnectionError)
# what an operation on a connection that was lost under it raises (StreamLostError and ConnectionClosedByBroker are
# AMQPConnectionErrors; a channel of a closed connection raises ChannelWrongStateError): a Failover takes it from there
CONNECTION_LOST = (pex.AMQPConnectionError, pex.ConnectionWrongStateError, pex.ChannelWrongStateError,
                   ConnectionError)
CONNECTION_FORCED = 320  # the close a node sends its clients when it shuts down: a lost node, not a refusal


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection was lost (its node died or shut down), not refused by a broker that
    closed it on an error (540 NOT_IMPLEMENTED, 530 NOT_ALLOWED...: refused again on any other node)."""
    if isinstance(exc, pex.ConnectionClosedByBroker):
        return exc.reply_code == CONNECTION_FORCED
    return isinstance(exc, CONNECTION_LOST)


SHOP_ROUTING_KEY = "user.embedding.update"  # the shop's Symfony transport: default_publish_routing_key
POLICY_PRIORITY = 10  # above a catch-all policy an operator may have (one policy applies per object)


@dataclass(frozen=True, slots=True)
class Policy:
    """A RabbitMQ policy for one object: what may change without redeclaring (dead-lettering, delivery limit, TTLs,
    alternate exchange) lives in policies, so a queue is declared with nothing but its type, as the shop declares
    it."""

    name: str
    target: str  # the queue or exchange it applies to (its pattern matches that name only)
    apply_to: str  # queues | exchanges
    definition: dict

    @property
    def pattern(self) -> str:
        return "^" + re.escape(self.target) + "$"


@dataclass(frozen=True)
class Topology:
    """Names, arguments and policies of every exchange and queue; the main exchange has the main queue's name."""

    queue: str = "user_embedding_updates"
    failed_queue: str = "failed"
    queue_type: str = "quorum"
    retry_delays_ms: tuple[int, ...] = (5000, 10000, 20000, 40000, 60000)
    delivery_limit: int = DELIVERY_LIMIT
    binding_keys: tuple[str, ...] = (SHOP_ROUTING_KEY,)  # what producers publish with (besides the queue's name)
    failed_retention_days: int = 0  # > 0: failed copies expire after this many days (a policy on the failed queue)
    # on a cluster (several nodes): the delay, failed and unrouted queues are quorum queues too (replicated, so no
    # node takes the retry and failed paths down with it); on one node they stay classic queues
    replicated: bool = False

    @classmethod
    def from_settings(cls, s: Settings, queue: str | None = None) -> Topology:
        return cls(
            queue=queue or s.queue,
            failed_queue=s.failed_queue,
            queue_type=s.rabbitmq_queue_type,
            retry_delays_ms=tuple(s.retry_delays_ms),
            binding_keys=tuple(s.rabbitmq_binding_keys),
            failed_retention_days=s.failed_retention_days,
        )

    @property
    def exchange(self) -> str:
        return self.queue

    @property
    def failed_exchange(self) -> str:
        return self.failed_queue

    @property
    def unrouted(self) -> str:
        """The alternate exchange of the main exchange (fanout) and its queue: what no binding matched."""
        return f"{self.queue}.unrouted"

    @property
    def routing_keys(self) -> tuple[str, ...]:
        """Every key the main queue is bound with: its own name (retry copies come back with it), then the
        producers' keys."""
        return tuple(dict.fromkeys((self.queue, *self.binding_keys)))

    def retry_queue(self, attempt: int) -> str:
        """The delay queue of retry ``attempt`` (1-based)."""
        return f"{self.queue}.retry.{attempt}"

    def main_arguments(self) -> dict:
        """The main queue's declare arguments: only its type, which no policy can set. A producer that declares
        the queue (Symfony's auto_setup) must pass exactly these."""
        return {"x-queue-type": self.queue_type}

    def queue_arguments(self, name: str) -> dict:
        """The declare arguments of a queue of the topology: the main queue's, else the quorum type when
        ``replicated``, else none (a classic queue, as it always was)."""
        if name == self.queue:
            return self.main_arguments()
        return {"x-queue-type": "quorum"} if self.replicated else {}

    def queue_type_of(self, name: str) -> str:
        return self.queue_arguments(name).get("x-queue-type", "classic")

    def policies(self) -> list[Policy]:
        # a quorum queue dead-letters at most once unless told otherwise: a copy is dropped when its target is
        # unreachable (a node down); at-least-once needs overflow reject-publish (RabbitMQ 3.10: policy keys)
        safe = {"dead-letter-strategy": "at-least-once", "overflow": "reject-publish"} if self.replicated else {}
        main = {"dead-letter-exchange": self.failed_exchange, "dead-letter-routing-key": self.failed_queue}
        if self.queue_type == "quorum":
            main["delivery-limit"] = self.delivery_limit
            main.update(safe)
        policies = [
            Policy(f"myshop.{self.queue}", self.queue, "queues", main),
            Policy(f"myshop.{self.queue}.exchange", self.exchange, "exchanges",
                   {"alternate-exchange": self.unrouted}),
        ]
        if self.failed_retention_days:  # failed messages hold bodies (search phrases): not kept forever
            policies.append(Policy(f"myshop.{self.failed_queue}", self.failed_queue, "queues",
                                   {"message-ttl": self.failed_retention_days * 86_400_000}))
        for attempt, delay in enumerate(self.retry_delays_ms, start=1):
            policies.append(Policy(f"myshop.{self.retry_queue(attempt)}", self.retry_queue(attempt), "queues",
                                   {"message-ttl": delay, "dead-letter-exchange": self.exchange,
                                    "dead-letter-routing-key": self.queue, **safe}))
        return policies

    def queues(self) -> list[str]:
        """Every queue of the topology: main, retries, failed, unrouted."""
        return [self.queue, *(self.retry_queue(i) for i in range(1, len(self.retry_delays_ms) + 1)),
                self.failed_queue, self.unrouted]


H_PUBLISHED_AT = "x-published-at"  # epoch milliseconds of the first publish, kept by retry copies


EARLIEST_PUBLISH = 946_684_800  # 2000-01-01: a publish time before it, or in the future, is no publish time


def publish_time(ms: object) -> float | None:
    """An x-published-at header value (epoch milliseconds) as epoch seconds, or None unless it is an integer
    between 2000 and now (plus a minute of clock skew)."""
    if not isinstance(ms, int) or isinstance(ms, bool):
        return None
    return ms / 1000 if EARLIEST_PUBLISH * 1000 <= ms <= (time.time() + 60) * 1000 else None


def published_at(properties: BasicProperties) -> float | None:
    """When a message was first published (epoch seconds): our header, else the AMQP timestamp, else None (a
    value out of range or of another type is ignored: publishers choose these)."""
    at = publish_time((properties.headers or {}).get(H_PUBLISHED_AT))
    if at is not None:
        return at
    stamp = properties.timestamp
    if isinstance(stamp, int) and not isinstance(stamp, bool) and EARLIEST_PUBLISH <= stamp <= time.time() + 60:
        return float(stamp)
    return None


def dsn_urls(dsn: str) -> list[str]:
    """The URLs of a RABBITMQ_DSN (several, comma-separated, are tried in turn for failover)."""
    return [u.strip() for u in dsn.split(",") if u.strip()]


def connection_parameters(url: str, *, name: str, heartbeat: int = 30) -> pika.URLParameters:
    """pika parameters of one URL: our heartbeat unless the URL sets one, bounded socket waits, a connection name
    (shown by `rabbitmqctl list_connections` and the management UI)."""
    try:
        params = pika.URLParameters(url)
    except (TypeError, ValueError) as exc:  # a query option pika cannot use (ssl_options={}, heartbeat=abc, ...)
        raise ConfigError("RABBITMQ_DSN", url, f"connection options pika accepts ({exc})") from None
    if "heartbeat" not in url:
        params.heartbeat = heartbeat
    params.blocked_connection_timeout = BLOCKED_TIMEOUT_S
    params.socket_timeout = 5
    params.stack_timeout = 15
    params.connection_attempts = 1
    params.client_properties = {"connection_name": name}
    return params


_UNREACHABLE_HINT = " (is RabbitMQ running? check RABBITMQ_DSN)"


def connect(dsn: str, *, heartbeat: int = 30, name: str = "myshop") -> BlockingConnection:
    """Connect to the first reachable URL of a comma-separated DSN list."""
    errors = []
    for url in dsn_urls(dsn):
        params = connection_parameters(url, name=name, heartbeat=heartbeat)
        try:
            return pika.BlockingConnection(params)
        except ValueError:  # pika, when the peer is gone the moment the socket connects ("Expected connected socket")
            errors.append(f"{mask_url(url)}: the connection dropped while opening")
        except pex.ProbableAuthenticationError:
            errors.append(f"{mask_url(url)}: authentication refused (check the user and password)")
        except pex.AMQPError as exc:
            errors.append(f"{mask_url(url)}: {type(exc).__name__} {exc}".strip())
        except OSError as exc:
            errors.append(f"{mask_url(url)}: {exc}")
    raise BrokerError("RabbitMQ unreachable: " + "; ".join(errors) + " (is RabbitMQ running? check RABBITMQ_DSN)")


class Failover:
    """The connection of a tool that moves messages, and its replacement when it is lost mid-run.

    ``connect()`` opens the first reachable URL of the DSN (as ``connect``); ``recover(lost)`` after an operation
    raised one of CONNECTION_LOST opens another: the URLs after the lost one first, the lost one last, in rounds
    FAILOVER_PAUSE_S apart, for FAILOVER_S at most, then BrokerError naming every URL tried and what to do. The tool
    redoes its unit of work on the new connection (what was fetched and not acked is back in its source queue: the
    lost channel's deliveries return to it). ``failovers`` counts the connections replaced, ``resent`` what the tool
    published again after one."""

    def __init__(self, dsn: str, *, name: str, budget_s: float = FAILOVER_S):
        self.urls = dsn_urls(dsn)
        self.name = name
        self.budget_s = budget_s
        self.connection: BlockingConnection | None = None
        self.failovers = 0
        self.resent = 0
        self._index = 0

    def connect(self) -> BlockingConnection:
        """The first connection (BrokerError when no URL opens, as ``connect``)."""
        self.connection, self._index = self._first_open(range(len(self.urls)))
        return self.connection

    def _first_open(self, order: Iterable[int]) -> tuple[BlockingConnection, int]:
        errors = []
        for i in order:
            try:
                return connect(self.urls[i], name=self.name), i
            except BrokerError as exc:
                errors.append(str(exc).removeprefix("RabbitMQ unreachable: ").removesuffix(_UNREACHABLE_HINT))
        raise BrokerError("RabbitMQ unreachable: " + "; ".join(errors) + _UNREACHABLE_HINT)

    def recover(self, lost: BaseException) -> BlockingConnection:
        """A connection to another node (or the same one, back) after ``lost``; BrokerError past the bound. ``lost``
        raised again when it is not a lost connection but the broker's refusal (going on would repeat it forever)."""
        if not connection_lost(lost):
            raise lost
        lost_url = mask_url(self.urls[self._index])
        reason = f"{type(lost).__name__} {lost}".strip()
        with contextlib.suppress(Exception):
            if self.connection is not None and self.connection.is_open:
                self.connection.close()
        n = len(self.urls)
        order = [(self._index + 1 + k) % n for k in range(n)]
        deadline = time.monotonic() + self.budget_s
        while True:
            try:
                self.connection, self._index = self._first_open(order)
                break
            except BrokerError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(f"RabbitMQ connection to {lost_url} lost ({reason}) and no node of RABBITMQ_DSN "
                                      f"took over within {self.budget_s:g}s ({str(exc).removesuffix(_UNREACHABLE_HINT)}"
                                      "): start a node or fix RABBITMQ_DSN, then run again") from None
                time.sleep(min(FAILOVER_PAUSE_S, left))
        self.failovers += 1
        log.warning("RabbitMQ connection lost, going on on another node",
                    extra={"lost": lost_url, "reason": reason, "now": mask_url(self.urls[self._index])})
        return self.connection

    def report(self) -> str | None:
        """One line for the operator once a connection was replaced (None before)."""
        if not self.failovers:
            return None
        return (f"RabbitMQ connection lost {self.failovers} time(s), went on on another node: {self.resent} "
                "republished after failover (such a message may be in its queue twice: consumers deduplicate by "
                "message id)")

    def close(self) -> None:
        with contextlib.suppress(pex.AMQPError, OSError):
            if self.connection is not None and self.connection.is_open:
                self.connection.close()


def queue_depth(connection: BlockingConnection, queue: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of ``queue``, or None when it does not exist."""
    ch = connection.channel()
    try:
        ok = ch.queue_declare(queue, passive=True)
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    ch.close()
    return ok.method.message_count, ok.method.consumer_count


def exchange_exists(connection: BlockingConnection, exchange: str) -> bool:
    """Whether ``exchange`` exists (a passive declare on its own channel)."""
    ch = connection.channel()
    try:
        ch.exchange_declare(exchange, passive=True)
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False
        raise
    ch.close()
    return True


def declared_differently(connection: BlockingConnection, queue: str, arguments: dict) -> str | None:
    """How the existing ``queue`` differs from a durable queue with the declare ``arguments`` RabbitMQ compares
    (x-queue-type, x-dead-letter-*, x-message-ttl, x-delivery-limit, ...), told by the broker itself: a declare
    with them on a channel of its own, refused with 406 PRECONDITION_FAILED and RabbitMQ's reply text naming the
    first difference; "" when it does not differ. None when the queue does not exist (a passive declare first:
    nothing is created). Any other refusal raises ChannelClosedByBroker."""
    if queue_depth(connection, queue) is None:
        return None
    return _difference(connection, lambda ch: ch.queue_declare(queue, durable=True, arguments=arguments))


def exchange_differently(connection: BlockingConnection, exchange: str, kind: str) -> str | None:
    """As ``declared_differently``, for a durable exchange of type ``kind``."""
    if not exchange_exists(connection, exchange):
        return None
    return _difference(connection, lambda ch: ch.exchange_declare(exchange, exchange_type=kind, durable=True))


def _difference(connection: BlockingConnection, declare: Callable) -> str:
    ch = connection.channel()
    try:
        declare(ch)
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            return str(exc.reply_text).removeprefix("PRECONDITION_FAILED - ") or "PRECONDITION_FAILED"
        raise
    ch.close()
    return ""


def cluster_name(connection: BlockingConnection) -> str | None:
    """The cluster name the broker gave in its Connection.Start server properties (None when it gave none)."""
    props = getattr(getattr(connection, "_impl", None), "server_properties", None)
    value = props.get("cluster_name") if isinstance(props, dict) else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def address(connection: BlockingConnection) -> str:
    """host:port of the node the connection reached ("?" when pika does not tell)."""
    params = getattr(getattr(connection, "_impl", None), "params", None)
    host, port = getattr(params, "host", "?"), getattr(params, "port", "?")
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@contextlib.contextmanager
def probe_queue(connection: BlockingConnection) -> Iterator[str | None]:
    """A server-named exclusive queue that lives for the ``with`` block (its name; None when the broker refused
    to declare one, e.g. no configure permission on amq.gen-*): proof that another view of the broker is this one."""
    ch = connection.channel()
    try:
        name = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
    except pex.ChannelClosedByBroker:
        yield None
        return
    try:
        yield name
    finally:
        if ch.is_open:
            with contextlib.suppress(pex.AMQPError):
                ch.queue_delete(name)
                ch.close()


def missing_objects(connection: BlockingConnection, topo: Topology) -> list[str]:
    """What producers need and does not exist: the main queue and the main exchange, named (empty: all there)."""
    missing = [] if queue_depth(connection, topo.queue) is not None else [f"queue '{topo.queue}'"]
    return missing + ([] if exchange_exists(connection, topo.exchange) else [f"exchange '{topo.exchange}'"])


def move(connection: BlockingConnection, source: str, routing_key: str, *, exchange: str = "", skip: int = 0,
         failover: Failover | None = None) -> int:
    """Move the messages of ``source`` (all but its first ``skip``) to ``exchange`` with ``routing_key``, properties
    and headers kept (but a header pika cannot encode again, a value out of range a publisher chose: left out): each
    is republished with a confirm (a nack: again, on a fresh channel), then acked, so none is ever lost (an
    interruption leaves one copy twice at most, which deduplication absorbs). With ``failover`` (whose connection
    ``connection`` is), a connection lost mid-move is replaced and the move goes on: the message in hand is still in
    ``source`` (never acked before its copy was confirmed) and is moved again (counted in ``failover.resent``).
    Returns how many moved."""
    state = _Moving()
    while True:
        try:
            _move_on(connection, source, routing_key, exchange, skip, state)
            return state.moved
        except CONNECTION_LOST as exc:
            if failover is None:
                raise
            failover.resent += state.in_hand
            state.in_hand = False
            connection = failover.recover(exc)


@dataclass
class _Moving:
    moved: int = 0
    in_hand: bool = False  # a message fetched and not acked yet: moved again after a failover


def _move_on(connection: BlockingConnection, source: str, routing_key: str, exchange: str, skip: int,
             state: _Moving) -> None:
    """``move`` on one connection, counting in ``state`` as it goes (a lost connection raises out of here)."""
    get, put = connection.channel(), Publisher(connection)
    try:
        while True:
            method, props, body = get.basic_get(source, auto_ack=False)
            if method is None:
                return
            if skip > 0:
                skip -= 1  # left unacked until the channel closes: back in the queue, in its place
                continue
            if props.headers:
                props.headers = encodable(props.headers)[0]
            state.in_hand = True
            try:
                put.send(exchange, routing_key, body, props, what=f"a message moved from '{source}'")
            except BrokerError as exc:
                raise type(exc)(f"moving a message from '{source}' to '{exchange or routing_key}' failed: {exc}; "
                                f"it stays in '{source}'") from None
            get.basic_ack(method.delivery_tag)
            state.moved += 1
            state.in_hand = False
    finally:
        for ch in (get, put.channel):
            if ch.is_open:
                with contextlib.suppress(*CONNECTION_LOST):
                    ch.close()


def purge(connection: BlockingConnection, queue: str) -> int:
    """Drop every ready message of ``queue`` (unacked ones stay with their consumers); returns how many."""
    ch = connection.channel()
    try:
        return ch.queue_purge(queue).method.message_count
    finally:
        ch.close()


class BlockedWatch:
    """RabbitMQ's Connection.Blocked / Unblocked on one connection, reported the moment they arrive: also while a
    publish waits for its confirm, which is where a publisher meets an alarm (pika's BlockingConnection callbacks are
    dispatched only by process_data_events, which that wait never calls, so this listens on the pika connection
    underneath). RabbitMQ sends Blocked to a connection when it publishes during an alarm, on any node.

    ``on_change(blocked, reason)`` at each change; ``tick()`` every ``every`` seconds while blocked (the worker
    feeds its watchdog there: waiting out an alarm is healthy, a restart would not help)."""

    def __init__(self, connection: BlockingConnection, on_change: Callable[[bool, str], None] | None = None,
                 tick: Callable[[], None] | None = None, every: float = 1.0):
        self.since: float | None = None
        self.reason = ""
        self._on_change, self._tick, self._every = on_change, tick, every
        self._impl = getattr(connection, "_impl", None)  # the SelectConnection a BlockingConnection drives
        if self._impl is not None:
            self._impl.add_on_connection_blocked_callback(self._blocked)
            self._impl.add_on_connection_unblocked_callback(self._unblocked)

    @property
    def blocked(self) -> bool:
        return self.since is not None

    def _blocked(self, _connection, frame) -> None:
        if self.since is not None:
            return
        self.since = time.monotonic()
        self.reason = str(getattr(frame.method, "reason", "") or "resource alarm")
        log.warning("RabbitMQ blocked publishing on this connection (memory or disk alarm in the cluster); waiting "
                    "for it to clear", extra={"reason": self.reason, "timeout_s": BLOCKED_TIMEOUT_S})
        if self._on_change is not None:
            self._on_change(True, self.reason)
        self._schedule()

    def _unblocked(self, _connection, _frame) -> None:
        if self.since is None:
            return
        seconds, self.since = time.monotonic() - self.since, None
        log.info("RabbitMQ unblocked publishing", extra={"blocked_s": round(seconds, 2)})
        if self._on_change is not None:
            self._on_change(False, "")

    def _schedule(self) -> None:
        if self._tick is not None and self._impl is not None:
            self._impl.ioloop.call_later(self._every, self._ticked)

    def _ticked(self) -> None:
        if self.since is not None and self._tick is not None:
            self._tick()
            self._schedule()


class Publisher:
    """Publishes on a confirm-mode channel: ``publish`` returns only once the broker has the message.

    A nack is answered by publishing again on a fresh channel (NACK_PAUSES_S: bounded; the copy is never dropped
    silently, a duplicate is absorbed by deduplication). A connection blocked by a resource alarm is reported
    (``on_blocked``, a log line) and waited out for BLOCKED_TIMEOUT_S at most, then PublishBlocked."""

    def __init__(self, connection: BlockingConnection, *, on_blocked: Callable[[bool, str], None] | None = None,
                 tick: Callable[[], None] | None = None, on_nack: Callable[[], None] | None = None):
        self.connection = connection
        self.watch = BlockedWatch(connection, on_blocked, tick)
        self.on_nack = on_nack
        self.nacks = 0  # nacks answered by a fresh channel, over this publisher's life
        self.channel: BlockingChannel = self._open()

    def _open(self) -> BlockingChannel:
        channel = self.connection.channel()
        channel.confirm_delivery()
        return channel

    def renew(self) -> None:
        """Publish on a fresh channel from now on (the old one is closed)."""
        old = self.channel
        with contextlib.suppress(Exception):
            if old.is_open:
                old.close()
        self.channel = self._open()

    def send(self, exchange: str, routing_key: str, body: bytes, props: BasicProperties, *, what: str) -> None:
        """Publish mandatory and wait for the confirm, a nack answered on a fresh channel. Raises BrokerError when
        unroutable or still nacked after every attempt, PublishBlocked when an alarm outlasted BLOCKED_TIMEOUT_S."""
        for pause in (*NACK_PAUSES_S, None):
            try:
                self.channel.basic_publish(exchange, routing_key, body, props, mandatory=True)
                return
            except pex.UnroutableError:
                raise Unroutable(f"{what} to exchange '{exchange}' was unroutable (run `myshop setup-transports`; on "
                                 "a cluster: is the node of that queue down?)") from None
            except pex.NackError:
                self.nacks += 1
                if self.on_nack is not None:
                    self.on_nack()
                if pause is None:
                    break
                log.warning("publish nacked by RabbitMQ, publishing again on a fresh channel",
                            extra={"what": what, "exchange": exchange, "nacks": self.nacks})
                self.connection.sleep(pause)
                self.renew()
            except pex.ConnectionBlockedTimeout:
                raise PublishBlocked(f"{what}: RabbitMQ blocked publishing for {BLOCKED_TIMEOUT_S}s (a memory or disk "
                                     "alarm in the cluster: rabbitmq-diagnostics alarms); it was not confirmed"
                                     ) from None
        raise BrokerError(f"the broker refused {what} {len(NACK_PAUSES_S) + 1} times, each on a fresh channel (nack): "
                          "is the queue's quorum lost? (myshop stats)")

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: dict | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Publish persistently and wait for the confirm (see ``send``)."""
        props = pika.BasicProperties(
            content_type=content_type,
            delivery_mode=PERSISTENT,
            message_id=message_id,
            headers={H_PUBLISHED_AT: int(time.time() * 1000), **(headers or {})},
        )
        self.send(exchange, routing_key, body, props, what=f"message {message_id}")
