"""RabbitMQ: connection with failover, the topology's names and policies (declared by ``transports``), a confirmed
publisher, queue depth."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import BasicProperties

from myshop_ops.config import Settings, mask_url

DELIVERY_LIMIT = 10  # quorum main queue: a message redelivered this often (crash loops) goes to `failed`
PERSISTENT = pika.DeliveryMode.Persistent


class BrokerError(Exception):
    """RabbitMQ could not be reached or refused an operation; ``str()`` is one line for the operator."""


# what a lost or refused connection raises: the consumer reconnects, the exporter retries
CONNECTION_ERRORS = (pex.AMQPConnectionError, pex.AMQPChannelError, pex.StreamLostError, BrokerError, ConnectionError)


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

    @classmethod
    def from_settings(cls, s: Settings, queue: str | None = None) -> Topology:
        return cls(
            queue=queue or s.queue,
            failed_queue=s.failed_queue,
            queue_type=s.rabbitmq_queue_type,
            retry_delays_ms=tuple(s.retry_delays_ms),
            binding_keys=tuple(s.rabbitmq_binding_keys),
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

    def policies(self) -> list[Policy]:
        main = {"dead-letter-exchange": self.failed_exchange, "dead-letter-routing-key": self.failed_queue}
        if self.queue_type == "quorum":
            main["delivery-limit"] = self.delivery_limit
        policies = [
            Policy(f"myshop.{self.queue}", self.queue, "queues", main),
            Policy(f"myshop.{self.queue}.exchange", self.exchange, "exchanges",
                   {"alternate-exchange": self.unrouted}),
        ]
        for attempt, delay in enumerate(self.retry_delays_ms, start=1):
            policies.append(Policy(f"myshop.{self.retry_queue(attempt)}", self.retry_queue(attempt), "queues",
                                   {"message-ttl": delay, "dead-letter-exchange": self.exchange,
                                    "dead-letter-routing-key": self.queue}))
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
    params = pika.URLParameters(url)
    if "heartbeat" not in url:
        params.heartbeat = heartbeat
    params.blocked_connection_timeout = 300
    params.socket_timeout = 5
    params.stack_timeout = 15
    params.connection_attempts = 1
    params.client_properties = {"connection_name": name}
    return params


def connect(dsn: str, *, heartbeat: int = 30, name: str = "myshop") -> BlockingConnection:
    """Connect to the first reachable URL of a comma-separated DSN list."""
    errors = []
    for url in dsn_urls(dsn):
        try:
            return pika.BlockingConnection(connection_parameters(url, name=name, heartbeat=heartbeat))
        except pex.ProbableAuthenticationError:
            errors.append(f"{mask_url(url)}: authentication refused (check the user and password)")
        except pex.AMQPError as exc:
            errors.append(f"{mask_url(url)}: {type(exc).__name__} {exc}".strip())
        except OSError as exc:
            errors.append(f"{mask_url(url)}: {exc}")
    raise BrokerError("RabbitMQ unreachable: " + "; ".join(errors) + " (is RabbitMQ running? check RABBITMQ_DSN)")


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


def move(connection: BlockingConnection, source: str, routing_key: str, *, exchange: str = "", skip: int = 0) -> int:
    """Move the messages of ``source`` (all but its first ``skip``) to ``exchange`` with ``routing_key``, properties
    and headers kept: each is republished with a confirm, then acked, so none is ever lost (an interruption leaves
    one copy twice at most, which deduplication absorbs). Returns how many moved."""
    get, put = connection.channel(), connection.channel()
    put.confirm_delivery()
    moved = 0
    try:
        while True:
            method, props, body = get.basic_get(source, auto_ack=False)
            if method is None:
                return moved
            if skip > 0:
                skip -= 1  # left unacked until the channel closes: back in the queue, in its place
                continue
            try:
                put.basic_publish(exchange, routing_key, body, props, mandatory=True)
            except (pex.UnroutableError, pex.NackError) as exc:
                raise BrokerError(f"moving a message from '{source}' to '{exchange or routing_key}' failed "
                                  f"({type(exc).__name__}); it stays in '{source}'") from None
            get.basic_ack(method.delivery_tag)
            moved += 1
    finally:
        for ch in (get, put):
            if ch.is_open:
                ch.close()


def purge(connection: BlockingConnection, queue: str) -> int:
    """Drop every ready message of ``queue`` (unacked ones stay with their consumers); returns how many."""
    ch = connection.channel()
    try:
        return ch.queue_purge(queue).method.message_count
    finally:
        ch.close()


class Publisher:
    """Publishes on a confirm-mode channel: ``publish`` returns only once the broker has the message."""

    def __init__(self, connection: BlockingConnection):
        self.channel: BlockingChannel = connection.channel()
        self.channel.confirm_delivery()

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
        """Publish persistently and wait for the confirm; raises BrokerError if nacked or unroutable."""
        props = pika.BasicProperties(
            content_type=content_type,
            delivery_mode=PERSISTENT,
            message_id=message_id,
            headers={H_PUBLISHED_AT: int(time.time() * 1000), **(headers or {})},
        )
        try:
            self.channel.basic_publish(exchange, routing_key, body, props, mandatory=True)
        except pex.UnroutableError:
            raise BrokerError(
                f"message {message_id} to exchange '{exchange}' was unroutable (run `myshop setup-transports`)"
            ) from None
        except pex.NackError:
            raise BrokerError(f"the broker refused message {message_id} (nack)") from None
