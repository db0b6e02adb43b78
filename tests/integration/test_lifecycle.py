"""The worker's lifecycle as an operator sees it: real `myshop consume` processes on real RabbitMQ, Redis and
the Mongo-wire server — stop conditions, signals, stop-workers, broker and store outages, heartbeats during
slow batches, sd_notify, crash exit code.

Isolation on shared services: every test has its own queues and database (the ``env`` fixture) and its own
user ids (message ids are derived from them, so the shared Redis never sees another test's ids); worker
processes use Redis database ``redis_url(LIFECYCLE)`` so the global stop-workers flag never reaches workers of other
suites (and theirs never reach ours); tests that close or inspect broker connections do it in a private vhost.
"""

from __future__ import annotations

import itertools
import re
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import redis as redis_lib

from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import Event, make_event
from tests.support.events import T0, expected_profiles, publish
from tests.support.services import LIFECYCLE, RABBIT, redis_url, run_cli, wait_for
from tests.support.workers import (
    check_profiles,
    event_counts,
    event_total,
    one_line,
    prepare,
    private_vhost,
    queue_state,
    rabbitmqctl,
    vhost_connections,
    wait_queue,
)

pytestmark = pytest.mark.integration



@pytest.fixture
def lenv(env):
    env["REDIS_URL"] = redis_url(LIFECYCLE)
    return env


@pytest.fixture
def openai_env(lenv, fake_openai):
    """The worker on the real openai SDK against the local fake server (1536 dimensions, no faults queued)."""
    fake_openai.clear()
    lenv.update(EMBEDDING_PROVIDER="openai", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake_openai.base_url,
                EMBEDDING_DIMENSIONS="1536")
    yield lenv
    fake_openai.clear()


def searches(env, n: int, users: int = 3, label: str = "s") -> list[Event]:
    """``n`` search events with phrases unique to this test (never cached by another test), times spread."""
    tag = env["MONGODB_DB"]
    return [
        make_event(f"{tag}-u{i % users}", "search", f"{tag} {label} phrase {i}", T0 + timedelta(minutes=7 * i))
        for i in range(n)
    ]


def counts_of(events: list[Event]) -> dict[str, int]:
    return dict(Counter(e.user_id for e in events))


# ---- 1. stop conditions -------------------------------------------------------------------------


def test_limit_applies_exactly_n_and_leaves_the_rest_queued(lenv, workers):
    s = lenv.settings()
    topo = prepare(s)
    events = searches(lenv, 10)
    publish(s, topo, events)
    wait_queue(s, topo.queue, messages=10)
    # prefetch 50: the whole queue is delivered to the worker, the limit must cut the batch
    w = workers.start(lenv.subprocess_env(), "--limit", "4", "--prefetch", "50")
    assert w.wait(30) == 0, w.describe()
    summary = w.summary()
    assert (summary.reason, summary.processed, summary.applied) == ("message limit 4 reached", 4, 4), w.describe()
    check_profiles(s, expected_profiles(s, events[:4], {}), counts_of(events[:4]))
    wait_queue(s, topo.queue, messages=6, consumers=0)


def test_time_limit_on_an_empty_queue_exits_0(lenv, workers):
    s = lenv.settings()
    topo = prepare(s)
    t0 = time.monotonic()
    w = workers.start(lenv.subprocess_env(), "--time-limit", "2")
    code = w.wait(20)
    elapsed = time.monotonic() - t0
    assert code == 0, w.describe()
    assert w.summary().reason == "time limit 2s reached" and w.summary().processed == 0
    assert 2.0 <= elapsed < 7.0, f"exited after {elapsed:.1f}s\n{w.describe()}"
    assert queue_state(s, topo.queue) == (0, 0)


def test_memory_limit_exits_0_at_once_without_consuming(lenv, workers):
    s = lenv.settings()
    topo = prepare(s)
    publish(s, topo, searches(lenv, 3))
    t0 = time.monotonic()
    w = workers.start(lenv.subprocess_env(), "--memory-limit", "1M")
    code = w.wait(20)
    elapsed = time.monotonic() - t0
    assert code == 0, w.describe()
    summary = w.summary()
    assert "memory limit" in summary.reason and summary.processed == 0, w.describe()
    assert elapsed < 6.0, f"took {elapsed:.1f}s"
    wait_queue(s, topo.queue, messages=3, consumers=0)
    assert event_total(s) == 0


def test_failure_limit_stops_after_n_failed(lenv, workers):
    s = lenv.settings()
    topo = prepare(s)
    bad = [b"not json", b"{}", b"[1, 2]", b'{"user_id": "x"}', b"\xff\xfe"]
    publish(s, topo, bad)
    # prefetch 1: one message per batch, so the limit is observable message by message (with bigger batches
    # the worker stops after the batch in which the limit was reached)
    w = workers.start(lenv.subprocess_env(), "--failure-limit", "2", "--prefetch", "1", "--time-limit", "30")
    assert w.wait(30) == 0, w.describe()
    summary = w.summary()
    assert (summary.reason, summary.failed, summary.processed) == ("failure limit 2 reached", 2, 2), w.describe()
    wait_queue(s, topo.failed_queue, messages=2)
    wait_queue(s, topo.queue, messages=3, consumers=0)


def test_bad_memory_limit_is_a_one_line_configuration_error(lenv):
    done = run_cli("consume", "--memory-limit", "abc", env=lenv.subprocess_env(), timeout=30)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--memory-limit" in lines[0] and "abc" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout


# ---- 2. signals ---------------------------------------------------------------------------------


def test_sigterm_mid_batch_finishes_the_batch_and_loses_nothing(openai_env, fake_openai, workers):
    """SIGTERM while a batch is inside a (slow) provider call: that batch is completed and acked, no new
    batch starts, exit 0; a second worker takes exactly the rest; every event applied exactly once."""
    env = openai_env
    s = env.settings()
    topo = prepare(s)
    events = searches(env, 300, users=4)
    publish(s, topo, events)
    # every batch makes one provider request (all phrases are new); each takes >= 0.4 s
    fake_openai.fail_next(200, delay_s=0.4, times=100)
    w1 = workers.start(env.subprocess_env(), "--prefetch", "50", "--time-limit", "60", name="first")
    wait_for(lambda: len(fake_openai.requests) >= 2 and event_total(s) > 0, timeout=30,
             what="some profiles written and the worker inside its next batch")
    w1.signal(signal.SIGTERM)
    assert w1.wait(20) == 0, w1.describe()
    first = w1.summary()
    batches = int(w1.log_field("worker stopped", "batches") or -1)
    requests = len(fake_openai.requests)
    assert first.reason == "signal" and 0 < first.processed < len(events), w1.describe()
    assert first.applied == first.processed and first.failed == first.retried == 0, w1.describe()
    # the batch in flight at SIGTERM was finished (its request has a completed batch), no batch started after
    assert batches == requests, f"{batches} batches for {requests} provider requests\n{w1.describe()}"
    assert event_total(s) == first.processed
    remaining = len(events) - first.processed
    wait_queue(s, topo.queue, messages=remaining, consumers=0)  # the applied batches were acked

    fake_openai.clear()
    w2 = workers.start(env.subprocess_env(), "--prefetch", "50", "--limit", str(remaining), name="second")
    assert w2.wait(60) == 0, w2.describe()
    second = w2.summary()
    assert (second.processed, second.applied, second.duplicate) == (remaining, remaining, 0), w2.describe()
    check_profiles(s, expected_profiles(s, events, {}), counts_of(events))
    assert event_total(s) == len(events)
    wait_queue(s, topo.queue, messages=0)


@pytest.mark.parametrize("second_signal", [signal.SIGINT, signal.SIGTERM], ids=["then-SIGINT", "then-SIGTERM"])
def test_second_signal_exits_at_once_and_redelivered_messages_apply_once(openai_env, fake_openai, workers,
                                                                          second_signal):
    env = openai_env
    s = env.settings()
    topo = prepare(s)
    done_before = searches(env, 3, users=2, label="a")
    in_flight = searches(env, 3, users=2, label="b")
    publish(s, topo, done_before)
    w = workers.start(env.subprocess_env(), "--prefetch", "10", "--time-limit", "60", name="killed")
    wait_for(lambda: event_total(s) == 3, timeout=20, what="the first events applied")
    fake_openai.fail_next(200, delay_s=5)
    sent = len(fake_openai.requests)
    publish(s, topo, in_flight)
    wait_for(lambda: len(fake_openai.requests) > sent, timeout=20, what="the worker inside the slow provider call")

    w.signal(signal.SIGTERM)
    # the first signal is honoured by finishing the batch: the worker does not exit while the call is pending
    assert not wait_for(lambda: not w.alive(), timeout=1.0, fail=False), w.describe()
    t0 = time.monotonic()
    w.signal(second_signal)
    code = w.wait(10)
    elapsed = time.monotonic() - t0
    assert code == 128 + second_signal, w.describe()
    assert elapsed < 2.0, f"exit took {elapsed:.2f}s after the second signal (the batch needed ~4 s more)"
    assert event_total(s) == 3  # the interrupted batch wrote nothing
    wait_queue(s, topo.queue, messages=3, consumers=0)  # unacked: back in the queue

    w2 = workers.start(env.subprocess_env(), "--prefetch", "10", "--limit", "3", name="restarted")
    assert w2.wait(30) == 0, w2.describe()
    summary = w2.summary()
    assert (summary.processed, summary.applied, summary.duplicate) == (3, 3, 0), w2.describe()
    # redelivered on their first attempt since they came back: one batch again (one write per user)
    assert summary.writes == 2, w2.describe()
    everything = done_before + in_flight
    check_profiles(s, expected_profiles(s, everything, {}), counts_of(everything))
    wait_queue(s, topo.queue, messages=0)


# ---- 3. stop-workers ----------------------------------------------------------------------------


def test_stop_workers_stops_running_workers_only(lenv, workers):
    s = lenv.settings()
    topo = prepare(s)
    r = redis_lib.Redis.from_url(lenv["REDIS_URL"])
    try:
        w1 = workers.start(lenv.subprocess_env(), "--time-limit", "60")
        w2 = workers.start(lenv.subprocess_env(), "--time-limit", "60")
        wait_queue(s, topo.queue, consumers=2, timeout=20)
        done = run_cli("stop-workers", env=lenv.subprocess_env(), timeout=30)
        assert done.returncode == 0 and "stop requested" in done.stdout, (done.stdout, done.stderr)
        w3 = workers.start(lenv.subprocess_env(), "--time-limit", "60", name="later")
        assert w1.wait(15) == 0, w1.describe()
        assert w2.wait(15) == 0, w2.describe()
        assert w1.summary().reason == w2.summary().reason == "stop-workers requested"
        assert w3.alive(), w3.describe()
        # the later worker keeps consuming: it is the only consumer now and applies a new event
        wait_queue(s, topo.queue, consumers=1, timeout=20)
        event = searches(lenv, 1)
        publish(s, topo, event)
        wait_for(lambda: event_total(s) == 1, timeout=20, what="the later worker to apply an event")
        assert w3.alive(), w3.describe()
        w3.signal(signal.SIGTERM)
        assert w3.wait(15) == 0, w3.describe()
        assert w3.summary().reason == "signal" and w3.summary().applied == 1
    finally:
        r.delete(lenv["REDIS_KEY_PREFIX"] + "stop-workers")
        r.close()


# ---- 4. broker connection loss ------------------------------------------------------------------


def test_worker_reconnects_after_the_broker_closes_its_connection(lenv, workers):
    with private_vhost(RABBIT) as (vhost, dsn):
        lenv["RABBITMQ_DSN"] = dsn
        s = lenv.settings()
        topo = prepare(s)
        before, after = searches(lenv, 60, label="before"), searches(lenv, 60, label="after")
        publish(s, topo, before)
        w = workers.start(lenv.subprocess_env(), "--prefetch", "20", "--time-limit", "60")
        wait_for(lambda: event_total(s) == 60, timeout=30, what="the first events applied")
        wait_queue(s, topo.queue, messages=0)
        t0 = time.monotonic()
        rabbitmqctl("close_all_connections", "-p", vhost, "test")
        publish(s, topo, after)
        wait_for(lambda: event_total(s) > 60, timeout=30, interval=0.02, what="an event applied after the close")
        reconnect_s = time.monotonic() - t0
        print(f"\nreconnect: first message applied {reconnect_s:.2f}s after close_all_connections")
        wait_for(lambda: event_total(s) == 120, timeout=30, what="every event applied")
        w.signal(signal.SIGTERM)
        assert w.wait(15) == 0, w.describe()
        assert "broker connection lost, reconnecting" in w.stderr, w.describe()
        assert w.summary().applied == 120, w.describe()
        everything = before + after
        check_profiles(s, expected_profiles(s, everything, {}), counts_of(everything))
        assert queue_state(s, topo.queue)[0] == 0 and queue_state(s, topo.failed_queue)[0] == 0
        assert reconnect_s < 10, f"first message applied {reconnect_s:.2f}s after the connection was closed"


# ---- 5. heartbeats during a slow batch ----------------------------------------------------------


def test_heartbeats_and_watchdog_flow_during_a_slow_provider_call(openai_env, fake_openai, workers):
    env = openai_env
    with private_vhost(RABBIT) as (vhost, dsn), tempfile.TemporaryDirectory(prefix="nfy") as d:
        notify = NotifySocket(Path(d) / "notify")
        env["RABBITMQ_DSN"] = dsn + "?heartbeat=2"
        s = env.settings()
        topo = prepare(s)
        event = searches(env, 1, users=1, label="slow")
        fake_openai.fail_next(200, delay_s=10)
        publish(s, topo, event)
        try:
            w = workers.start(env.subprocess_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000"),
                              "--limit", "1", "--time-limit", "60")
            wait_for(lambda: len(fake_openai.requests) == 1, timeout=20, what="the provider call")
            call_started = time.monotonic()
            timeouts = [c["timeout"] for c in vhost_connections(vhost)]
            assert timeouts == [2], f"negotiated heartbeats in the vhost: {timeouts}"
            assert w.wait(40) == 0, w.describe()
        finally:
            notify.close()
    summary = w.summary()
    assert (summary.applied, summary.duplicate) == (1, 0), w.describe()
    assert "broker connection lost" not in w.stderr and "StreamLostError" not in w.stderr, w.describe()
    assert len(fake_openai.requests) == 1
    assert event_counts(s) == counts_of(event)
    check_profiles(s, expected_profiles(s, event, {}), counts_of(event))
    # a 10 s provider call is not a hung worker: the watchdog kept being fed (WATCHDOG_USEC=2s) all along
    pings = [t for t, _ in notify.lines("WATCHDOG=1") if t >= call_started]
    gaps = [b - a for a, b in itertools.pairwise([call_started, *pings])]
    assert len(pings) >= 8 and max(gaps) < 2.0, f"{len(pings)} pings, max gap {max(gaps):.2f}s"


# ---- 6. MongoDB outage --------------------------------------------------------------------------


def test_store_outage_pauses_and_nothing_is_lost(lenv, workers, mongo_wire):
    s = lenv.settings()
    topo = prepare(s)
    warmup = searches(lenv, 5, label="warm")
    held = searches(lenv, 10, label="held")
    later = searches(lenv, 10, label="later")
    publish(s, topo, warmup)
    w = workers.start(lenv.subprocess_env(), "--prefetch", "20", "--time-limit", "90")
    wait_for(lambda: event_total(s) == 5, timeout=20, what="the warm-up events applied")
    try:
        mongo_wire.stop()
        publish(s, topo, held)
        wait_for(lambda: "MongoDB unavailable, pausing" in w.stderr, timeout=30, interval=0.2,
                 what="the worker to pause")
        assert w.alive(), w.describe()
    finally:
        if mongo_wire.proc is None or mongo_wire.proc.poll() is not None:
            mongo_wire.start()  # same port; the memory engine starts empty
    store = Store(s.mongodb_url, s.mongodb_db)
    store.setup_indexes()  # a real MongoDB keeps its indexes; the memory engine has to be given them again
    store.close()
    publish(s, topo, later)
    # the warm-up profiles died with the server; everything published around the outage is applied exactly once
    wait_for(lambda: event_total(s) == 20, timeout=45, interval=0.2, what="held and later events applied")
    wait_queue(s, topo.queue, messages=0)
    w.signal(signal.SIGTERM)
    assert w.wait(20) == 0, w.describe()
    assert "MongoDB is back" in w.stderr, w.describe()
    summary = w.summary()
    assert summary.failed == 0, w.describe()
    both = held + later
    check_profiles(s, expected_profiles(s, both, {}), counts_of(both))
    assert queue_state(s, topo.failed_queue)[0] == 0
    assert all(queue_state(s, topo.retry_queue(i))[0] == 0 for i in range(1, len(topo.retry_delays_ms) + 1))


# ---- 7. sd_notify -------------------------------------------------------------------------------


class NotifySocket:
    """A systemd-like NOTIFY_SOCKET: a bound unix datagram socket, read by a thread (arrival times kept)."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, ln) for t, m in list(self.messages) for ln in m.splitlines() if ln.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_sd_notify_ready_status_watchdog_stopping(lenv, workers):
    s = lenv.settings()
    topo = prepare(s)
    with tempfile.TemporaryDirectory(prefix="nfy") as d:  # short path: AF_UNIX paths are limited to 108 bytes
        notify = NotifySocket(Path(d) / "notify")
        try:
            w = workers.start(lenv.subprocess_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000"),
                              "--time-limit", "60")
            wait_for(lambda: notify.lines("READY=1"), timeout=20, what="READY=1")
            # READY is sent once the consumer is attached
            assert queue_state(s, topo.queue)[1] == 1
            ready = next(m for _, m in notify.messages if "READY=1" in m)
            assert f"MAINPID={w.pid}" in ready.splitlines()
            events = searches(lenv, 5)
            publish(s, topo, events)
            wait_for(lambda: event_total(s) == 5, timeout=20, what="events applied")
            wait_for(lambda: any(re.match(r"STATUS=processed [1-9]\d*, applied [1-9]", ln)
                                 for _, ln in notify.lines("STATUS=")), timeout=10, what="a STATUS with counts")
            idle_from = time.monotonic()  # batches done: the loop is idle, only the watchdog cadence shows
            wait_for(lambda: len([t for t, _ in notify.lines("WATCHDOG=1") if t > idle_from]) >= 5, timeout=15,
                     what="repeated WATCHDOG=1")
            w.signal(signal.SIGTERM)
            assert w.wait(15) == 0, w.describe()
            wait_for(lambda: notify.lines("STOPPING=1"), timeout=5, what="STOPPING=1")
        finally:
            notify.close()
    messages = [m for _, m in notify.messages]
    assert messages[-1].splitlines()[0] == "STOPPING=1", messages[-5:]
    assert "STATUS=stopping: signal" in messages[-1].splitlines()
    first_ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    first_count = next(i for i, m in enumerate(messages) if m.startswith("STATUS=processed"))
    assert first_ready < first_count
    # WATCHDOG_USEC=1s: pings throttled to half of it, and never a silence as long as WATCHDOG_USEC while idle
    pings = [t for t, _ in notify.lines("WATCHDOG=1") if t > idle_from]
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(pings)]
    print(f"\nidle watchdog gaps {gaps}")
    assert min(gaps) >= 0.45 and max(gaps) < 1.0, f"idle watchdog gaps {gaps}"


# ---- 8. crash -----------------------------------------------------------------------------------


def test_unexpected_error_exits_1_and_leaves_the_message_queued(lenv, workers, tmp_path):
    """A bug (here an exception injected into the fold through a sitecustomize module: no stored document can
    cause one any more) makes the batch raise something that is neither a store nor a provider error: the
    worker logs the crash and exits 1; the unacked message goes back to the queue (and would end in failed as a
    PoisonMessage after restarts)."""
    s = lenv.settings()
    topo = prepare(s)
    user = f"{lenv['MONGODB_DB']}-crash"
    (tmp_path / "sitecustomize.py").write_text(
        "import myshop_ops.core.pipeline as pipeline\n\n\n"
        "def fold(*args, **kwargs):\n    raise RuntimeError('injected bug')\n\n\n"
        "pipeline.fold = fold\n")
    publish(s, topo, [make_event(user, "search", f"{user} phrase", T0)])
    env = lenv.subprocess_env()
    w = workers.start({**env, "PYTHONPATH": f"{tmp_path}:{env['PYTHONPATH']}"}, "--time-limit", "30")
    assert w.wait(20) == 1, w.describe()
    assert "worker crashed" in w.stderr and "RuntimeError: injected bug" in w.stderr, w.describe()
    assert "0 messages" in one_line(w.stdout), w.describe()
    wait_queue(s, topo.queue, messages=1, consumers=0)
    store = Store(s.mongodb_url, s.mongodb_db)
    assert store.users.find_one({"user_id": user}) is None  # untouched
    store.close()


# ---- 9. start-up against a missing queue -------------------------------------------------------


def test_missing_queue_is_reported_not_retried_forever(lenv, workers):
    s = lenv.settings()
    prepare(s)
    missing = f"{lenv['MONGODB_DB']}.no-such-queue"
    w = workers.start(lenv.subprocess_env(), missing, "--time-limit", "30")
    assert w.wait(15) == 2, w.describe()  # a deployment error: exit 2 (systemd does not restart it)
    assert missing in w.stderr and "setup-transports" in w.stderr, w.describe()
    assert "broker connection lost" not in w.stderr and "Traceback" not in w.stderr, w.describe()
