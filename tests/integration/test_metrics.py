"""Prometheus metrics and health endpoints on real services: a worker's /metrics after a real run, /healthz and
/readyz flipping while the broker refuses the worker, and the queue exporter of `myshop stats --serve-metrics`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from myshop_ops.base.contract import make_event, serialise
from tests.support.events import T0, mixed_events, publish, seed_products
from tests.support.services import RABBIT, ROOT, free_port, wait_for
from tests.support.workers import event_total, prepare, private_vhost, rabbitmqctl

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def samples(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    code, text = get(port, "/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(values: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in values.items() if n == name and all((k, x) in lab for k, x in labels.items()))


def test_worker_metrics_after_a_real_run(env, topology, workers):
    s = env.settings()
    products = seed_products(s, [f"p{i}" for i in range(4)])
    users = [f"{env['MONGODB_DB']}-m{i}" for i in range(3)]
    events = mixed_events(users, list(products), per_user=8)
    duplicate = events[0]
    ghost = make_event(users[0], "product_view", "no-such-product", T0)
    publish(s, topology, [*events, duplicate, ghost, b"not json"])
    port = free_port()
    workers.start(env.subprocess_env(), "--metrics-port", str(port), "--time-limit", "60")
    wait_for(lambda: event_total(s) == len(events), timeout=30, what="every event applied")
    wait_for(lambda: total(samples(port), "messenger_processed_messages_total") == len(events) + 3, timeout=10,
             what="all 27 messages counted")
    m = samples(port)
    assert total(m, "messenger_processed_messages_total", status="applied") == len(events)
    for etype in ("search", "product_view", "product_click", "product_purchase"):
        expected = sum(1 for e in events if e.event_type == etype)
        assert total(m, "messenger_processed_messages_total", status="applied", event_type=etype) == expected
    assert total(m, "messenger_processed_messages_total", status="duplicate") == 1
    assert total(m, "myshop_duplicates_total") == 1
    assert total(m, "messenger_processed_messages_total", status="skipped", event_type="product_view") == 1
    assert total(m, "messenger_processed_messages_total", status="failed", event_type="invalid") == 1
    assert total(m, "myshop_dead_lettered_total", error_class="InvalidMessage") == 1
    assert total(m, "myshop_batch_size_sum") == len(events) + 3
    batches = total(m, "messenger_processing_time_seconds_count")
    assert batches >= 1 and total(m, "myshop_batch_size_count") == batches
    # every message carried the publisher's x-published-at: one queue-wait observation each, all under a minute
    assert total(m, "myshop_queue_wait_seconds_count") == len(events) + 3
    assert 0 < total(m, "myshop_queue_wait_seconds_sum") < 60 * (len(events) + 3)
    assert total(m, "myshop_provider_requests_total") >= 1  # the hash provider is measured like any other
    assert total(m, "myshop_worker_ready") == 1 and total(m, "process_start_time_seconds") > 0
    assert get(port, "/healthz")[0] == 200 and get(port, "/readyz")[0] == 200
    assert get(port, "/nope")[0] == 404


def test_readyz_flips_while_the_broker_refuses_the_worker(env, workers):
    with private_vhost(RABBIT) as (vhost, dsn):
        env["RABBITMQ_DSN"] = dsn
        s = env.settings()
        topo = prepare(s)
        port = free_port()
        w = workers.start(env.subprocess_env(), "--metrics-port", str(port), "--time-limit", "90")
        wait_for(lambda: get(port, "/readyz")[0] == 200, timeout=20, what="ready")
        rabbitmqctl("clear_permissions", "-p", vhost, "guest")
        rabbitmqctl("close_all_connections", "-p", vhost, "test: broker gone")
        wait_for(lambda: get(port, "/readyz")[0] == 503, timeout=10, interval=0.1, what="not ready")
        _, body = get(port, "/readyz")
        assert json.loads(body) == {"ok": False, "consumer_attached": False, "mongodb": True,
                                    "publishing": True}
        assert get(port, "/healthz")[0] == 200  # alive: the loop keeps turning while it waits to reconnect
        assert w.alive()
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        wait_for(lambda: get(port, "/readyz")[0] == 200, timeout=45, interval=0.2, what="ready again")
        publish(s, topo, [make_event(f"{env['MONGODB_DB']}-r", "search", "after the outage", T0)])
        wait_for(lambda: event_total(s) == 1, timeout=20, what="the worker consuming again")


def test_queue_exporter_serves_depth_gauges(env, topology, workers):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "myshop_ops", "stats", "--serve-metrics", str(port), "--watch",
                             "0.5"], env=env.subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: get(port, "/readyz")[0] == 200, timeout=20, what="exporter ready")
        m = samples(port)
        assert total(m, "messenger_queue_depth", queue=topology.queue) == 0
        roles = {dict(lab)["queue"]: dict(lab)["role"] for (n, lab) in m if n == "messenger_queue_depth"}
        assert set(roles) == set(topology.queues())
        assert roles[topology.queue] == "main" and roles[topology.failed_queue] == "failed"  # what alerts select
        assert {roles[q] for q in topology.queues() if ".retry." in q} == {"retry"}
        publish(env.settings(), topology, [serialise(make_event("x", "search", f"q{i}", T0)) for i in range(5)])
        wait_for(lambda: total(samples(port), "messenger_queue_depth", queue=topology.queue) == 5, timeout=10,
                 what="depth 5 exported")
        m = samples(port)
        assert total(m, "myshop_queue_consumers", queue=topology.queue) == 0
        assert total(m, "myshop_failed_queue_messages") == 0
        assert total(m, "myshop_queue_level") == 1  # warn: messages wait with no consumer
        assert get(port, "/healthz")[0] == 200
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
