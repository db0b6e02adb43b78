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
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingConnection

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import POLICY_PRIORITY, BrokerError, Topology
from myshop_ops.adapters.management import Management

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


class Transports:
    """The topology of one vhost: ``setup`` declares and adopts, ``check`` only looks, ``migrate`` moves."""

    def __init__(self, connection: BlockingConnection, api: Management, topo: Topology):
        self.connection = connection
        self.api = api
        self.topo = topo

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> list[Step]:
        """Declare what is missing, adopt what exists, bind, set the policies. Idempotent."""
        t = self.topo
        steps = [self._exchange(t.failed_exchange, "direct"), self._exchange(t.exchange, "direct"),
                 self._exchange(t.unrouted, "fanout")]
        steps += [self._queue(name, arguments) for name, arguments in self._queues()]
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

    def _queues(self) -> list[tuple[str, dict]]:
        t = self.topo
        retries = [(t.retry_queue(i), {}) for i in range(1, len(t.retry_delays_ms) + 1)]
        return [(t.failed_queue, {}), (t.queue, t.main_arguments()), *retries, (t.unrouted, {})]

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

    def _queue(self, name: str, arguments: dict) -> Step:
        if not self._exists("queue", name):
            self._channel_call(f"queue '{name}'",
                               lambda ch: ch.queue_declare(name, durable=True, arguments=arguments))
            return Step("queue", name, "created", _describe(arguments))
        return self._adopted(name)

    def _expected(self, name: str) -> dict:
        """The arguments we declare ``name`` with: the main queue's type, nothing for the others."""
        return self.topo.main_arguments() if name == self.topo.queue else {}

    def _adopted(self, name: str) -> Step:
        """What an existing queue is, judged against the configuration (never redeclared). RabbitMQ itself tells
        whether it is durable with our arguments; the management API only describes a difference."""
        t = self.topo
        differs = self._amqp(f"queue '{name}'", lambda: broker.declared_differently(
            self.connection, name, self._expected(name)))
        if differs is None:  # deleted meanwhile
            return Step("queue", name, "missing", level="fail", fix="myshop setup-transports")
        if not differs:
            return Step("queue", name, "existing", t.queue_type if name == t.queue else "declared as ours")
        told = f"RabbitMQ: {differs}"
        info = self.api.queue(name)  # the details RabbitMQ's one difference does not tell
        if info is None:  # in RabbitMQ, not yet in the management API's view
            return Step("queue", name, "adopted", told, "warn", MIGRATE_FIX)
        notes = [info.type]
        if name == t.queue and info.type != t.queue_type:
            notes.append(f"configured {t.queue_type}: adopted as it is"
                         + (" (no delivery limit)" if t.queue_type == "quorum" else ""))
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
        for name, _ in self._queues():
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
        """Recreate the main queue with the configured type and no declared arguments, and empty retry queues that
        carry old arguments, without losing a message while producers keep publishing.

        The main queue is unbound first (what producers publish meanwhile goes to the unrouted queue through the
        alternate exchange), its messages are moved to a holding queue, it is deleted and declared again, bound,
        and the held and unrouted messages are moved into it. Every move is confirmed before the ack. Run
        ``setup`` first (the alternate exchange must be in place); refused while consumers are attached."""
        t = self.topo
        steps: list[Step] = []
        holding = f"{t.queue}.migrating"
        depth = self._amqp(f"queue '{t.queue}'", lambda: broker.queue_depth(self.connection, t.queue))
        resuming = self._exists("queue", holding)
        if depth is None and not resuming:
            raise MigrationRefused(f"queue '{t.queue}' does not exist: run `myshop setup-transports` first")
        if depth is not None and depth[1]:
            raise MigrationRefused(f"{depth[1]} consumer(s) on '{t.queue}': stop the workers first "
                                   "(myshop stop-workers, or systemctl stop 'myshop-worker@*'), then run again")
        legacy = depth is not None and self._adopted(t.queue).level != "ok"
        if legacy or resuming:
            if not self._exists("exchange", t.unrouted):
                raise MigrationRefused(f"exchange '{t.unrouted}' is missing: run `myshop setup-transports` first")
            before = broker.queue_depth(self.connection, t.unrouted)
            skip = 0 if resuming or before is None else before[0]  # what was unrouted before stays for an operator
            if depth is not None:
                self._hold_main(holding, progress)
            steps.append(self._redeclare_main(holding, skip, progress))
        for attempt in range(1, len(t.retry_delays_ms) + 1):
            steps.append(self._recreate_if_empty(t.retry_queue(attempt)))
        return steps

    def _hold_main(self, holding: str, progress: Callable[[str], None]) -> None:
        """Unbind the main queue (producers' messages wait in the unrouted queue), move its messages to
        ``holding`` and delete it."""
        t = self.topo
        for b in self.api.bindings(t.queue):
            if b["source"] == t.exchange:
                self._channel_call(f"binding {t.exchange} -> {t.queue}",
                                   lambda ch, k=b["routing_key"]: ch.queue_unbind(t.queue, t.exchange, k))
        progress(f"unbound {t.queue}: new messages wait in {t.unrouted}")
        self._channel_call(f"queue '{holding}'", lambda ch: ch.queue_declare(holding, durable=True, arguments={}))
        moved = self._amqp(f"moving queue '{t.queue}' to '{holding}'",
                           lambda: broker.move(self.connection, t.queue, holding))
        progress(f"moved {moved} message(s) from {t.queue} to {holding}")
        try:
            self._channel_call(f"queue '{t.queue}'",
                               lambda ch: ch.queue_delete(t.queue, if_unused=True, if_empty=True))
        except Refused as exc:
            raise MigrationRefused(f"'{t.queue}' could not be deleted ({exc}); its messages are safe in "
                                   f"'{holding}': run --migrate again") from None

    def _redeclare_main(self, holding: str, skip: int, progress: Callable[[str], None]) -> Step:
        """Declare and bind the main queue again, then move the held messages and those published meanwhile (the
        unrouted queue past its first ``skip``) into it."""
        t = self.topo
        self._channel_call(f"queue '{t.queue}'",
                           lambda ch: ch.queue_declare(t.queue, durable=True, arguments=t.main_arguments()))
        for key in t.routing_keys:
            self._channel_call(f"binding {t.exchange} -> {t.queue}",
                               lambda ch, k=key: ch.queue_bind(t.queue, t.exchange, routing_key=k))
        progress(f"declared {t.queue} ({t.queue_type}) and bound it again")
        held = self._amqp(f"moving queue '{holding}' back to '{t.queue}'",
                          lambda: broker.move(self.connection, holding, t.queue))
        self._channel_call(f"queue '{holding}'", lambda ch: ch.queue_delete(holding, if_empty=True))
        late = self._amqp(f"moving queue '{t.unrouted}' to '{t.queue}'",
                          lambda: broker.move(self.connection, t.unrouted, t.queue, skip=skip))
        progress(f"moved {held} held and {late} unrouted message(s) into {t.queue}")
        return Step("queue", t.queue, "recreated", f"{t.queue_type}; {held} message(s) moved back, {late} published "
                    "meanwhile")

    def _recreate_if_empty(self, name: str) -> Step:
        differs = self._amqp(f"queue '{name}'", lambda: broker.declared_differently(self.connection, name, {}))
        if not differs:
            return Step("queue", name, "missing" if differs is None else "existing")
        try:
            self._channel_call(f"queue '{name}'", lambda ch: ch.queue_delete(name, if_unused=True, if_empty=True))
        except Refused:
            return Step("queue", name, "adopted", "not empty: its old arguments stay until it is (run --migrate "
                        "again after its delay)", "warn", MIGRATE_FIX)
        self._channel_call(f"queue '{name}'", lambda ch: ch.queue_declare(name, durable=True, arguments={}))
        return Step("queue", name, "recreated", "declared without arguments: its policy applies")

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

    def _amqp(self, what: str, call: Callable):
        """``call()``; a channel refused or the connection lost: Refused, one line naming ``what``."""
        try:
            return call()
        except (pex.AMQPError, ConnectionError) as exc:
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
