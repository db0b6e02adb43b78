"""`setup-transports --migrate` killed (SIGKILL, through the MYSHOP_MIGRATE_KILL_AFTER hook) after each of its steps,
then run again: it finishes, in both directions (classic -> quorum, quorum -> classic), with every message in the
new queue, none lost, none left in the holding or unrouted queue, the bindings as configured. And given two nodes, it
goes on on the second when the first dies mid-migration (a relay in front of the broker plays the first node, as in
test_failover.py). Each case in its own queues of a private vhost on the local broker."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import SHOP_ROUTING_KEY, BrokerError, Failover, Publisher, Topology
from myshop_ops.adapters.management import for_dsn, management_url
from myshop_ops.tools.transports import KILL_AFTER, MIGRATE_STEPS, Transports
from tests.support.relay import Relay
from tests.support.services import RABBIT, run_cli, wait_for
from tests.support.workers import private_vhost

BEFORE, DURING = 40, 10  # messages waiting when the migration starts; published while it lies killed


@pytest.fixture
def vhost() -> Iterator[str]:
    with private_vhost(RABBIT) as (_, dsn):
        yield dsn


def topology(queue: str, queue_type: str) -> Topology:
    return Topology(queue=queue, failed_queue=f"{queue}.failed", queue_type=queue_type, retry_delays_ms=(60_000,))


def transports(conn, dsn: str, topo: Topology) -> Transports:
    return Transports(conn, for_dsn(None, dsn), topo)


def publish(conn, topo: Topology, ids: list[str]) -> None:
    """As the shop does: to the main exchange with its routing key, confirmed."""
    publisher = Publisher(conn)
    for mid in ids:
        publisher.publish(topo.exchange, SHOP_ROUTING_KEY, json.dumps({"id": mid}).encode(), message_id=mid)
    publisher.channel.close()


def killed_during_migrate(dsn: str, topo: Topology, step: str) -> int:
    """setup + migrate in a forked process told to kill itself after ``step``; its end signal (or exit code)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.environ[KILL_AFTER] = step
            conn = broker.connect(dsn, name="test-migrate-killed")
            t = transports(conn, dsn, topo)
            t.setup()
            t.migrate()
        finally:
            os._exit(3)  # reached only when the step never came
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def drained(conn, queue: str) -> list[str]:
    """The message ids in ``queue``, all consumed."""
    ch = conn.channel()
    ids = []
    while True:
        method, props, _ = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        ids.append(props.message_id)
    ch.close()
    return ids


def assert_finished(conn, dsn: str, topo: Topology, expected: set[str]) -> Counter:
    """The main queue of the configured type, bound as configured, holding every expected message (a copy twice
    at most); no holding queue left; nothing unrouted. Returns the copies per id."""
    assert broker.declared_differently(conn, topo.queue, topo.main_arguments()) == ""
    for name in [topo.queue, topo.retry_queue(1), topo.failed_queue, topo.unrouted]:
        assert broker.queue_depth(conn, f"{name}.migrating") is None, name
    api = for_dsn(None, dsn)
    bound = {(b["source"], b["routing_key"]) for b in api.bindings(topo.queue) if b["source"]}
    assert bound == {(topo.exchange, key) for key in topo.routing_keys}
    assert broker.queue_depth(conn, topo.unrouted) == (0, 0)
    copies = Counter(drained(conn, topo.queue))
    assert set(copies) == expected, (expected - set(copies), set(copies) - expected)
    assert max(copies.values()) <= 2, copies
    return copies


@pytest.mark.parametrize("source,target", [("classic", "quorum"), ("quorum", "classic")])
def test_migrate_killed_after_each_step_finishes_when_run_again(vhost, source, target):
    conn = broker.connect(vhost)
    twice = {}
    for step in MIGRATE_STEPS:
        name = f"m-{step}-{uuid.uuid4().hex[:6]}"
        old, new = topology(name, source), topology(name, target)
        transports(conn, vhost, old).setup()
        first = [f"{name}-a{i}" for i in range(BEFORE)]
        publish(conn, old, first)
        assert killed_during_migrate(vhost, new, step) == -9, f"not killed after {step}"
        later = [f"{name}-b{i}" for i in range(DURING)]
        publish(conn, new, later)  # the shop goes on publishing while the migration lies half done
        steps = transports(conn, vhost, new).setup()
        steps += transports(conn, vhost, new).migrate()
        recreated = ("queue", name, "recreated") in {(s.kind, s.name, s.state) for s in steps}
        assert recreated == (step != "done"), (step, steps)  # killed once done: nothing left to do
        copies = assert_finished(conn, vhost, new, set(first) | set(later))
        twice[step] = sum(n - 1 for n in copies.values())
    conn.close()
    # a copy twice only where the run was killed while both the old queue and the holding queue were bound
    assert {s for s, n in twice.items() if n} <= {"holding-bound", "declared"}, twice


def test_a_migration_killed_after_the_new_queue_is_bound_finishes_from_the_cli(env, vhost):
    """The operator's case on RabbitMQ 3.10: kill -9 just after "declared ... (quorum) and bound it again"; the
    rerun used to crash on queue.delete if-unused (540 NOT_IMPLEMENTED on a quorum queue) and leave the queue
    with only its default binding."""
    env.update(RABBITMQ_DSN=vhost, RABBITMQ_QUEUE_TYPE="classic")
    topo = Topology.from_settings(env.settings())
    assert run_cli("setup-transports", env=env.subprocess_env()).returncode == 0
    conn = broker.connect(vhost)
    ids = [f"cli-{i}" for i in range(BEFORE)]
    publish(conn, topo, ids)
    killed = run_cli("setup-transports", "--migrate", env=env.subprocess_env(
        RABBITMQ_QUEUE_TYPE="quorum", **{KILL_AFTER: "declared"}))
    assert killed.returncode == -9 and f"declared {topo.queue} (quorum) and bound it again" in killed.stderr
    again = run_cli("setup-transports", "--migrate", "--json", env=env.subprocess_env(RABBITMQ_QUEUE_TYPE="quorum"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    [main] = [s for s in json.loads(again.stdout)["steps"] if s["name"] == topo.queue and s["state"] == "recreated"]
    assert "an interrupted migration finished" in main["detail"]
    quorum = Topology.from_settings(env.settings(RABBITMQ_QUEUE_TYPE="quorum"))
    assert_finished(conn, vhost, quorum, set(ids))
    conn.close()


def test_publishing_to_the_main_exchange_during_a_kill_reaches_a_bound_queue(vhost):
    """Between any two steps one of the old queue and the holding queue is bound: nothing the producers publish
    is left unrouted (checked at every step by the test above; here the state itself right after the unbind)."""
    conn = broker.connect(vhost)
    old, new = topology("m-unbound", "classic"), topology("m-unbound", "quorum")
    transports(conn, vhost, old).setup()
    assert killed_during_migrate(vhost, new, "unbound") == -9
    api = for_dsn(None, vhost)
    assert not [b for b in api.bindings(old.queue) if b["source"] == old.exchange]
    held = {(b["source"], b["routing_key"]) for b in api.bindings(f"{old.queue}.migrating") if b["source"]}
    assert held == {(old.exchange, key) for key in old.routing_keys}
    publish(conn, new, ["x"])
    assert broker.queue_depth(conn, f"{old.queue}.migrating")[0] == 1
    assert broker.queue_depth(conn, old.unrouted) == (0, 0)
    ch = conn.channel()
    ch.queue_delete(f"{old.queue}.migrating")
    ch.close()
    conn.close()


def through_relay(relay: Relay, vhost_dsn: str) -> str:
    """RABBITMQ_DSN with the relay (the node that dies) first and the broker itself second, in the test's vhost."""
    return f"{relay.url.rsplit('/', 1)[0]}/{vhost_dsn.rsplit('/', 1)[1]}," + vhost_dsn


def kill_once_held(relay: Relay, dsn: str, queue: str, depth: int) -> None:
    """Once the relay holds the broker's replies and ``queue`` holds ``depth`` messages (the held copy is in the
    broker, unconfirmed, its original not acked), the node dies."""
    wait_for(relay.held.is_set, timeout=60, what="the relay holding the broker's replies")
    conn = broker.connect(dsn, name="test-migrate-killer")
    try:
        wait_for(lambda: (broker.queue_depth(conn, queue) or (0,))[0] >= depth, timeout=30,
                 what=f"{depth} messages in {queue}")
    finally:
        conn.close()
    relay.kill()


HELD = 15  # the move's copy whose confirm the dying node keeps back
# the move the node dies in: its target queue, the relay's publish count at which the broker's replies are held back
MOVES = {"moving out": ("{q}.migrating", HELD), "moving back": ("{q}", BEFORE + HELD)}


def classic_queue_to_migrate(vhost: str) -> tuple:
    """(connection, queue name, the quorum topology to migrate to, ids of the BEFORE messages waiting) of a classic
    queue set up in ``vhost``."""
    conn = broker.connect(vhost)
    name = f"m-fo-{uuid.uuid4().hex[:6]}"
    old, new = topology(name, "classic"), topology(name, "quorum")
    transports(conn, vhost, old).setup()
    ids = [f"{name}-{i}" for i in range(BEFORE)]
    publish(conn, old, ids)
    return conn, name, new, ids


@pytest.mark.parametrize("when", [*MOVES, "between steps"])
def test_migrate_goes_on_on_the_next_node_when_its_node_dies(vhost, when):
    """The node dies with a moved copy unconfirmed (its original unacked) or between two steps: the migration goes on
    through the second URL from where the broker says it is, every message ends in the new queue, a copy twice at
    most (the one in hand, counted as republished), the bindings as configured."""
    conn, name, new, ids = classic_queue_to_migrate(vhost)
    target, hold_after = MOVES.get(when, ("", None))
    relay = Relay(5672, hold_after=hold_after)
    failover = Failover(through_relay(relay, vhost), name="test-migrate-failover", budget_s=10)
    t = Transports(failover.connect(), for_dsn(None, vhost), new, failover)
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if when == "between steps" and line.startswith(f"declared {name}"):
            relay.kill()  # before the holding queue is unbound and moved back

    killer = threading.Thread(target=kill_once_held, args=(relay, vhost, target.format(q=name), HELD))
    if hold_after:
        killer.start()
    steps = t.setup() + t.migrate(progress)
    if hold_after:
        killer.join()
    failover.close()
    assert failover.failovers == 1, lines
    assert relay.publishes == (hold_after or 0) or when == "between steps"
    [step] = [s for s in steps if s.name == name and s.state == "recreated"]
    copies = assert_finished(conn, vhost, new, set(ids))
    twice = sorted(mid for mid, n in copies.items() if n == 2)
    if when == "between steps":
        assert failover.resent == 0 and not twice, (copies, lines)
        assert any(line.startswith("RabbitMQ connection lost") for line in lines), lines
    else:  # the copy in hand when the node died: moved again
        assert failover.resent == 1 and twice == [ids[HELD - 1]], (failover.resent, copies)
    moved_in = BEFORE + (when == "moving out")  # the copy moved twice to the holding queue is moved back too
    assert step.detail.startswith(f"quorum; {moved_in} message(s) moved in"), step
    conn.close()


@pytest.mark.parametrize("as_json", [False, True])
def test_migrate_from_the_cli_fails_over_and_says_how_many_it_republished(env, vhost, as_json):
    conn = broker.connect(vhost)
    env.update(RABBITMQ_DSN=vhost, RABBITMQ_QUEUE_TYPE="classic")
    topo = Topology.from_settings(env.settings())
    transports(conn, vhost, topo).setup()
    ids = [f"cli-fo-{i}" for i in range(BEFORE)]
    publish(conn, topo, ids)
    relay = Relay(5672, hold_after=HELD)
    out: list = []
    cli = env.subprocess_env(RABBITMQ_DSN=through_relay(relay, vhost), RABBITMQ_QUEUE_TYPE="quorum",
                             RABBITMQ_MANAGEMENT_URL=management_url(None, vhost), COLUMNS="200")
    args = ["setup-transports", "--migrate", *(["--json"] if as_json else [])]
    runner = threading.Thread(target=lambda: out.append(run_cli(*args, env=cli)))
    runner.start()
    kill_once_held(relay, vhost, f"{topo.queue}.migrating", HELD)
    runner.join(90)
    done = out[0]
    assert done.returncode == 0, done.stdout + done.stderr
    if as_json:
        data = json.loads(done.stdout)
        assert data["failover"] == {"count": 1, "republished": 1}, data
        assert any(s["name"] == topo.queue and s["state"] == "recreated" for s in data["steps"]), data
    else:
        assert ("RabbitMQ connection lost 1 time(s), went on on another node: 1 republished after failover"
                in " ".join(done.stdout.split())), done.stdout
    quorum = Topology.from_settings(env.settings(RABBITMQ_QUEUE_TYPE="quorum"))
    copies = assert_finished(conn, vhost, quorum, set(ids))
    assert sum(copies.values()) == BEFORE + 1
    conn.close()


def test_migrate_past_the_failover_bound_says_which_nodes_it_tried_and_a_rerun_finishes(vhost):
    """The only node dies mid-move and stays dead: one line naming it and what to do; nothing is lost, and a run
    once a node is back finishes."""
    conn, name, new, ids = classic_queue_to_migrate(vhost)
    relay = Relay(5672, hold_after=HELD)
    dsn = through_relay(relay, vhost).split(",")[0]
    failover = Failover(dsn, name="test-migrate-failover", budget_s=1)
    t = Transports(failover.connect(), for_dsn(None, vhost), new, failover)
    killer = threading.Thread(target=kill_once_held, args=(relay, vhost, f"{name}.migrating", HELD))
    killer.start()
    with pytest.raises(BrokerError) as exc:
        t.migrate()
    killer.join()
    failover.close()
    line = str(exc.value)
    assert f"RabbitMQ connection to {dsn.replace('guest:guest', 'guest:***')} lost" in line, line
    assert "no node of RABBITMQ_DSN took over within 1s" in line and "start a node" in line and "\n" not in line
    transports(conn, vhost, new).migrate()
    copies = assert_finished(conn, vhost, new, set(ids))
    assert sum(copies.values()) == BEFORE + 1  # the copy in hand when the node died: in the holding queue already
    conn.close()
