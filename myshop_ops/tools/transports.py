"""`myshop setup-transports`: the topology beside the shop's own declarations.

The shop's Symfony transport declares the exchange, the main queue (with exactly the ``arguments`` of its
messenger.yaml) and its binding on first use, and RabbitMQ refuses a redeclare whose arguments differ. So every
queue is declared with nothing but its type, and what may change (dead-lettering, delivery limit, retry delays,
the alternate exchange) is set as policies through the management API. What exists is adopted, never redeclared
with other settings; ``migrate`` moves an existing main queue to the configured type without losing a message.

Whether an object exists, and whether it was declared as we would declare it, is asked on the AMQP connection
(passive declares, and declares RabbitMQ refuses with 406 on a difference, each on a channel of its own): the
management API's statistics lag by seconds. The management API, checked to be the same broker
(management.for_connection), does what only it can: policies, bindings, and the details of a difference. Every
refusal by the broker is one line naming the object (``Refused``).

Given a ``broker.Failover`` (RABBITMQ_DSN listing several nodes), a connection lost mid-run is replaced by one to
another node and the work goes on there: ``setup`` runs again (idempotent), a migration reads back from the broker
where it stands and finishes, a move in progress goes on (the message in hand moved again, counted).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingConnection

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import (
    CONNECTION_LOST,
    POLICY_PRIORITY,
    BrokerError,
    Failover,
    Topology,
    connection_lost,
)
from myshop_ops.adapters.management import Management
from myshop_ops.base.faults import killed_after

# a queue argument set at declaration -> the policy key it overrides
_POLICY_KEYS = {"x-dead-letter-exchange": "dead-letter-exchange", "x-delivery-limit": "delivery-limit",
                "x-dead-letter-routing-key": "dead-letter-routing-key", "x-message-ttl": "message-ttl"}


class TopologyMismatch(BrokerError):
    """An exchange exists with another type, or a queue cannot be adopted as it is."""


class MigrationRefused(BrokerError):
    """`--migrate` cannot run now (consumers attached); nothing was changed."""


_ADVICE = {403: "the user of RABBITMQ_DSN needs configure, write and read permission on it (rabbitmqctl "
                "set_permissions)",
           404: "it was deleted meanwhile: run `myshop setup-transports` again",
           405: "another connection holds it exclusively: stop that client",
           406: "it exists with other settings: see `myshop preflight`, then `myshop setup-transports --migrate`"}


class Refused(BrokerError):
    """RabbitMQ refused an operation on one object (its channel closed with ``code``), or the connection failed."""

    def __init__(self, what: str, exc: Exception):
        self.code = getattr(exc, "reply_code", None)
        if isinstance(exc, pex.ChannelClosedByBroker):
            why = f"RabbitMQ refused it ({exc.reply_code} {exc.reply_text})"
            fix = _ADVICE.get(exc.reply_code, "see the RabbitMQ log, then run `myshop setup-transports` again")
        else:
            why = f"the connection to RabbitMQ failed ({type(exc).__name__} {exc})".replace(" )", ")")
            fix = "check RabbitMQ (myshop preflight), then run `myshop setup-transports` again: it is idempotent"
        super().__init__(f"{what}: {why}; {fix}")


@dataclass(frozen=True, slots=True)
class Step:
    """One object of the topology and what setup (or a check) found or did to it."""

    kind: str  # exchange | queue | binding | policy
    name: str
    state: str  # created | existing | adopted | recreated | moved | bound | set | unchanged | missing | differs
    detail: str = ""
    level: str = "ok"  # ok | warn (works, an operator should act) | fail (broken)
    fix: str | None = None


MIGRATE_FIX = "myshop setup-transports --migrate (stop the workers first; see docs/SHOP.md)"


# fault injection for the tests: the name of the migration step after which the process kills itself (SIGKILL),
# as an operator's kill -9 or a lost machine would; unset in production
KILL_AFTER = "MYSHOP_MIGRATE_KILL_AFTER"
MIGRATE_STEPS = ("holding-declared", "holding-bound", "unbound", "moved-out", "deleted", "declared", "released",
                 "moved-back", "done")

T = TypeVar("T")


class Transports:
    """The topology of one vhost: ``setup`` declares and adopts, ``check`` only looks, ``migrate`` moves.

    On a cluster (the management API lists several nodes) every queue of the topology is a quorum queue
    (``Topology.replicated``); on one node the delay, failed and unrouted queues are classic queues. With
    ``failover`` (whose connection ``connection`` is), ``setup`` and ``migrate`` go on on another node when the
    connection is lost (``failover.report()`` tells how often, and how many moved messages were published again)."""

    def __init__(self, connection: BlockingConnection, api: Management, topo: Topology,
                 failover: Failover | None = None):
        self._connection = connection
        self.failover = failover
        self.api = api
        self.nodes = len(api.nodes())
        self.topo = replace(topo, replicated=self.nodes > 1)

    @property
    def connection(self) -> BlockingConnection:
        """The connection in use: the failover's current one (replaced after a loss), else the one given."""
        if self.failover is not None and self.failover.connection is not None:
            return self.failover.connection
        return self._connection

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> list[Step]:
        """Declare what is missing, adopt what exists, bind, set the policies. Idempotent (with a failover: run
        again from the start on another node when the connection is lost)."""
        return self._on_any_node(self._setup)

    def _setup(self) -> list[Step]:
        t = self.topo
        steps = [self._exchange(t.failed_exchange, "direct"), self._exchange(t.exchange, "direct"),
                 self._exchange(t.unrouted, "fanout")]
        steps += [self._queue(name) for name in self._queues()]
        for exchange, queue, key in self._bindings():
            self._channel_call(f"binding {exchange} -> {queue}",
                               lambda ch, e=exchange, q=queue, k=key: ch.queue_bind(q, e, routing_key=k))
            steps.append(Step("binding", f"{exchange} -> {queue}", "bound", f"key {key!r}" if key else "fanout"))
        for policy in t.policies():
            current = self.api.policy(policy.name)
            wanted = {"pattern": policy.pattern, "apply-to": policy.apply_to, "definition": policy.definition,
                      "priority": POLICY_PRIORITY}
            if current is not None and all(current.get(k) == v for k, v in wanted.items()):
                steps.append(Step("policy", policy.name, "unchanged", _describe(policy.definition)))
            else:
                self.api.put_policy(policy.name, policy.pattern, policy.apply_to, policy.definition, POLICY_PRIORITY)
                steps.append(Step("policy", policy.name, "set", _describe(policy.definition)))
        return steps

    def _queues(self) -> list[str]:
        t = self.topo
        return [t.failed_queue, t.queue, *(t.retry_queue(i) for i in range(1, len(t.retry_delays_ms) + 1)),
                t.unrouted]

    def _bindings(self) -> list[tuple[str, str, str]]:
        t = self.topo
        main = [(t.exchange, t.queue, key) for key in t.routing_keys]
        return [(t.failed_exchange, t.failed_queue, t.failed_queue), *main, (t.unrouted, t.unrouted, "")]

    def _exchange(self, name: str, kind: str) -> Step:
        existed = self._exists("exchange", name)
        try:
            self._channel_call(f"exchange '{name}'",
                               lambda ch: ch.exchange_declare(name, exchange_type=kind, durable=True))
        except Refused as exc:
            if exc.code != 406:
                raise
            raise TopologyMismatch(f"exchange '{name}' exists with other settings; it was left untouched: it must "
                                   f"be a durable {kind} exchange (delete it: rabbitmqctl delete_exchange {name}, "
                                   "then run `myshop setup-transports` again)") from None
        return Step("exchange", name, "existing" if existed else "created", kind)

    def _queue(self, name: str) -> Step:
        if not self._exists("queue", name):
            arguments = self.topo.queue_arguments(name)
            self._channel_call(f"queue '{name}'",
                               lambda ch: ch.queue_declare(name, durable=True, arguments=arguments))
            return self._on_one_node(Step("queue", name, "created", _describe(arguments)))
        return self._adopted(name)

    def _on_one_node(self, step: Step) -> Step:
        """A main queue configured classic on a cluster works, but lives on one node: said, with the fix."""
        t = self.topo
        if step.name != t.queue or step.level != "ok" or not t.replicated or t.queue_type == "quorum":
            return step
        return replace(step, level="warn", detail=f"{step.detail}; RABBITMQ_QUEUE_TYPE=classic on a cluster of "
                       f"{self.nodes} nodes: not replicated, unavailable while its node is down",
                       fix="RABBITMQ_QUEUE_TYPE=quorum, then " + MIGRATE_FIX)

    def _adopted(self, name: str) -> Step:
        """What an existing queue is, judged against the configuration (never redeclared). RabbitMQ itself tells
        whether it is durable with our arguments; the management API only describes a difference."""
        t = self.topo
        differs = self._amqp(f"queue '{name}'", lambda: broker.declared_differently(
            self.connection, name, t.queue_arguments(name)))
        if differs is None:  # deleted meanwhile
            return Step("queue", name, "missing", level="fail", fix="myshop setup-transports")
        if not differs:
            return self._on_one_node(Step("queue", name, "existing", t.queue_type_of(name) if name == t.queue
                                          or t.replicated else "declared as ours"))
        told = f"RabbitMQ: {differs}"
        info = self.api.queue(name)  # the details RabbitMQ's one difference does not tell
        if info is None:  # in RabbitMQ, not yet in the management API's view
            return Step("queue", name, "adopted", told, "warn", MIGRATE_FIX)
        notes = [info.type]
        wanted = t.queue_type_of(name)
        if info.type != wanted and (name == t.queue or t.replicated):
            where = "" if name == t.queue else f" (a cluster of {self.nodes} nodes)"
            notes.append(f"configured {wanted}{where}: adopted as it is"
                         + (" (no delivery limit)" if name == t.queue and wanted == "quorum" else ""))
        overriding = self._overriding(name, info.arguments)
        if overriding:
            notes.append("set at declaration, overriding the policy: " + ", ".join(overriding))
        if not info.durable:
            notes.append("not durable: messages are lost on a broker restart")
        return Step("queue", name, "adopted", "; ".join([*notes, told]), "warn", MIGRATE_FIX)

    def _overriding(self, name: str, arguments: dict) -> list[str]:
        """Declared arguments that differ from what the queue's policy says (arguments win over policies)."""
        policy = next((p.definition for p in self.topo.policies() if p.apply_to == "queues" and p.target == name), {})
        return [f"{k}={v!r} (policy: {policy.get(_POLICY_KEYS[k])!r})" for k, v in sorted(arguments.items())
                if k in _POLICY_KEYS and policy.get(_POLICY_KEYS[k]) != v]

    # ---- check ----------------------------------------------------------------------------------

    def check(self) -> list[Step]:
        """What differs from the configuration, without changing anything: the steps with level warn or fail."""
        t = self.topo
        found: list[Step] = []
        for name, kind in ((t.failed_exchange, "direct"), (t.exchange, "direct"), (t.unrouted, "fanout")):
            differs = self._amqp(f"exchange '{name}'", lambda n=name, k=kind: broker.exchange_differently(
                self.connection, n, k))
            if differs is None:
                found.append(Step("exchange", name, "missing", level="fail", fix="myshop setup-transports"))
            elif differs:
                found.append(Step("exchange", name, "differs", f"configured a durable {kind} exchange; RabbitMQ: "
                                  f"{differs}", "fail",
                                  f"delete the exchange (rabbitmqctl delete_exchange {name}), then setup-transports"))
        for name in self._queues():
            step = self._adopted(name) if self._exists("queue", name) else Step(
                "queue", name, "missing", level="fail", fix="myshop setup-transports")
            if step.level != "ok":
                found.append(step)
        found += self._check_bindings()
        found += self._check_policies()
        return found

    def _check_bindings(self) -> list[Step]:
        t = self.topo
        out = []
        for queue in (t.queue, t.failed_queue, t.unrouted):
            if not self._exists("queue", queue):
                continue
            bound = {(b["source"], b["routing_key"]) for b in self.api.bindings(queue)}
            for exchange, q, key in self._bindings():
                if q == queue and (exchange, key) not in bound and not (key == "" and any(
                        s == exchange for s, _ in bound)):
                    who = "the producers' routing key" if key in t.binding_keys else "routing key"
                    out.append(Step("binding", f"{exchange} -> {queue}", "missing",
                                    f"{who} {key!r} does not reach {queue}" if key else "not bound", "fail",
                                    "myshop setup-transports"))
        return out

    def _check_policies(self) -> list[Step]:
        """Each of our policies exists and is the one that applies to its object. Computed from the vhost's
        policies (the highest priority among those whose pattern matches wins), not from the queue statistics,
        which lag by a few seconds."""
        out = []
        defined = self.api.policies()
        for policy in self.topo.policies():
            if not self._exists("exchange" if policy.apply_to == "exchanges" else "queue", policy.target):
                continue  # reported as a missing object
            if not any(p.get("name") == policy.name for p in defined):
                out.append(Step("policy", policy.name, "missing", _describe(policy.definition), "fail",
                                "myshop setup-transports"))
                continue
            applies = _effective(defined, policy.apply_to, policy.target)
            if applies != policy.name:
                out.append(Step("policy", policy.name, "differs",
                                f"{policy.target} follows policy {applies!r} instead (one policy applies per object: "
                                "ours needs the highest priority)", "fail", "myshop setup-transports"))
        return out

    # ---- migrate --------------------------------------------------------------------------------

    def migrate(self, progress: Callable[[str], None] = lambda _: None) -> list[Step]:
        """Recreate every queue of the topology that is not declared as configured (another type, or declared
        arguments), moving its messages, while producers keep publishing; finish a migration that was interrupted.

        Per queue, each step idempotent, so a rerun resumes wherever the last run stopped (the broker tells where:
        the holding queue ``<queue>.migrating`` exists, the queue is of the old type or the new or missing): a
        holding queue is declared and bound like the queue (what producers publish goes there from now on), the
        queue is unbound, its messages moved to the holding queue, it is deleted, declared again and bound, the
        holding queue unbound, its messages moved back, and it is deleted. Every move is a confirmed publish before
        the ack: a message is never lost; one published while both queues are bound, or moved when the run was
        killed, may be there twice (deduplication absorbs it). Run ``setup`` first; refused while consumers are
        attached.

        With a failover, a connection lost meanwhile is replaced by one to another node, where the migration of the
        queue in hand reads its state back from the broker and goes on (a move in progress goes on itself: the
        message in hand, its original never acked before its copy was confirmed, is moved again)."""
        todo = self._on_any_node(self._migrations)
        return [self._migrate_queue(name, differs, progress) for name, differs in todo]

    def _migrations(self) -> list[tuple[str, bool]]:
        """The queues to migrate (see ``_to_migrate``); MigrationRefused while one has consumers."""
        t = self.topo
        if not self._exists("queue", t.queue) and not self._exists("queue", self._holding(t.queue)):
            raise MigrationRefused(f"queue '{t.queue}' does not exist: run `myshop setup-transports` first")
        names = [t.queue, *(t.retry_queue(i) for i in range(1, len(t.retry_delays_ms) + 1)), t.failed_queue,
                 t.unrouted]
        todo = [(name, differs) for name in names if (differs := self._to_migrate(name)) is not None]
        for name, _ in todo:  # checked for all before any is touched
            depth = self._amqp(f"queue '{name}'", lambda n=name: broker.queue_depth(self.connection, n))
            if depth is not None and depth[1]:
                raise MigrationRefused(f"{depth[1]} consumer(s) on '{name}': stop the workers first (myshop "
                                       "stop-workers, or systemctl stop 'myshop-worker@*'), then run again")
        return todo

    @staticmethod
    def _holding(name: str) -> str:
        return f"{name}.migrating"

    def _to_migrate(self, name: str) -> bool | None:
        """True: ``name`` exists declared otherwise than configured; False: it does not, but its holding queue is
        still there (an interrupted migration); None: nothing to do."""
        differs = self._amqp(f"queue '{name}'", lambda: broker.declared_differently(
            self.connection, name, self.topo.queue_arguments(name)))
        if differs:
            return True
        return False if self._exists("queue", self._holding(name)) else None

    def _migrate_queue(self, name: str, old: bool, progress: Callable[[str], None]) -> Step:
        """Migrate ``name`` (``old``: as ``_to_migrate``); after a lost connection (with a failover) from the state
        read back on the next node, until it is done."""
        held = _Held()
        state: bool | None = old
        while state is not None:
            try:
                self._migration_steps(name, state, held, progress)
                break
            except CONNECTION_LOST as exc:
                self._recover(exc)
                progress(f"RabbitMQ connection lost ({type(exc).__name__}): going on at "
                         f"{broker.address(self.connection)}, from where the broker says {name}'s migration is")
            state = self._on_any_node(lambda: self._to_migrate(name))
        t = self.topo
        return Step("queue", name, "recreated", f"{t.queue_type_of(name)}; {held.count} message(s) moved in"
                    + ("" if old else " (an interrupted migration finished)"))

    def _migration_steps(self, name: str, old: bool, held: _Held, progress: Callable[[str], None]) -> None:
        t = self.topo
        holding = self._holding(name)
        bindings = self._bindings_to_keep(name, holding)
        if old:  # the queue of the old type is still there: hold what it has and what comes meanwhile
            if not self._exists("queue", holding):
                arguments = {"x-queue-type": "quorum"} if t.replicated else {}
                self._channel_call(f"queue '{holding}'",
                                   lambda ch: ch.queue_declare(holding, durable=True, arguments=arguments))
            killed_after(KILL_AFTER, "holding-declared")
            self._bind(holding, bindings)
            killed_after(KILL_AFTER, "holding-bound")
            self._unbind(name, bindings)
            progress(f"unbound {name}: new messages wait in {holding}")
            killed_after(KILL_AFTER, "unbound")
            moved = self._amqp(f"moving queue '{name}' to '{holding}'",
                               lambda: broker.move(self.connection, name, holding, failover=self.failover))
            progress(f"moved {moved} message(s) from {name} to {holding}")
            killed_after(KILL_AFTER, "moved-out")
            self._delete_idle(name, holding)
            killed_after(KILL_AFTER, "deleted")
        arguments = t.queue_arguments(name)
        self._channel_call(f"queue '{name}'", lambda ch: ch.queue_declare(name, durable=True, arguments=arguments))
        self._bind(name, bindings)
        progress(f"declared {name} ({t.queue_type_of(name)}) and bound it again")
        killed_after(KILL_AFTER, "declared")
        self._unbind(holding, bindings)
        killed_after(KILL_AFTER, "released")
        back = self._amqp(f"moving queue '{holding}' back to '{name}'",
                          lambda: broker.move(self.connection, holding, name, failover=self.failover))
        held.count += back
        progress(f"moved {back} held message(s) into {name}")
        killed_after(KILL_AFTER, "moved-back")
        self._delete_idle(holding, name)
        killed_after(KILL_AFTER, "done")

    def _bindings_to_keep(self, name: str, holding: str) -> list[tuple[str, str]]:
        """(exchange, routing key) of every binding ``name`` must have: the configured ones, those it has now and
        those its holding queue carries over from an interrupted run (the default exchange's aside)."""
        found = [(e, k) for e, q, k in self._bindings() if q == name]
        for queue in (name, holding):
            if self._exists("queue", queue):
                found += [(b["source"], b["routing_key"]) for b in self.api.bindings(queue) if b["source"]]
        return list(dict.fromkeys(found))

    def _bind(self, queue: str, bindings: list[tuple[str, str]]) -> None:
        for exchange, key in bindings:
            self._channel_call(f"binding {exchange} -> {queue}",
                               lambda ch, e=exchange, k=key: ch.queue_bind(queue, e, routing_key=k))

    def _unbind(self, queue: str, bindings: list[tuple[str, str]]) -> None:
        if not self._exists("queue", queue):
            return
        for exchange, key in bindings:
            self._channel_call(f"binding {exchange} -> {queue}",
                               lambda ch, e=exchange, k=key: ch.queue_unbind(queue, e, routing_key=k))

    def _delete_idle(self, name: str, other: str) -> None:
        """Delete ``name``, unbound by now, once it is empty and has no consumer (checked first: RabbitMQ refuses
        queue.delete's if-empty and if-unused flags on a quorum queue with 540 NOT_IMPLEMENTED)."""
        depth = self._amqp(f"queue '{name}'", lambda: broker.queue_depth(self.connection, name))
        if depth is None:
            return
        if depth != (0, 0):
            raise MigrationRefused(f"'{name}' was not deleted: it holds {depth[0]} message(s) and {depth[1]} "
                                   f"consumer(s) after the move (a client uses it); the moved ones are safe in "
                                   f"'{other}': stop that client, then run --migrate again")
        self._channel_call(f"queue '{name}'", lambda ch: ch.queue_delete(name))

    # ---- helpers --------------------------------------------------------------------------------

    def main_queue_arguments(self) -> dict:
        """The main queue's declare arguments as they are (ours when it does not exist yet): read from the
        management API, then confirmed by RabbitMQ itself (a durable declare with them, as Symfony's auto_setup
        makes, refused on any difference)."""
        t = self.topo
        if not self._exists("queue", t.queue):
            return t.main_arguments()
        info = self.api.queue(t.queue)
        if info is None:
            raise BrokerError(f"queue '{t.queue}' exists but the management API at {self.api.display} does not list "
                              "it yet: run again in a few seconds")
        arguments = {k: v for k, v in info.arguments.items() if k.startswith("x-")}
        differs = self._amqp(f"queue '{t.queue}'", lambda: broker.declared_differently(
            self.connection, t.queue, arguments))
        if differs:
            raise BrokerError(f"queue '{t.queue}': RabbitMQ refuses a durable declare with the arguments the "
                              f"management API lists ({_describe(arguments) or 'none'}): {differs}; Symfony's "
                              f"auto_setup would be refused too: {MIGRATE_FIX}")
        return arguments

    def _exists(self, kind: str, name: str) -> bool:
        """Asked on the AMQP connection (a passive declare), not from the management API's statistics."""
        if kind == "exchange":
            return self._amqp(f"exchange '{name}'", lambda: broker.exchange_exists(self.connection, name))
        return self._amqp(f"queue '{name}'", lambda: broker.queue_depth(self.connection, name)) is not None

    def _on_any_node(self, call: Callable[[], T]) -> T:
        """``call()`` (idempotent); with a failover, run again on another node as long as the connection is lost
        (BrokerError once no node takes over within the failover's bound)."""
        while True:
            try:
                return call()
            except CONNECTION_LOST as exc:
                self._recover(exc)

    def _recover(self, lost: BaseException) -> None:
        if self.failover is None:  # ``_amqp`` lets a lost connection through only with a failover
            raise lost
        self.failover.recover(lost)

    def _amqp(self, what: str, call: Callable):
        """``call()``; a channel refused or the connection lost: Refused, one line naming ``what``. With a
        failover, a lost connection (not one the broker closed on an error) is raised as it is, for the caller to
        go on on another node."""
        try:
            return call()
        except (pex.AMQPError, ConnectionError) as exc:
            if self.failover is not None and connection_lost(exc):
                raise
            raise Refused(what, exc) from None

    def _channel_call(self, what: str, call: Callable) -> None:
        """``call(channel)`` on a channel of its own; a refusal: Refused naming ``what``."""
        def on_channel() -> None:
            ch = self.connection.channel()
            try:
                call(ch)
            finally:
                if ch.is_open:
                    ch.close()
        self._amqp(what, on_channel)


@dataclass
class _Held:
    count: int = 0  # messages moved into the new queue, over every attempt of one queue's migration


def _effective(policies: list[dict], apply_to: str, name: str) -> str | None:
    """The policy RabbitMQ applies to a queue or exchange: the highest priority of those that match it."""
    matching = []
    for p in policies:
        try:
            hit = p.get("apply-to") in ("all", apply_to) and re.search(str(p.get("pattern")), name)
        except re.error:  # a pattern only Erlang's regex dialect reads: assume it does not match
            hit = False
        if hit:
            matching.append(p)
    return max(matching, key=lambda p: int(p.get("priority") or 0))["name"] if matching else None


def _describe(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


SHOP_MESSAGE_CLASS = "App\\Application\\Message\\UpdateUserEmbeddingMessage"


def messenger_config(topo: Topology, queue_arguments: dict, dsn_example: str, *, auto_setup: bool = True,
                     confirm_timeout: float = 5.0) -> str:
    """The shop's messenger.yaml transport block matching the live topology: the main queue's declare
    ``arguments`` exactly as they are (so Symfony's auto_setup redeclares it without PRECONDITION_FAILED), the
    binding keys, and publisher confirms (the delivery guarantee starts at a confirmed publish)."""
    def q(text: str) -> str:
        return "'" + str(text).replace("'", "''") + "'"

    arguments = "".join(f"\n                                {q(k)}: {v if isinstance(v, int) else q(v)}"
                        for k, v in sorted(queue_arguments.items())) or " {}"
    keys = ", ".join(q(k) for k in topo.binding_keys)
    return f"""\
# config/packages/messenger.yaml of the shop: made by `myshop messenger-config` from the live topology.
# MESSENGER_TRANSPORT_DSN={dsn_example}/{topo.exchange}
framework:
    messenger:
        # no failure_transport named `{topo.failed_queue}`: that queue holds myshop's failed copies
        # (`myshop failed show/retry`); Symfony's messenger:failed:* commands drop messages they cannot decode
        transports:
            {topo.queue}:
                dsn: '%env(MESSENGER_TRANSPORT_DSN)%'
                serializer: messenger.transport.symfony_serializer
                options:
                    auto_setup: {'true' if auto_setup else 'false'}
                    confirm_timeout: {confirm_timeout:g}
                    exchange:
                        name: {q(topo.exchange)}
                        type: direct
                        default_publish_routing_key: {q(topo.binding_keys[0])}
                    queues:
                        {topo.queue}:
                            binding_keys: [{keys}]
                            arguments:{arguments}
        routing:
            {q(SHOP_MESSAGE_CLASS)}: {topo.queue}
"""
