"""tools/cluster.sh itself: three nodes in one cluster beside the untouched default node; a quorum queue has a
member on each; a follower killed -9 and started again is back online."""

from __future__ import annotations

import json
import subprocess

import pika
import pytest

from tests.cluster.conftest import NODES, node_name
from tests.reliability.harness import SOAK

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300),
              pytest.mark.skipif(not SOAK, reason="soak only (make soak): make test runs one cluster scenario")]


def default_node_pid() -> str:
    done = subprocess.run(["rabbitmqctl", "-q", "eval", "os:getpid()."], capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def test_three_nodes_a_follower_killed_and_back(cluster, tmp_path):
    before = default_node_pid()
    status = json.loads(cluster.ctl("cluster_status", "--formatter", "json"))
    assert sorted(status["running_nodes"]) == [node_name(i) for i in NODES]
    conn = pika.BlockingConnection(pika.URLParameters(cluster.dsn.split(",")[0]))
    queue = f"harness-{tmp_path.name}"
    conn.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    members = cluster.wait_online(queue, 3)
    assert sorted(members["members"]) == [node_name(i) for i in NODES]
    follower = next(i for i in NODES if node_name(i) != members["leader"])
    cluster.kill(follower)
    assert f"t{follower} down" in cluster.run("status")
    cluster.start(follower)
    cluster.wait_online(queue, 3)
    assert default_node_pid() == before  # the default node was never restarted
    conn = pika.BlockingConnection(pika.URLParameters(cluster.dsn.split(",")[0]))
    conn.channel().queue_delete(queue)
    conn.close()
