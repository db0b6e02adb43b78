"""`myshop generate-test-events` and the windowed publisher on the real broker, store and a real worker.

Every test has its own queues and database (the ``env`` fixture). The worker of the ``--wait`` test uses Redis
database ``redis_url(GENERATE)`` so a stop-workers flag set by another suite on the shared Redis never stops it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime

import pika
import pytest

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import BrokerError, Topology, published_at
from myshop_ops.adapters.management import for_dsn
from myshop_ops.adapters.publisher import NACK_ATTEMPTS, NACKED, OK, WindowedPublisher
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import EVENT_TYPES, parse
from myshop_ops.tools.generate import SEARCH_PHRASES
from tests.support.events import seed_products
from tests.support.services import GENERATE, RABBIT, ROOT, redis_url, run_cli
from tests.support.workers import event_counts, one_line, prepare, queue_state, wait_queue

pytestmark = pytest.mark.integration

PLAN = ("--users", "4", "--events-per-user", "5", "--start-user-id", "700")


def drain(settings, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message of the queue, in order, taken with basic_get."""
    conn = broker.connect(settings.rabbitmq_dsn)
    ch = conn.channel()
    out = []
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append((props, body))
    conn.close()
    return out


def generate(env, *args: str, timeout: float = 60):
    return run_cli("generate-test-events", *args, env=env.subprocess_env(COLUMNS="200"), timeout=timeout)


# ---- publishing ---------------------------------------------------------------------------------


def test_publishes_exactly_the_recorded_valid_events(env, topology, tmp_path):
    record = tmp_path / "events.jsonl"
    done = generate(env, *PLAN, "--event-type", "search", "--yes", "--record", str(record))
    assert done.returncode == 0, done.stdout + done.stderr
    out = one_line(done.stdout)
    assert "published │ 20" in out and "failed │ 0" in out and "events/s" in out and "ms/event" in out
    assert "guest:***@" in out and "guest:guest@" not in out  # the plan names the broker, password masked
    s = env.settings()
    wait_queue(s, topology.queue, messages=20)
    messages = drain(s, topology.queue)
    lines = record.read_bytes().splitlines()
    assert [body for _, body in messages] == lines  # the same bytes, in publish order
    users = set()
    for props, body in messages:
        event = parse(body)
        assert props.message_id == event.message_id == json.loads(body)["message_id"]
        assert props.content_type == "application/json" and props.delivery_mode == 2
        assert event.event_type == "search" and event.search_phrase in SEARCH_PHRASES
        users.add(event.user_id)
    assert users == {"700", "701", "702", "703"}
    assert len({p.message_id for p, _ in messages}) == 20


def test_product_events_need_products_then_use_only_stored_ones(env, topology):
    done = generate(env, *PLAN, "--yes")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "no product vectors" in lines[0] and "myshop products import examples/catalog.jsonl" in lines[0]
    s = env.settings()
    assert queue_state(s, topology.queue)[0] == 0

    seed_products(s, ["p1", "p2", "p3"])
    store = Store(s.mongodb_url, s.mongodb_db)  # a product of another model must never be used
    store.products.insert_one({"product_id": "foreign", "embedding": [0.1] * 8, "model": "other", "dimensions": 8})
    store.close()
    done = generate(env, *PLAN, "--event-type", "mixed", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    events = [parse(body) for _, body in drain(s, topology.queue)]
    assert len(events) == 20
    assert {e.event_type for e in events} == set(EVENT_TYPES)
    assert {e.product_id for e in events if e.product_id} <= {"p1", "p2", "p3"}


JSON_SCHEMA = {
    "run_id": str, "plan": dict, "exchange": str, "queue": str, "broker": str, "published": int, "failed": int,
    "failures": dict, "failover": dict, "error": (str, type(None)), "started_at": str, "duration_s": float,
    "events_per_s": (float, type(None)), "ms_per_event": (float, type(None)), "by_type": dict,
    "record": (dict, type(None)), "wait": (dict, type(None)),
}
PLAN_SCHEMA = {"events": int, "users": int, "events_per_user": int, "event_type": str, "start_user_id": int,
               "delay_ms": int, "window": int}
WAIT_SCHEMA = {"completed": bool, "timeout_s": float, "expected": int, "observed": int, "unusable": int,
               "drain_s": (float, type(None)), "waited_s": float, "poll_interval_ms": int, "publish_time": str,
               "latency_ms": dict, "queue_ready": (int, type(None)), "consumers": (int, type(None)),
               "queues": (list, type(None))}


def check_schema(data: dict, schema: dict) -> None:
    assert set(data) == set(schema), set(data) ^ set(schema)
    for key, kind in schema.items():
        assert isinstance(data[key], kind), (key, data[key])


def test_json_output_follows_the_documented_schema_and_reruns_make_new_events(env, topology, tmp_path):
    runs = []
    for n in (1, 2):
        record = tmp_path / f"run{n}.jsonl"
        done = generate(env, *PLAN, "--event-type", "search", "--yes", "--json", "--record", str(record))
        assert done.returncode == 0, done.stdout + done.stderr
        data = json.loads(done.stdout)  # stdout holds the JSON object only (the plan goes to stderr)
        check_schema(data, JSON_SCHEMA)
        check_schema(data["plan"], PLAN_SCHEMA)
        assert data["plan"] == {"events": 20, "users": 4, "events_per_user": 5, "event_type": "search",
                                "start_user_id": 700, "delay_ms": 0, "window": 1000}
        assert data["published"] == 20 and data["failed"] == 0 and data["error"] is None
        assert data["failures"] == {"nacked": 0, "returned": 0, "lost": 0, "unsent": 0}
        assert data["failover"] == {"count": 0, "republished": 0, "brokers": [data["broker"]]}
        assert data["by_type"] == {"search": 20} and data["wait"] is None
        assert data["record"] == {"path": str(record), "lines": 20}
        assert data["events_per_s"] > 0 and data["ms_per_event"] > 0
        assert data["queue"] == data["exchange"] == topology.queue and "***" in data["broker"]
        assert datetime.fromisoformat(data["started_at"]).utcoffset() is not None
        runs.append({json.loads(line)["message_id"] for line in record.read_bytes().splitlines()})
    assert len(runs[0]) == len(runs[1]) == 20 and not runs[0] & runs[1]
    wait_queue(env.settings(), topology.queue, messages=40)


def test_refuses_to_publish_without_the_topology_and_names_what_is_missing(env):
    """Nothing declared (a fresh queue name): exit 2, one line naming the queue and the exchange and the fix."""
    topo = Topology.from_settings(env.settings())
    conn = broker.connect(RABBIT)
    try:
        assert broker.missing_objects(conn, topo) == [f"queue '{topo.queue}'", f"exchange '{topo.exchange}'"]
    finally:
        conn.close()
    done = generate(env, *PLAN, "--event-type", "search", "--yes")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert one_line(done.stderr) == (f"error: queue '{topo.queue}' and exchange '{topo.exchange}' do not exist on "
                                     "amqp://guest:***@127.0.0.1:5672/%2f: run `myshop setup-transports`")


def test_unroutable_events_are_kept_by_the_alternate_exchange_or_counted_as_failed(env, topology):
    conn = broker.connect(RABBIT)
    conn.channel().queue_unbind(topology.queue, topology.exchange, routing_key=topology.queue)
    conn.close()
    done = generate(env, "--users", "2", "--events-per-user", "3", "--event-type", "search", "--yes", "--json")
    assert done.returncode == 0, done.stdout + done.stderr  # routed to the alternate exchange: nothing lost
    wait_queue(env.settings(), topology.unrouted, messages=6)
    for_dsn(None, RABBIT).delete_policy(f"myshop.{topology.exchange}.exchange")  # no alternate exchange any more
    done = generate(env, "--users", "2", "--events-per-user", "3", "--event-type", "search", "--yes", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["published"] == 0 and data["failed"] == 6 and data["failures"]["returned"] == 6


def test_wait_gives_up_without_a_worker(env, topology):
    done = generate(env, "--users", "1", "--events-per-user", "2", "--event-type", "search", "--yes", "--wait",
                    "--wait-timeout", "1")
    assert done.returncode == 1, done.stdout + done.stderr
    err = one_line(done.stderr)
    q = topology.queue
    assert f"no consumer on queue '{q}'" in err
    assert (f"gave up waiting after 1 s: 0 of 2 events are in the profiles; queues: '{q}' 2 ready, 0 unacked, "
            f"0 consumer(s); every other queue empty; no worker consumes '{q}': start `myshop consume`") in err, err
    assert "events observed │ 0 of 2" in one_line(done.stdout)


def test_wait_gives_up_saying_where_the_missing_events_are(env):
    """The events sit in a retry queue (60 s delay) and the failed queue, none in the main queue: the give-up line
    counts them there and says what to do, instead of pointing at the empty main queue."""
    env["WORKER_RETRY_DELAY"] = "60000"
    topo = prepare(env.settings())
    s = env.settings()
    out: list = []
    t = threading.Thread(target=lambda: out.append(generate(
        env, "--users", "1", "--events-per-user", "3", "--event-type", "search", "--yes", "--wait", "--wait-timeout",
        "5", "--json")))
    t.start()
    wait_queue(s, topo.queue, messages=3)
    conn = broker.connect(s.rabbitmq_dsn)
    assert broker.move(conn, topo.queue, topo.retry_queue(1), skip=1) == 2  # as a worker's retry copies would
    assert broker.move(conn, topo.queue, topo.failed_queue) == 1
    conn.close()
    t.join(60)
    done = out[0]
    assert done.returncode == 1, done.stdout + done.stderr
    q = topo.queue
    assert (f"gave up waiting after 5 s: 0 of 3 events are in the profiles; queues: '{q}' 0 ready, 0 unacked, "
            f"0 consumer(s); '{q}.retry.1' 2; '{topo.failed_queue}' 1; every other queue empty; 2 message(s) wait "
            f"in retry queues and go back to '{q}' within 60 s: wait longer (--wait-timeout); 1 in the failed "
            "queue: `myshop failed show`") in one_line(done.stderr), done.stderr
    queues = {row["queue"]: row for row in json.loads(done.stdout)["wait"]["queues"]}
    assert queues[q] == {"queue": q, "role": "main", "ready": 0, "unacked": 0, "consumers": 0}
    assert [queues[topo.retry_queue(i)]["ready"] for i in (1, 2, 3)] == [2, 0, 0]
    assert queues[topo.failed_queue]["ready"] == 1 and queues[topo.unrouted]["ready"] == 0


# ---- the confirmation prompt on a real terminal -------------------------------------------------


def run_in_pty(args: list[str], env: dict[str, str], answer: str, timeout: float = 60) -> tuple[int, str]:
    """Run the CLI with stdin/stdout/stderr on a pseudo-terminal, answer the prompt, return (rc, output)."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "myshop_ops", *args], env=env, cwd=ROOT,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    output, answered = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            if not answered and b"[y/N]" in output:
                os.write(master, answer.encode() + b"\n")
                answered = True
            if proc.poll() is not None and not ready:
                break
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert answered, output.decode(errors="replace")
    return rc, output.decode(errors="replace")


def test_the_prompt_on_a_terminal(env, topology):
    args = ["generate-test-events", *PLAN, "--event-type", "search"]
    tty_env = env.subprocess_env(COLUMNS="200", TERM="xterm")
    rc, out = run_in_pty(args, tty_env, "n")
    assert rc == 1, out
    assert "Publish 20 search events" in out and "aborted: nothing published" in out
    s = env.settings()
    assert queue_state(s, topology.queue)[0] == 0

    rc, out = run_in_pty(args, tty_env, "y")
    assert rc == 0, out
    assert "publishing" in out and "20/20" in out  # the progress bar
    wait_queue(s, topology.queue, messages=20)


# ---- --wait with a real worker ------------------------------------------------------------------


def test_wait_reports_latencies_consistent_with_the_profiles(env, topology, workers, tmp_path):
    s = env.settings()
    seed_products(s, [f"w{i}" for i in range(5)])
    wenv = env.subprocess_env(REDIS_URL=redis_url(GENERATE))
    worker = workers.start(wenv, "--time-limit", "90")
    wait_queue(s, topology.queue, consumers=1, timeout=20)
    record = tmp_path / "events.jsonl"
    done = generate(env, "--users", "5", "--events-per-user", "4", "--event-type", "mixed", "--yes", "--json",
                    "--wait", "--wait-timeout", "60", "--record", str(record), timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr + worker.describe()
    data = json.loads(done.stdout)
    wait = data["wait"]
    check_schema(wait, WAIT_SCHEMA)
    assert wait["completed"] and wait["expected"] == wait["observed"] == 20 and wait["unusable"] == 0
    assert wait["publish_time"] == "sent" and wait["queue_ready"] == 0 and wait["consumers"] == 1
    lat = wait["latency_ms"]
    assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]

    counts = event_counts(s)
    assert counts == {str(500_000 + u): 4 for u in range(5)}
    store = Store(s.mongodb_url, s.mongodb_db)
    last_write = max(d["updated_at"] for d in store.users.find({}, {"updated_at": 1}))
    store.close()
    first_publish = datetime.fromisoformat(data["started_at"])
    publish_end = first_publish.timestamp() + data["duration_s"]
    span_ms = (last_write - first_publish).total_seconds() * 1000
    assert lat["p99"] <= span_ms + wait["poll_interval_ms"]
    # the last profile write is the visibility time of some event sent before publishing ended
    assert lat["max"] >= (last_write.timestamp() - publish_end) * 1000 - 2
    assert wait["drain_s"] == pytest.approx(max(0.0, last_write.timestamp() - publish_end), abs=0.01)

    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.describe()
    assert worker.summary().applied == 20
    # the record is what `myshop verify` recomputes the profiles from
    checked = run_cli("verify", "--events", str(record), "--json", env=env.subprocess_env())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["events"] == 20


# ---- failures -----------------------------------------------------------------------------------


def test_broker_unreachable_is_one_line_with_the_password_masked(env):
    done = run_cli("generate-test-events", "--event-type", "search", "--yes",
                   env=env.subprocess_env(RABBITMQ_DSN="amqp://app:s3cret@127.0.0.1:1/%2f"))
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "RabbitMQ unreachable" in lines[0], done.stderr
    assert "app:***@127.0.0.1:1" in lines[0] and "s3cret" not in done.stdout + done.stderr


def test_too_many_events_is_one_line_and_exit_2(env):
    done = generate(env, "--users", "1000000", "--events-per-user", "2", "--yes")
    assert done.returncode == 2 and "at most 1,000,000" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# ---- the publisher on its own -------------------------------------------------------------------


@pytest.fixture
def capped_queue():
    """A classic queue that takes 5 messages and rejects the rest (x-overflow reject-publish -> Basic.Nack)."""
    name = "gen-capped-" + uuid.uuid4().hex[:8]
    conn = broker.connect(RABBIT)
    ch = conn.channel()
    ch.exchange_declare(name, "direct", auto_delete=False)
    ch.queue_declare(name, arguments={"x-max-length": 5, "x-overflow": "reject-publish"})
    ch.queue_bind(name, name, routing_key=name)
    yield name, ch
    ch.queue_delete(name)
    ch.exchange_delete(name)
    conn.close()


def test_publisher_counts_nacks_and_keeps_order(capped_queue):
    """A nacked message goes again on a fresh channel (the cluster's nack stall, tests/cluster), NACK_ATTEMPTS
    times in all, then counts as nacked: never dropped silently."""
    name, ch = capped_queue
    messages = [(f'{{"n":{i}}}'.encode(), f"{i:064x}") for i in range(20)]
    settled: list[tuple[int, bool]] = []
    result = WindowedPublisher(RABBIT, name, name, window=20, on_settled=lambda i, ok: settled.append((i, ok))
                               ).run(messages)
    assert result.published == 5 and result.nacked == 15 and result.failed == 15 and result.error is None
    assert result.republished == 15 * (NACK_ATTEMPTS - 1) and result.channels == NACK_ATTEMPTS
    assert list(result.status[:5]) == [OK] * 5 and set(result.status[5:]) == {NACKED}
    assert settled == [(i, i < 5) for i in range(20)]  # released in publish order
    assert all(result.sent_at[i] > 0 for i in range(20))
    got = []
    while (m := ch.basic_get(name, auto_ack=True))[0] is not None:
        got.append((m[1].message_id, m[2]))
        assert published_at(m[1]) == pytest.approx(result.sent_at[len(got) - 1], abs=0.002)
    assert got == [(mid, body) for body, mid in messages[:5]]


def test_publisher_delay_spaces_publishes(capped_queue):
    name, _ = capped_queue
    messages = [(b"{}", f"{i:064x}") for i in range(5)]
    result = WindowedPublisher(RABBIT, name, name, delay_s=0.05).run(messages)
    assert result.published == 5
    # an absolute schedule (a late publish does not push the later ones back): none leaves before its slot
    assert all(result.sent_at[i] - result.sent_at[0] >= i * 0.05 - 0.01 for i in range(5))
    assert result.duration_s >= 0.2


def test_publisher_fails_over_and_reports_unreachable_urls(capped_queue):
    name, _ = capped_queue
    result = WindowedPublisher(f"amqp://guest:guest@127.0.0.1:1/%2f,{RABBIT}", name, name).run([(b"{}", "0" * 64)])
    assert result.published == 1 and result.broker == RABBIT.replace("guest:guest", "guest:***")
    with pytest.raises(BrokerError) as exc:
        WindowedPublisher("amqp://app:s3cret@127.0.0.1:1/%2f", name, name).run([(b"{}", "0" * 64)])
    assert "app:***@127.0.0.1:1" in str(exc.value) and "s3cret" not in str(exc.value)


def test_publisher_on_a_missing_exchange_loses_nothing_silently():
    topo = Topology(queue="gen-missing-" + uuid.uuid4().hex[:8])
    result = WindowedPublisher(RABBIT, topo.exchange, topo.queue).run([(b"{}", f"{i:064x}") for i in range(50)])
    assert result.published == 0 and result.failed == 50 and "404" in (result.error or "")
