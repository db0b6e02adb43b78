"""The management API must be the broker the workers talk to, and the AMQP connection is the truth: the default
node (5672) against a management API stand-in (tests/support/fake_management.py) that answers for another broker,
or lies about what exists. The two-broker case on real nodes is tests/cluster/test_one_broker.py."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator

import pika
import pika.exceptions as pex
import pytest

from myshop_ops.adapters import broker
from myshop_ops.adapters.management import ManagementError, WrongBroker, for_connection, management_url
from myshop_ops.tools.transports import Refused, Transports
from tests.support.fake_management import FakeManagement
from tests.support.services import RABBIT, free_port, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def api() -> Iterator[FakeManagement]:
    with FakeManagement() as server:
        yield server


@pytest.fixture
def conn() -> Iterator[pika.BlockingConnection]:
    c = broker.connect(RABBIT, name="test-one-broker")
    yield c
    if c.is_open:
        c.close()


@pytest.fixture
def ours(conn) -> str:
    """The cluster name of the default node, as its AMQP connection gives it."""
    name = broker.cluster_name(conn)
    assert name
    return name


def one_line_refusal(done, *needles: str) -> str:
    assert done.returncode == 3 and "Traceback" not in done.stderr, (done.stdout, done.stderr)
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def exists_on_amqp(queue: str) -> bool:
    c = broker.connect(RABBIT)
    try:
        return broker.queue_depth(c, queue) is not None
    finally:
        c.close()


# ---- which broker ---------------------------------------------------------------------------------------------

def test_no_management_url_is_derived_past_a_non_default_amqp_port():
    """A DSN on port 5691 derived http://host:15672: the management API of whatever else listens there. Now no
    derivation past a non-default port: a one-line ManagementError naming the setting."""
    with pytest.raises(ManagementError, match=r"not the default.*set RABBITMQ_MANAGEMENT_URL\)$"):
        management_url(None, "amqp://u:p@127.0.0.1:5691/%2f,amqp://u:p@127.0.0.1:5692/%2f")
    assert management_url(None, "amqp://u:p@rabbit:5672/%2f") == "http://u:p@rabbit:15672"
    assert management_url(None, "amqps://u:p@rabbit/%2f") == "https://u:p@rabbit:15671"
    assert management_url("http://m:15681", "amqp://u:p@h:5681/%2f") == "http://m:15681"


def test_a_management_api_of_another_cluster_is_refused(conn, ours, api):
    """It does not see the queue just declared on the AMQP connection: one line naming both brokers."""
    api.answer_as("rabbit@elsewhere", sees_probe=False)
    with pytest.raises(WrongBroker) as refused:
        for_connection(api.url(), RABBIT, conn)
    line = str(refused.value)
    assert f"reaches 127.0.0.1:5672 (cluster '{ours}')" in line and "(cluster 'rabbit@elsewhere')" in line
    assert "does not see queue 'amq.gen-" in line and "set RABBITMQ_MANAGEMENT_URL" in line and "\n" not in line


def test_the_same_cluster_name_without_the_probe_queue_is_another_broker(conn, ours, api):
    """Two unrelated brokers may share a cluster name (rabbit@localhost in two containers): the management API
    must also see the queue just declared on the AMQP connection."""
    api.answer_as(ours, sees_probe=False)
    with pytest.raises(WrongBroker, match=re.escape(f"(cluster '{ours}') and does not see queue 'amq.gen-")):
        for_connection(api.url(), RABBIT, conn)
    asked = [r["path"] for r in api.requests if r["path"].startswith("/api/queues/%2F/amq.gen-")]
    assert len(asked) == 1
    assert broker.queue_depth(conn, asked[0].rsplit("/", 1)[1]) is None  # the probe is gone


def test_without_a_probe_queue_the_cluster_names_decide(conn, ours, api, monkeypatch):
    """Where the AMQP user may not declare the probe (no configure permission on amq.gen-*: the broker refuses
    it), the cluster names must agree."""
    @contextlib.contextmanager
    def refused(_conn):
        yield None

    monkeypatch.setattr(broker, "probe_queue", refused)
    api.answer_as("rabbit@elsewhere", sees_probe=False)
    with pytest.raises(WrongBroker, match="the cluster names differ"):
        for_connection(api.url(), RABBIT, conn)
    api.answer_as(ours, sees_probe=False)
    assert for_connection(api.url(), RABBIT, conn).vhost == "/"


def test_a_management_api_without_the_vhost_is_another_broker(conn, ours, api):
    api.answer_as(ours)
    del api.replies["/api/vhosts/%2F"]
    with pytest.raises(WrongBroker, match="has no vhost '/'"):
        for_connection(api.url(), RABBIT, conn)


def test_the_real_management_api_of_the_default_node_is_accepted(conn):
    assert for_connection(None, RABBIT, conn).vhost == "/"


def test_every_command_stops_in_one_line_on_the_wrong_broker(env, api):
    """setup-transports, messenger-config, stats and its exporter stop in one line naming both brokers and the setting;
    preflight fails its topology check with that line; nothing is declared, no policy is set."""
    api.answer_as("rabbit@elsewhere", sees_probe=False)
    sub = env.subprocess_env(RABBITMQ_MANAGEMENT_URL=api.url())
    for args in (["setup-transports"], ["setup-transports", "--json"], ["messenger-config"], ["stats"],
                 ["stats", "--serve-metrics", str(free_port())]):
        one_line_refusal(run_cli(*args, env=sub), "two different brokers", "rabbit@elsewhere",
                         "set RABBITMQ_MANAGEMENT_URL")
    done = run_cli("preflight", "--offline", "--json", env=sub)
    topo = next(c for c in json.loads(done.stdout)["checks"] if c["name"] == "topology")
    assert topo["status"] == "FAIL" and "two different brokers" in topo["detail"], topo
    assert "RABBITMQ_MANAGEMENT_URL" in topo["fix"]
    assert not exists_on_amqp(env["RABBITMQ_QUEUE"]) and not exists_on_amqp(env["RABBITMQ_FAILED_QUEUE"])
    assert [r for r in api.requests if r["method"] != "GET"] == []


# ---- the AMQP connection is the truth -------------------------------------------------------------------------

def test_setup_transports_declares_what_the_management_api_says_exists(env, ours, api):
    """The issue's attack: the management API said `failed` existed (another broker's queue), setup declared
    nothing, then the bind died with a raw ChannelClosedByBroker 404 traceback. Existence is now asked on the AMQP
    connection: everything is declared and bound, whatever the management API claims."""
    api.answer_as(ours)
    api.replies["/api/queues/%2F/"] = (200, {"name": "x", "type": "quorum", "durable": True, "arguments": {}})
    api.replies["/api/exchanges/%2F/"] = (200, {"name": "x", "type": "direct", "durable": True})
    api.replies["/api/policies/%2F/"] = (404, {})
    api.default = (204, b"")  # the PUTs of the policies
    done = run_cli("setup-transports", "--json", env=env.subprocess_env(RABBITMQ_MANAGEMENT_URL=api.url()))
    assert done.returncode == 0 and "Traceback" not in done.stderr, (done.stdout, done.stderr)
    steps = {(s["kind"], s["name"]): s["state"] for s in json.loads(done.stdout)["steps"]}
    assert steps[("queue", env["RABBITMQ_FAILED_QUEUE"])] == "created"
    assert steps[("queue", env["RABBITMQ_QUEUE"])] == "created"
    assert steps[("exchange", env["RABBITMQ_FAILED_QUEUE"])] == "created"
    assert exists_on_amqp(env["RABBITMQ_QUEUE"]) and exists_on_amqp(env["RABBITMQ_FAILED_QUEUE"])


def test_check_does_not_take_stale_statistics_for_existing_objects(env, topology, conn, ours, api):
    """A queue deleted a moment ago is still in the management API's statistics: check() asks RabbitMQ."""
    api.answer_as(ours)
    api.replies["/api/queues/%2F/"] = (200, {"name": "x", "type": "quorum", "durable": True, "arguments": {}})
    for queue in (topology.queue, topology.failed_queue, topology.unrouted):
        api.replies[f"/api/queues/%2F/{queue}/bindings"] = (200, [])
    api.replies["/api/policies/%2F"] = (200, [])
    conn.channel().queue_delete(topology.failed_queue)
    found = Transports(conn, for_connection(api.url(), RABBIT, conn), topology).check()
    assert ("queue", topology.failed_queue, "missing") in [(s.kind, s.name, s.state) for s in found]


def test_arguments_are_judged_by_rabbitmq_not_by_the_management_api(env, topology, conn, ours, api):
    """The management API lists the main queue as declared exactly like ours; RabbitMQ refuses our declare (it
    is classic): adopted with a warning, the difference told by RabbitMQ."""
    api.answer_as(ours)
    s = env.settings()
    Transports(conn, for_connection(None, RABBIT, conn), topology).setup()
    ch = conn.channel()
    ch.queue_delete(topology.queue)
    ch.queue_declare(topology.queue, durable=True, arguments={"x-queue-type": "classic"})
    ch.close()
    api.replies[f"/api/queues/%2F/{topology.queue}"] = (200, {
        "name": topology.queue, "type": s.rabbitmq_queue_type, "durable": True,
        "arguments": {"x-queue-type": s.rabbitmq_queue_type}})
    step = Transports(conn, for_connection(api.url(), RABBIT, conn), topology)._adopted(topology.queue)
    assert step.level == "warn" and step.state == "adopted", step


# ---- every refusal is one line --------------------------------------------------------------------------------

def test_a_queue_held_exclusively_elsewhere_is_one_line_naming_it(env):
    """RabbitMQ answers 405 RESOURCE_LOCKED for a queue another connection declared exclusive: setup-transports
    names the queue and what to do, no traceback."""
    holder = pika.BlockingConnection(pika.URLParameters(RABBIT))
    try:
        holder.channel().queue_declare(env["RABBITMQ_FAILED_QUEUE"], exclusive=True)
        done = run_cli("setup-transports", env=env.subprocess_env())
        one_line_refusal(done, f"queue '{env['RABBITMQ_FAILED_QUEUE']}'", "405", "exclusively")
    finally:
        holder.close()


@pytest.mark.parametrize("code", [403, 404, 405, 406, 500, 541])
def test_every_channel_refusal_is_one_line_naming_the_object(code):
    exc = pex.ChannelClosedByBroker(code, "SOME_TEXT - about it")
    line = str(Refused("binding x -> y", exc))
    assert line.startswith("binding x -> y: RabbitMQ refused it") and str(code) in line and "\n" not in line
    assert str(Refused("queue 'q'", pex.StreamLostError("Transport indicated EOF"))).startswith("queue 'q': the "
                                                                                                   "connection")
