"""The operator tools that read queues (`failed show/retry/remove`, `unrouted show/republish`) over any queue
contents: forged death headers, headers of any AMQP type and name, properties that are no UTF-8, any body. They
never raise anything but their documented errors, and do what they say."""

from __future__ import annotations

import json
import struct
from collections import Counter
from datetime import UTC, datetime

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from myshop_ops.adapters import broker
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import CONTROL
from myshop_ops.cli import failed as failed_cli
from myshop_ops.core.limits import Limits
from myshop_ops.core.worker import Worker
from myshop_ops.tools import unrouted
from myshop_ops.tools.failed_queue import FailedBox
from myshop_ops.tools.queued import QueuedMessage
from tests.reliability.test_hostile import Raw, raw_fields
from tests.support.services import run_cli, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]

FORGED = {"x-death": "junk", "x-first-death-reason": b"\xff\xfe"}


def send(settings_, exchange: str, routing_key: str, messages: list[tuple[bytes, dict]]) -> None:
    """Publish (body, properties) pairs with confirms; header values may be Raw AMQP field bytes."""
    conn = broker.connect(settings_.rabbitmq_dsn)
    ch = conn.channel()
    ch.confirm_delivery()
    with raw_fields():
        for body, props in messages:
            ch.basic_publish(exchange, routing_key, body, pika.BasicProperties(**props))
    conn.close()


def contents(settings_, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message of ``queue`` (all left in it, in order)."""
    conn = broker.connect(settings_.rabbitmq_dsn)
    ch = conn.channel()
    out = []
    while (got := ch.basic_get(queue, auto_ack=False))[0] is not None:
        out.append((got[1], got[2]))
    conn.close()
    return out


def no_raw_control(text: str) -> bool:
    return CONTROL.search(text.replace("\n", "")) is None


# ---- the exact cases ------------------------------------------------------------------------------------------

def test_failed_show_survives_a_forged_death_reason_rabbitmq_keeps(env, topology):
    """A message with a forged x-death and an x-first-death-reason that is no UTF-8, dead-lettered by RabbitMQ
    (its TTL expired): RabbitMQ rewrites x-death but keeps the reason. Every form of `failed show` used to die
    with UnicodeDecodeError (rc 1); now each exits 0, records it with the reason shown as escapes, and it can be
    retried and removed."""
    s = env.settings()
    send(s, topology.exchange, topology.queue, [(b'{"user_id": "forged"}', {
        "message_id": "forged-reason", "expiration": "1", "headers": FORGED})])
    conn = broker.connect(s.rabbitmq_dsn)
    wait_for(lambda: broker.queue_depth(conn, topology.failed_queue)[0] == 1, what="dead-lettered by TTL")
    conn.close()
    sub = env.subprocess_env()
    for args in (["failed", "show"], ["failed", "show", "--json"], ["failed", "show", "--stats"],
                 ["failed", "show", "--stats", "--json"], ["failed", "show", "forged-reason"],
                 ["failed", "show", "forged-reason", "--json"]):
        shown = run_cli(*args, env=sub)
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, (args, shown.stdout, shown.stderr)
    record = json.loads(run_cli("failed", "show", "forged-reason", "--json", env=sub).stdout)
    assert record["error_class"] == "DeadLettered" and "\\xff\\xfe" in record["error_message"]
    retried = run_cli("failed", "retry", "forged-reason", "--force", env=sub)
    assert retried.returncode == 0 and "retried 1 message(s)" in retried.stdout, retried.stderr
    assert [b for _, b in contents(s, topology.queue)] == [b'{"user_id": "forged"}']


def test_failed_show_records_again_a_failed_copy_whose_record_is_gone(env, topology):
    """A worker-written failed copy carrying the forged headers, whose failed_messages record was removed: `failed
    show` used to crash recording it again; now it is recorded (same failure id) and removable."""
    s = env.settings()
    send(s, topology.exchange, topology.queue, [(b"not json", {"message_id": "copy-1", "headers": FORGED})])
    store = Store(s.mongodb_url, s.mongodb_db)
    try:
        deadline = wait_for(lambda: Worker(s, limits=Limits(seconds=1), store=store).run() == 0
                            and store.failed.count_documents({}) == 1, timeout=60, what="failed by the worker")
        assert deadline
        failure_id = store.failed.find_one({})["failure_id"]
        store.failed.delete_many({})
        sub = env.subprocess_env()
        listed = run_cli("failed", "show", "--json", env=sub)
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["drift"]["recorded_from_queue"] == [failure_id]
        assert store.failed.find_one({"failure_id": failure_id})["error_class"] == "InvalidMessage"
        assert run_cli("failed", "show", failure_id, env=sub).returncode == 0
        removed = run_cli("failed", "remove", "copy-1", "--force", env=sub)
        assert removed.returncode == 0 and "removed 1 message(s)" in removed.stdout, removed.stderr
        assert contents(s, topology.failed_queue) == [] and store.failed.count_documents({}) == 0
    finally:
        store.close()


def test_unrouted_show_and_republish_survive_hostile_properties(env, topology):
    """An unrouted message whose message id and routing key are no UTF-8 and whose headers pika cannot encode
    again (a double of 1e300, a timestamp past 2^63): `unrouted show` lists it, `republish` moves it."""
    s = env.settings()
    headers = {"x-big": Raw(b"d" + struct.pack(">d", 1e300)), "x-when": Raw(b"T" + struct.pack(">Q", 2**64 - 1)),
               "x-ok": "kept", **FORGED}
    send(s, topology.exchange, "no.binding", [(b"\xff[/x]\x1b[2J", {"message_id": b"\xff\xfe[/x]",
                                                                     "headers": headers})])
    conn = broker.connect(s.rabbitmq_dsn)
    wait_for(lambda: broker.queue_depth(conn, topology.unrouted)[0] == 1, what="caught by the alternate exchange")
    conn.close()
    sub = env.subprocess_env(COLUMNS="300")
    for args in (["unrouted", "show"], ["unrouted", "show", "--json"]):
        shown = run_cli(*args, env=sub)
        assert shown.returncode == 0 and no_raw_control(shown.stdout + shown.stderr), (shown.stdout, shown.stderr)
    assert "\\xff\\xfe[/x]" in run_cli("unrouted", "show", env=sub).stdout
    moved = run_cli("unrouted", "republish", env=sub)
    assert moved.returncode == 0 and "moved 1 message(s)" in moved.stdout, moved.stderr
    [(props, body)] = contents(s, topology.queue)
    assert body == b"\xff[/x]\x1b[2J" and props.headers["x-ok"] == "kept"


# ---- properties: any queue contents ---------------------------------------------------------------------------

OURS = ["x-death", "x-first-death-reason", "x-failure-id", "x-retry-count", "x-error-class", "x-error-message",
        "x-worker-host", "x-original-queue", "x-error-history", "x-published-at", "x-first-failure-at"]
# values pika never encodes (NaN and infinite floats are left out: RabbitMQ closes the connection of their publisher)
RAW_VALUES = [Raw(b"T" + struct.pack(">Q", 2**64 - 1)), Raw(b"d" + struct.pack(">d", 1e300)),
              Raw(b"d" + struct.pack(">d", -1e300)), Raw(b"S" + struct.pack(">I", 3) + b"\xff\xfe\x00"),
              Raw(b"D" + struct.pack(">Bi", 200, -1))]
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=30)
           | st.binary(max_size=20) | st.datetimes(min_value=datetime(1970, 1, 2), timezones=st.just(UTC))
           | st.sampled_from(RAW_VALUES) | st.uuids().map(lambda u: u.hex))
header_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3), max_leaves=5)
header_names = st.sampled_from(OURS) | st.text(min_size=1, max_size=20) | st.binary(min_size=1, max_size=10)
short = st.none() | st.text(max_size=40) | st.binary(max_size=30)
bodies = st.binary(max_size=120) | st.fixed_dictionaries(
    {}, optional={"user_id": st.text(max_size=10) | st.integers(), "event_type": st.text(max_size=10),
                  "message_id": st.text(max_size=10)}).map(lambda d: json.dumps(d).encode())
messages = st.tuples(bodies, st.fixed_dictionaries({
    "headers": st.dictionaries(header_names, header_values, max_size=6), "message_id": short,
    "content_type": short, "timestamp": st.none() | st.integers(0, 2**64 - 1)}))
queue_contents = st.lists(messages, min_size=1, max_size=4)
# real queues: a few examples of several messages each, one queue per test emptied between examples (~0.3 s each)
_SLOW = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def empty(failed_box: FailedBox) -> None:
    for queue in (failed_box.topo.queue, failed_box.topo.failed_queue, failed_box.topo.unrouted):
        broker.purge(failed_box.connection, queue)
    failed_box.store.delete_failures()


def render(records: list[dict], failed_box: FailedBox, capsys) -> None:
    """What `failed show` prints of these records (table, JSON, each in full): no traceback, no raw control."""
    drift = failed_box.check()
    failed_cli._show_list(records, drift, False)
    failed_cli._show_list(records, drift, True)
    failed_cli._show_stats(failed_box.stats(), drift, False)
    for rec in records:
        failed_cli._print_one(rec)
    out = capsys.readouterr()
    assert no_raw_control(out.out + out.err)


@_SLOW
@given(queue_contents, st.data())
def test_property_failed_tools_take_any_queue_contents(env, failed_box, capsys, contents_, data):
    """Any messages in `failed`: check records each one without a record once (a second check finds no drift),
    every record can be shown, remove and retry act on exactly the messages named (by key or message id)."""
    s = env.settings()
    empty(failed_box)
    send(s, "", failed_box.topo.failed_queue, contents_)
    queued = [QueuedMessage.read(p, b) for p, b in contents(s, failed_box.topo.failed_queue)]
    assert len(queued) == len(contents_)
    first = failed_box.check()
    assert first.queue_count == len(queued) and sorted(first.recorded_from_queue) == sorted({m.key for m in queued})
    again = failed_box.check()
    assert again.consistent and again.record_count == len({m.key for m in queued})
    render(failed_box.records(limit=100), failed_box, capsys)
    for m in queued:
        assert failed_box.matching(m.key), m
    keys = sorted({m.key for m in queued})
    gone = set(data.draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)))
    retried = set(data.draw(st.lists(st.sampled_from(keys), max_size=2, unique=True))) - gone
    named = lambda ids: [m for m in queued if m.chosen(ids)]  # noqa: E731
    assert sorted(failed_box.remove(gone).done) == sorted(m.key for m in named(gone))
    out = failed_box.retry(retried)
    left = [m for m in queued if not m.chosen(gone) and not m.chosen(retried)]
    moved = [m for m in named(retried) if not m.chosen(gone)]
    assert sorted(out.done) == sorted(m.key for m in moved) and out.missing == []
    assert Counter(b for _, b in contents(s, failed_box.topo.queue)) == Counter(m.body for m in moved)
    assert Counter(b for _, b in contents(s, failed_box.topo.failed_queue)) == Counter(m.body for m in left)
    assert failed_box.check().consistent


@settings(_SLOW, max_examples=25)
@given(queue_contents)
def test_property_unrouted_tools_take_any_queue_contents(env, failed_box, contents_):
    """Any messages caught by the alternate exchange: peek lists each as text without consuming it, republish moves
    every one to the main queue with its body."""
    s = env.settings()
    empty(failed_box)
    send(s, failed_box.topo.exchange, "no.binding.matches", contents_)
    conn = failed_box.connection
    wait_for(lambda: broker.queue_depth(conn, failed_box.topo.unrouted)[0] == len(contents_), timeout=10)
    total, listed = unrouted.peek(conn, failed_box.topo, 10)
    assert total == len(contents_) and len(listed) == total
    for m in listed:
        assert isinstance(m.routing_key, str) and all(v is None or isinstance(v, str) for v in (
            m.message_id, m.user_id, m.event_type)) and isinstance(m.body, str)
    assert broker.queue_depth(conn, failed_box.topo.unrouted)[0] == total  # nothing consumed
    assert unrouted.republish(conn, failed_box.topo) == total
    assert Counter(b for _, b in contents(s, failed_box.topo.queue)) == Counter(b for b, _ in contents_)
