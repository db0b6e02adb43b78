"""`generate-test-events` on a 3-node cluster whose node it publishes to dies mid-run: given all three nodes, it goes
on on another one, publishes again what the dead node had not confirmed (same message ids: the workers deduplicate),
and ends with every event confirmed; the workers then apply each event exactly once (`myshop verify`). The relay
version of the same, and of `failed retry` and `unrouted republish`: tests/integration/test_failover.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from myshop_ops.adapters import broker
from tests.cluster.conftest import PORT, node_name
from tests.reliability.harness.plan import SOAK
from tests.support.services import ROOT, wait_for
from tests.support.workers import one_line, prepare

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600),
              pytest.mark.skipif(not SOAK, reason="soak only (make soak): the cluster suite is make soak's")]

EVENTS, USERS, DELAY_MS = 2000, 40, 6  # 2,000 events at ~170 events/s: about 12 s
KILL_AFTER, DOWN_S = 4 * 1000 // DELAY_MS, 10  # events in the queue ~4 s in; the node stays down 10 s


def test_generate_test_events_goes_on_when_its_node_dies(cenv, cluster, workers, tmp_path):
    s = cenv.settings()
    topo = prepare(s)  # declared through t1, the first node of RABBITMQ_DSN: t1 leads the main queue
    node = cluster.leader(topo.queue)
    watch = broker.connect(",".join(u for i, u in enumerate(cluster.dsn.split(","), 1) if i != node))
    record = tmp_path / "events.jsonl"
    err_path = tmp_path / "generate.err"
    with open(err_path, "w") as err:
        gen = subprocess.Popen(
            [sys.executable, "-m", "myshop_ops", "generate-test-events", "--users", str(USERS), "--events-per-user",
             str(EVENTS // USERS), "--event-type", "search", "--delay-ms", str(DELAY_MS), "--yes", "--json",
             "--record", str(record)],
            env=cenv.subprocess_env(COLUMNS="200"), stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    started = time.monotonic()
    try:
        wait_for(lambda: (broker.queue_depth(watch, topo.queue) or (0, 0))[0] >= KILL_AFTER, timeout=60,
                 interval=0.05, what=f"{KILL_AFTER} events in {topo.queue}")
        killed = time.monotonic()
        cluster.kill(node)
        time.sleep(max(0.0, killed + DOWN_S - time.monotonic()))  # the outage length itself
        cluster.start(node)
        back = time.monotonic()
        out, _ = gen.communicate(timeout=300)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
        watch.close()
    stderr = err_path.read_text()
    assert gen.returncode == 0, out + stderr
    data = json.loads(out)
    fo = data["failover"]
    assert data["published"] == EVENTS and data["failed"] == 0 and data["error"] is None, data
    assert fo["count"] >= 1 and fo["brokers"][0] == data["broker"] and f":{PORT + node}/" in data["broker"], fo
    assert "failover: connection to" in one_line(stderr), stderr
    cluster.wait_online(topo.queue, 3)

    ws = [workers.start(cenv.subprocess_env(), "--prefetch", "50", "--time-limit", "600", name=f"w{i}")
          for i in (1, 2)]
    for w in ws:
        w.wait_ready()
    done = subprocess.run([sys.executable, "-m", "myshop_ops", "verify", "--events", str(record), "--json",
                           "--wait", "180"], env=cenv.subprocess_env(), capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    for w in ws:
        w.send(signal.SIGTERM)
    codes = [w.reap(timeout=60).code for w in ws]
    report = json.loads(done.stdout or "{}")
    assert done.returncode == 0 and report.get("ok") and report.get("complete"), done.stdout + done.stderr
    assert report["events"] == EVENTS and report["events_lost"] == 0 and report["events_duplicated"] == 0, report
    assert codes == [0, 0], [w.describe() for w in ws]
    print(f"\ncluster failover: {node_name(node)} killed {killed - started:.1f}s into the run, back after "
          f"{back - killed:.1f}s; generate-test-events {data['published']} of {EVENTS} confirmed, exit 0, "
          f"{fo['count']} failover(s), {fo['republished']} republished after failover, brokers {fo['brokers']}, "
          f"{data['duration_s']:.1f}s publishing; verify ok: {report['users_ok']} "
          f"users, {report['events']} events, lost {report['events_lost']}, duplicated {report['events_duplicated']}")
