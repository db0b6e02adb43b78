"""RabbitMQ: connection with failover, the topology of SPEC section 3, a confirmed publisher, queue depth."""

from __future__ import annotations

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


class TopologyMismatch(BrokerError):
    """A queue or exchange exists with other arguments than the configured ones."""


@dataclass(frozen=True)
class Topology:
    """Names and arguments of every exchange and queue; the main exchange has the main queue's name."""

    queue: str = "user_embedding_updates"
    failed_queue: str = "failed"
    queue_type: str = "quorum"
    retry_delays_ms: tuple[int, ...] = (5000, 10000, 20000, 40000, 60000)
    delivery_limit: int = DELIVERY_LIMIT

    @classmethod
    def from_settings(cls, s: Settings, queue: str | None = None) -> Topology:
        return cls(
            queue=queue or s.queue,
            failed_queue=s.failed_queue,
            queue_type=s.rabbitmq_queue_type,
            retry_delays_ms=tuple(s.retry_delays_ms),
        )

    @property
    def exchange(self) -> str:
        return self.queue

    @property
    def failed_exchange(self) -> str:
        return self.failed_queue

    def retry_queue(self, attempt: int) -> str:
        """The delay queue of retry ``attempt`` (1-based)."""
        return f"{self.queue}.retry.{attempt}"

    def main_arguments(self) -> dict:
        args = {
            "x-queue-type": self.queue_type,
            "x-dead-letter-exchange": self.failed_exchange,
            "x-dead-letter-routing-key": self.failed_queue,
        }
        if self.queue_type == "quorum":
            args["x-delivery-limit"] = self.delivery_limit
        return args

    def retry_arguments(self, attempt: int) -> dict:
        return {
            "x-queue-type": "classic",
            "x-message-ttl": self.retry_delays_ms[attempt - 1],
            "x-dead-letter-exchange": self.exchange,
            "x-dead-letter-routing-key": self.queue,
        }

    def queues(self) -> list[str]:
        """Every queue of the topology: main, retries, failed."""
        return [self.queue, *(self.retry_queue(i) for i in range(1, len(self.retry_delays_ms) + 1)), self.failed_queue]


H_PUBLISHED_AT = "x-published-at"  # epoch milliseconds of the first publish, kept by retry copies


def published_at(properties: BasicProperties) -> float | None:
    """When a message was first published (epoch seconds): our header, else the AMQP timestamp, else None."""
    ms = (properties.headers or {}).get(H_PUBLISHED_AT)
    if isinstance(ms, int | float):
        return ms / 1000
    return float(properties.timestamp) if properties.timestamp else None


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


def declare(connection: BlockingConnection, topo: Topology) -> list[tuple[str, str]]:
    """Declare the topology idempotently; returns (kind, name). A mismatch raises TopologyMismatch."""
    done: list[tuple[str, str]] = []
    ch = connection.channel()

    def run(kind: str, name: str, **kw) -> None:
        nonlocal ch
        try:
            if kind == "exchange":
                ch.exchange_declare(exchange=name, exchange_type="direct", durable=True)
            else:
                ch.queue_declare(queue=name, durable=True, **kw)
        except pex.ChannelClosedByBroker as exc:
            ch = connection.channel()
            if exc.reply_code == 406:
                raise TopologyMismatch(
                    f"{kind} '{name}' exists with other settings ({exc.reply_text}); it was left untouched: "
                    f"drain and delete it (rabbitmqctl delete_queue {name}) or change the configuration to match"
                ) from None
            raise BrokerError(f"declaring {kind} '{name}' failed: {exc.reply_text}") from None
        done.append((kind, name))

    run("exchange", topo.failed_exchange)
    run("queue", topo.failed_queue, arguments={"x-queue-type": "classic"})
    ch.queue_bind(topo.failed_queue, topo.failed_exchange, routing_key=topo.failed_queue)
    run("exchange", topo.exchange)
    run("queue", topo.queue, arguments=topo.main_arguments())
    ch.queue_bind(topo.queue, topo.exchange, routing_key=topo.queue)
    for attempt in range(1, len(topo.retry_delays_ms) + 1):
        run("queue", topo.retry_queue(attempt), arguments=topo.retry_arguments(attempt))
    ch.close()
    return done


def check_topology(connection: BlockingConnection, topo: Topology) -> list[str]:
    """What differs between the broker and the configured topology, without changing anything: each exchange
    and queue is looked up passively, then redeclared with the expected settings (RabbitMQ refuses a redeclare
    whose durability or arguments differ, and creates nothing that already exists). Empty when all is in place."""
    problems: list[str] = []
    expected = [("exchange", topo.failed_exchange, {}), ("queue", topo.failed_queue, {"x-queue-type": "classic"}),
                ("exchange", topo.exchange, {}), ("queue", topo.queue, topo.main_arguments())]
    expected += [("queue", topo.retry_queue(i), topo.retry_arguments(i))
                 for i in range(1, len(topo.retry_delays_ms) + 1)]
    for kind, name, arguments in expected:
        ch = connection.channel()
        try:
            if kind == "exchange":
                ch.exchange_declare(exchange=name, passive=True)
                ch.exchange_declare(exchange=name, exchange_type="direct", durable=True)
            else:
                ch.queue_declare(queue=name, passive=True)
                ch.queue_declare(queue=name, durable=True, arguments=arguments)
            ch.close()
        except pex.ChannelClosedByBroker as exc:
            problems.append(f"{kind} '{name}' " + ("is missing" if exc.reply_code == 404 else
                                                   f"differs from the configuration: {exc.reply_text}"))
    return problems


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
