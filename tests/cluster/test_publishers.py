"""The project's publishers against the cluster's alarms (issue 16): a memory or disk alarm on one node blocks every
publisher of the cluster. `generate-test-events` says it is blocked (on stderr, at once) instead of freezing, and
finishes once the alarm clears; broker.Publisher reports the Blocked frame from inside its confirm wait, ticks while
blocked, and returns when unblocked. The nack stall: tests/cluster/test_scenarios.py (the feeder's nacks)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from myshop_ops.adapters import broker
from myshop_ops.adapters.management import Management
from myshop_ops.tools.stats import alarms
from tests.reliability.harness.plan import SOAK
from tests.support.services import ROOT, wait_for
from tests.support.workers import prepare

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300),
              pytest.mark.skipif(not SOAK, reason="soak only (make soak): the cluster suite is make soak's")]


def test_generate_test_events_says_it_is_blocked_and_finishes(cluster, env, tmp_path):
    env.update(RABBITMQ_DSN=cluster.dsn.split(",")[2], RABBITMQ_MANAGEMENT_URL=cluster.management_url(3))
    topo = prepare(env.settings())
    cluster.alarm("memory", 1, True)  # on t1; the generator publishes through t3
    raised(cluster, "memory")
    err = tmp_path / "stderr"
    try:
        with open(err, "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "myshop_ops", "generate-test-events", "--users", "5",
                                     "--events-per-user", "10", "--event-type", "search", "--yes"],
                                    env=env.subprocess_env(COLUMNS="200"), stdout=subprocess.PIPE, stderr=stderr,
                                    text=True, cwd=ROOT)
        wait_for(lambda: "blocked:" in err.read_text(), timeout=60, interval=0.2, what="the generator saying blocked")
        assert proc.poll() is None  # waiting, not failed
        assert "memory or disk alarm" in err.read_text() and f"up to {broker.BLOCKED_TIMEOUT_S}s" in err.read_text()
    finally:
        cluster.alarm("memory", 1, False)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err.read_text()
    assert "unblocked: publishing again" in err.read_text()
    flat = " ".join(out.split())
    assert "published │ 50" in flat and "blocked by an alarm" in flat, flat
    state = broker.queue_depth(conn := broker.connect(env["RABBITMQ_DSN"]), topo.queue)
    conn.close()
    assert state[0] == 50


def test_publisher_reports_the_block_from_inside_its_confirm_wait(cluster, env):
    env.update(RABBITMQ_DSN=cluster.dsn, RABBITMQ_MANAGEMENT_URL=cluster.management_url(1))
    topo = prepare(env.settings())
    changes, ticks = [], []
    conn = broker.connect(cluster.dsn.split(",")[1])  # t2; the alarm is on t3
    pub = broker.Publisher(conn, on_blocked=lambda b, r: changes.append((time.monotonic(), b)),
                           tick=lambda: ticks.append(time.monotonic()))
    pub.publish(topo.exchange, topo.queue, b"{}", message_id="before")
    cluster.alarm("disk", 3, True)
    raised(cluster, "disk")
    clear = threading.Timer(6.0, cluster.alarm, ("disk", 3, False))
    started = time.monotonic()
    clear.start()
    try:
        pub.publish(topo.exchange, topo.queue, b"{}", message_id="during")  # returns once unblocked
    finally:
        clear.join()
    took = time.monotonic() - started
    conn.close()
    assert [b for _, b in changes] == [True, False], changes
    assert 4 < took < broker.BLOCKED_TIMEOUT_S, took
    assert len(ticks) >= 3, ticks  # fed every second while blocked (the worker's watchdog)


def raised(cluster, kind: str) -> None:
    """Until the cluster reports the alarm (a disk alarm shows about 0.7 s after the limit is set)."""
    api = Management(cluster.management_url(2))
    wait_for(lambda: any(a["kind"] == kind for a in alarms(api)), timeout=30, interval=0.2, what=f"a {kind} alarm")
