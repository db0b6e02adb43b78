"""tools/cluster.sh itself: three nodes in one cluster beside the untouched default node; a quorum queue has a
member on each; a follower killed -9 and started again is back online. And what operators see of it: `myshop
stats` and `myshop preflight` with a member down."""

from __future__ import annotations

import json
import subprocess

import pika
import pytest

from tests.cluster.conftest import NODES, node_name
from tests.reliability.harness.plan import SOAK

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300),
              pytest.mark.skipif(not SOAK, reason="soak only (make soak): the cluster suite is make soak's")]


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


def test_stats_and_preflight_show_members_down_and_quorum_critical(cluster, env):
    """With a follower of the main queue down: `myshop stats` warns and names it, every node still up is
    quorum-critical; preflight's members check warns; once it is back, no node is critical."""
    from tests.support.services import run_cli
    from tests.support.workers import prepare

    env.update(RABBITMQ_DSN=cluster.dsn, RABBITMQ_MANAGEMENT_URL=cluster.management_url(1))
    topo = prepare(env.settings())
    members = cluster.wait_online(topo.queue, 3)
    follower = next(i for i in NODES if node_name(i) != members["leader"])
    cluster.kill(follower)
    try:
        main = _stats_main(run_cli, env, topo)
        assert main["level"] == "warn" and main["members"]["down"] == [node_name(follower)], main
        assert sorted(main["members"]["quorum_critical"]) == sorted(n for n in members["members"]
                                                                    if n != node_name(follower))
        pre = json.loads(run_cli("preflight", "--offline", "--json", env=env.subprocess_env()).stdout)
        checks = {c["name"]: c for c in pre["checks"]}
        assert checks["members"]["status"] == "WARN" and f"down: {node_name(follower)}" in checks["members"]["detail"]
        assert checks["failover"]["status"] == "PASS" and "3 URL(s)" in checks["failover"]["detail"]
    finally:
        cluster.start(follower)
    cluster.wait_online(topo.queue, 3)
    main = _stats_main(run_cli, env, topo)
    assert main["members"]["down"] == [] and main["members"]["quorum_critical"] == [], main
    assert "3/3 members online" in " ".join(main["notes"])


def _stats_main(run_cli, env, topo) -> dict:
    done = run_cli("stats", "--json", env=env.subprocess_env())
    report = json.loads(done.stdout)
    return next(q for q in report["queues"] if q["name"] == topo.queue)
