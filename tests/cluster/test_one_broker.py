"""Two brokers on one machine: the private cluster (RABBITMQ_DSN, AMQP on 5681-5683) and the default node
(5672/15672), whose vhost `/` holds a queue named like the cluster's failed queue. The management API of the other
broker is refused in one line (derived or set), nothing is declared; with RABBITMQ_MANAGEMENT_URL set to the
cluster's, the cluster gets the topology and the policies, the default node nothing."""

from __future__ import annotations

import json

import pika
import pytest

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.management import Management
from tests.reliability.harness.plan import SOAK
from tests.support.services import RABBIT, run_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300),
              pytest.mark.skipif(not SOAK, reason="soak only (make soak): the cluster suite is make soak's")]

DEFAULT_MANAGEMENT = "http://guest:guest@127.0.0.1:15672"


def on(dsn: str, queue: str) -> bool:
    conn = broker.connect(dsn)
    try:
        return broker.queue_depth(conn, queue) is not None
    finally:
        conn.close()


def cluster_name(dsn: str) -> str:
    conn = broker.connect(dsn)
    try:
        return broker.cluster_name(conn) or "?"
    finally:
        conn.close()


def one_line(done, *needles: str) -> None:
    assert done.returncode == 3 and "Traceback" not in done.stderr, (done.stdout, done.stderr)
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1, line
    for needle in needles:
        assert needle in line, (needle, line)


def test_the_other_brokers_management_api_is_refused_and_the_clusters_configures_it(cluster, env):
    env.update(RABBITMQ_DSN=cluster.dsn)
    env.pop("RABBITMQ_MANAGEMENT_URL", None)
    topo = Topology.from_settings(env.settings())
    other = pika.BlockingConnection(pika.URLParameters(RABBIT))  # the unrelated broker's `failed` (env cleans it)
    other.channel().queue_declare(topo.failed_queue, durable=True)
    other.close()
    try:
        # derived from a DSN on 5681: no guess at 127.0.0.1:15672
        one_line(run_cli("setup-transports", env=env.subprocess_env()), "not the default",
                 "set RABBITMQ_MANAGEMENT_URL")
        # set to the default node's: two brokers, named, for every command that needs the API
        wrong = env.subprocess_env(RABBITMQ_MANAGEMENT_URL=DEFAULT_MANAGEMENT)
        ours, theirs = cluster_name(cluster.dsn), cluster_name(RABBIT)
        assert ours != theirs
        for args in (["setup-transports"], ["messenger-config"], ["stats"]):
            one_line(run_cli(*args, env=wrong), "two different brokers", "RABBITMQ_DSN reaches 127.0.0.1:568",
                     f"(cluster '{ours}')", f"(cluster '{theirs}')", "set RABBITMQ_MANAGEMENT_URL")
        checks = json.loads(run_cli("preflight", "--offline", "--json", env=wrong).stdout)["checks"]
        assert "two different brokers" in next(c for c in checks if c["name"] == "topology")["detail"]
        assert not on(cluster.dsn, topo.failed_queue) and not on(cluster.dsn, topo.queue)
        assert all(Management(DEFAULT_MANAGEMENT).policy(p.name) is None for p in topo.policies())

        # the cluster's own management API (node 2 while AMQP reaches node 1): the cluster is configured
        right = env.subprocess_env(RABBITMQ_MANAGEMENT_URL=cluster.management_url(2))
        done = run_cli("setup-transports", "--json", env=right)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (done.stdout, done.stderr)
        assert all(on(cluster.dsn, q) for q in topo.queues())
        api = Management(cluster.management_url(1))
        assert all(api.policy(p.name) is not None for p in topo.policies())
        assert all(Management(DEFAULT_MANAGEMENT).policy(p.name) is None for p in topo.policies())
        assert on(RABBIT, topo.failed_queue) and not on(RABBIT, topo.queue)  # the other broker: untouched
        checks = json.loads(run_cli("preflight", "--offline", "--json", env=right).stdout)["checks"]
        assert next(c for c in checks if c["name"] == "topology")["status"] == "PASS", checks
        assert "x-queue-type" in run_cli("messenger-config", env=right).stdout
    finally:
        conn = broker.connect(cluster.dsn)
        ch = conn.channel()
        for q in topo.queues():
            ch.queue_delete(q)
        for x in (topo.exchange, topo.failed_exchange, topo.unrouted):
            ch.exchange_delete(x)
        conn.close()
        for p in topo.policies():
            Management(cluster.management_url(1)).delete_policy(p.name)
