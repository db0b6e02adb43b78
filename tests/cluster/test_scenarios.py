"""The guarantee on a 3-node RabbitMQ cluster (issue 16): real `myshop consume` processes and a confirming publisher
(the reliability harness's Feeder, through broker.Publisher) given all three nodes in RABBITMQ_DSN, a cluster fault
injected, and the exact oracle after each: `myshop verify` (nothing lost, nothing applied twice) and the `failed`
queue holding exactly the malformed bodies published among the events.

Figures per scenario in the reliability report (RELIABILITY_REPORT): besides the harness's columns, ``stall_s`` =
the longest time the profiles did not change while the fault was on (progress stopped), ``publish_nacks`` and
``longest_publish_s`` of the publisher. The whole cluster suite runs in `make soak` (or with SOAK=1)."""

from __future__ import annotations

import json
import threading
import time
from itertools import pairwise

import pytest

from myshop_ops.adapters.store import Store
from tests.cluster.conftest import NODES, node_index, node_name
from tests.integration.test_metrics import get
from tests.reliability.badinput import bad_bodies
from tests.reliability.harness.plan import SOAK, Plan, interleave, plan_events, sized
from tests.reliability.harness.scenario import Scenario
from tests.support.services import free_port, run_cli, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(sized(420, 1800))]
soak_only = pytest.mark.skipif(not SOAK, reason="soak only (SOAK=1 / make soak): the cluster suite is make soak's")


class Progress(threading.Thread):
    """Samples the events applied (sum of event_count) every 0.2 s: when the profiles last changed, and the
    longest time they did not while a fault was on."""

    def __init__(self, sc: Scenario):
        super().__init__(name="progress", daemon=True)
        self.store = Store(sc.settings.mongodb_url, sc.settings.mongodb_db, timeout_ms=2000)
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                n = sum(d.get("event_count", 0) for d in self.store.users.find({}, {"event_count": 1, "_id": 0}))
                self.samples.append((time.monotonic(), n))
            except Exception:
                pass
            time.sleep(0.2)

    def applied(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def stall(self, start: float, end: float) -> float:
        """The longest stretch without a new applied event that overlaps [start, end]."""
        changes = [t for (_, before), (t, n) in pairwise(self.samples) if n != before]
        points = [t for t in changes if t < start][-1:] + [t for t in changes if start <= t] + [end]
        longest = 0.0
        for a, b in pairwise(points):
            if b >= start and a <= end:
                longest = max(longest, min(b, end + 30) - max(a, start))
        return round(longest, 2)

    def close(self) -> None:
        self.stopped.set()
        self.join(2)
        self.store.close()


def scenario(name, cenv, cluster, workers, tmp_path, *, users, per_user, bad=10, rate=None, start_feeding=True):
    """A scenario on the cluster: products, a plan with ``bad`` malformed bodies among the events (they end in
    `failed` and stay there across the fault), its feeder started (at ``rate``) unless ``start_feeding`` is False."""
    sc = Scenario(name, cenv, workers, tmp_path, ctl=cluster.ctl)
    products = sc.seed_products()
    valid = plan_events(sc.tag, users=users, per_user=per_user, products=products, rng=sc.rng)
    broken = bad_bodies(sc.tag, bad, megabyte_bodies=0)[:bad]
    plan = Plan(interleave(sc.rng, valid.bodies, broken), valid.distinct, valid.users,
                {b.message_id for b in broken})
    if start_feeding:
        sc.publish(plan, rate=rate)
    return sc, plan


def finish(sc: Scenario, progress: Progress, window: tuple[float, float], **extra) -> dict:
    sc.extra["stall_s"] = progress.stall(*window)
    sc.extra.update(extra)
    sc.wait_drained(timeout=sized(300, 900))
    progress.close()
    return sc.finish(expect_restarts=0, failed_at_least_once=True)


def progress_after(progress: Progress, at_least: int, timeout: float = 90) -> None:
    wait_for(lambda: progress.applied() >= at_least, timeout=timeout, interval=0.1,
             what=f"{at_least} events applied")


def kill_and_return(cluster, sc, progress, node: int, down_s: float | None) -> tuple[float, float]:
    """kill -9 of ``node``; it stays down until the profiles move again and at least ``down_s`` seconds, then
    starts again and rejoins as a follower. Returns (killed at, back at)."""
    before = progress.applied()
    killed = time.monotonic()
    cluster.kill(node)
    sc.faults += 1
    wait_for(lambda: progress.applied() > before, timeout=120, interval=0.1, what="progress with the node down")
    if down_s is not None:
        time.sleep(max(0.0, killed + down_s - time.monotonic()))  # the outage length itself
    cluster.start(node)
    cluster.wait_online(sc.topo.queue, 3)
    return killed, time.monotonic()


@soak_only
@pytest.mark.parametrize("role", ["leader", "follower"])
def test_node_killed_under_load(cenv, cluster, workers, tmp_path, role):
    """kill -9 of the main queue's leader (or of a follower) while events flow in and two workers consume; the node
    stays down ~8 s, then comes back. Workers and the feeder fail over to another node (the feeder's publishes may
    be nacked on a channel opened before the new leader exists: answered on a fresh channel)."""
    sc, plan = scenario(f"cluster-kill-{role}", cenv, cluster, workers, tmp_path, users=sized(25, 150), per_user=30,
                        rate=sized(100, 150))
    sup = sc.start_workers(2, prefetch=50)
    sup.wait_consuming()
    progress = Progress(sc)
    sc.phase("setup")
    progress_after(progress, plan.distinct // 4)
    members = cluster.queue_members(sc.topo.queue)
    leader = node_index(members["leader"])
    node = leader if role == "leader" else next(i for i in NODES if i != leader)
    window = kill_and_return(cluster, sc, progress, node, down_s=8)
    after = cluster.queue_members(sc.topo.queue)
    sc.phase("faults")
    row = finish(sc, progress, window, killed=node_name(node), leader_after=after["leader"])
    if role == "leader":
        assert after["leader"] != node_name(node), after  # a new leader was elected
    assert row["stall_s"] < 30, row


@soak_only
def test_node_down_past_every_timeout(cenv, cluster, workers, tmp_path):
    """The leader killed and kept down 75 s: past the heartbeat (30 s), the blocked-connection bound (60 s) and the
    publisher's nack attempts; workers and the feeder carry on with two nodes (workers holding a batch whose failed
    copy has nowhere to go: the failed queue is on the killed node), then the node comes back."""
    sc, plan = scenario("cluster-down-75s", cenv, cluster, workers, tmp_path, users=100, per_user=30, rate=30)
    sup = sc.start_workers(2, prefetch=50)
    sup.wait_consuming()
    progress = Progress(sc)
    progress_after(progress, plan.distinct // 10)
    window = kill_and_return(cluster, sc, progress, cluster.leader(sc.topo.queue), down_s=75)
    sc.phase("faults")
    row = finish(sc, progress, window)
    # the classic failed queue lives on the killed node: a batch holding a malformed message waits for it (RELIABILITY
    # §3.2), without a redelivery, so no message passes the quorum delivery limit meanwhile
    assert row["stall_s"] < 75 + 30, row


@soak_only
def test_rolling_restart(cenv, cluster, workers, tmp_path):
    """Every node stopped and started in turn (a rolling upgrade), each only once no node is quorum-critical for
    the queue (rabbitmq-queues check_if_node_is_quorum_critical, as CHECKLIST.md says) and all members are back."""
    sc, plan = scenario("cluster-rolling-restart", cenv, cluster, workers, tmp_path, users=100, per_user=30, rate=80)
    sup = sc.start_workers(2, prefetch=50)
    sup.wait_consuming()
    progress = Progress(sc)
    progress_after(progress, plan.distinct // 10)
    start = time.monotonic()
    for i in NODES:
        cluster.wait_online(sc.topo.queue, 3)
        cluster.run("queues", str(i), "check_if_node_is_quorum_critical")
        cluster.stop(i)
        cluster.start(i)
        sc.faults += 1
    cluster.wait_online(sc.topo.queue, 3)
    sc.phase("faults")
    row = finish(sc, progress, (start, time.monotonic()))
    assert row["stall_s"] < 30, row


@soak_only
def test_full_cluster_stop_and_start_with_messages_queued(cenv, cluster, workers, tmp_path):
    """Everything published, a part consumed (malformed bodies in `failed`), workers stopped, then the whole cluster
    stopped and started together: the queued messages and `failed` are all there, workers drain the rest."""
    sc, plan = scenario("cluster-full-restart", cenv, cluster, workers, tmp_path, users=100, per_user=30)
    sc.wait_published()
    sup = sc.start_workers(2, prefetch=50)
    progress = Progress(sc)
    progress_after(progress, plan.distinct // 4)
    sup.stop()
    queued = sc.probe.ready()
    stopped = time.monotonic()
    cluster.run("stop-all")
    cluster.run("start-all")
    cluster.wait_online(sc.topo.queue, 3)
    after = wait_for(sc.probe.ready, timeout=60, interval=0.5, what="the queues readable after the restart")
    assert after == queued, (queued, after)  # nothing lost or added by the restart
    sc.faults += 1
    sc.start_workers(2, prefetch=50).wait_consuming()
    sc.phase("faults")
    finish(sc, progress, (stopped, time.monotonic()), queued=queued[sc.topo.queue])
    assert queued[sc.topo.queue] > 0, queued


@soak_only
@pytest.mark.parametrize("kind,node", [("memory", 1), ("disk", 2)])
def test_alarm_while_workers_publish_retry_copies(cenv, cluster, workers, tmp_path, fake_openai, kind, node):
    """A memory alarm on node 1 (disk alarm on node 2) blocks every publisher of the cluster. Workers start on a
    queue full of events while the provider fails (so they have retry copies to publish): each is blocked, says so
    in its log and its metrics (myshop_publish_blocked 1, /readyz 503 "publishing": false: it cannot settle), waits
    (no crash, no restart), and goes on when the alarm clears ~8 s later."""
    fake_openai.clear()
    cenv.update(EMBEDDING_PROVIDER="openai", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake_openai.base_url,
                EMBEDDING_DIMENSIONS="1536")
    try:
        sc, _plan = scenario(f"cluster-{kind}-alarm", cenv, cluster, workers, tmp_path, users=40, per_user=20)
        sc.wait_published()
        fake_openai.fail_next(500, times=6)
        cluster.alarm(kind, node, True)
        on = time.monotonic()
        try:
            ports = [free_port(), free_port()]
            sup = sc.start_workers(2, prefetch=50, metrics_ports=ports)
            progress = Progress(sc)
            wait_for(lambda: any("RabbitMQ blocked publishing" in w.stderr for w in sup.slots), timeout=60,
                     interval=0.2, what=f"a worker blocked by the {kind} alarm\n{sup.describe()}")
            blocked = wait_for(lambda: [p for p in ports if _probe(p)[0] == 503 and "myshop_publish_blocked 1.0"
                                        in _probe(p, "/metrics")[1]], timeout=10, interval=0.2,
                               what="a worker not ready, its myshop_publish_blocked 1")
            assert '"publishing": false' in _probe(blocked[0])[1]
            time.sleep(max(0.0, on + 8 - time.monotonic()))  # the alarm's length itself
        finally:
            cluster.alarm(kind, node, False)
        off = time.monotonic()
        sc.faults += 1
        sc.phase("faults")
        row = finish(sc, progress, (on, off), alarm_s=round(off - on, 1))
    finally:
        fake_openai.clear()
    assert row["worker_retried"] > 0, row
    assert any("RabbitMQ unblocked publishing" in w.stderr for w in sup.all), sup.describe()


def _probe(port: int, path: str = "/readyz") -> tuple[int, str]:
    """(status, body) of a worker's metrics endpoint; (0, "") while it does not answer."""
    return get(port, path)


@soak_only
def test_failed_and_retry_queues_lose_their_leader(cenv, cluster, workers, tmp_path, fake_openai):
    """On a cluster every queue of the topology is a quorum queue with 3 members. The node leading the failed and
    delay queues (and the main queue) is killed before anything is published and stays down: the provider fails
    (retry copies through the delay queues) and 10 malformed bodies need failed copies, and both keep flowing on
    the two other nodes: every malformed body reaches `failed`, every event is applied, with the node still down.
    Then it returns; the oracle checks nothing was lost, and `failed show`/`failed remove` work on the quorum
    failed queue."""
    fake_openai.clear()
    cenv.update(EMBEDDING_PROVIDER="openai", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake_openai.base_url,
                EMBEDDING_DIMENSIONS="1536")
    try:
        sc, plan = scenario("cluster-kill-failed-leader", cenv, cluster, workers, tmp_path, users=40, per_user=20,
                            start_feeding=False)
        topo = sc.topo
        for q in topo.queues():
            assert len(cluster.queue_members(q)["members"]) == 3, cluster.queue_members(q)
        node = cluster.leader(topo.failed_queue)
        assert cluster.leader(topo.retry_queue(1)) == node
        killed = time.monotonic()
        cluster.kill(node)
        sc.faults += 1
        fake_openai.fail_next(500, times=6)
        sc.publish(plan)
        sc.start_workers(2, prefetch=50)
        progress = Progress(sc)
        wait_for(lambda: (sc.probe.ready() or {}).get(topo.failed_queue, 0) >= len(plan.bad_ids)
                 and progress.applied() >= sc.expected_applied(), timeout=180, interval=0.5,
                 what=f"every failure in `failed` and every event applied with {node_name(node)} down")
        flowed = time.monotonic() - killed
        assert node not in cluster.up_nodes()
        assert node_index(cluster.queue_members(topo.failed_queue)["leader"]) != node
        cluster.start(node)
        for q in (topo.failed_queue, topo.retry_queue(1)):
            cluster.wait_online(q, 3)
        sc.phase("faults")
        row = finish(sc, progress, (killed, time.monotonic()), killed=node_name(node), flowed_s=round(flowed, 1))
    finally:
        fake_openai.clear()
    assert row["worker_retried"] > 0, row
    shown = run_cli("failed", "show", "--json", env=cenv.subprocess_env())
    assert shown.returncode == 0, shown.stderr
    listed = json.loads(shown.stdout)
    assert listed["queue_count"] == listed["record_count"] == row["failed"], listed
    assert not listed["drift"]["recorded_from_queue"] and not listed["drift"]["orphan_records"], listed
    one = listed["messages"][0]["failure_id"]
    removed = run_cli("failed", "remove", one, "--force", env=cenv.subprocess_env())
    assert removed.returncode == 0, removed.stdout + removed.stderr
    after = json.loads(run_cli("failed", "show", "--json", env=cenv.subprocess_env()).stdout)
    assert after["queue_count"] == after["record_count"] == row["failed"] - 1, after
    assert one not in {m["failure_id"] for m in after["messages"]}
