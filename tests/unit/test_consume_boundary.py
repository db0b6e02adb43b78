"""The consume path's boundary: a delivery's properties and headers of any type, bodies of any size and Redis values of
any form are parsed once (myshop_ops/base/values.py) where they enter; a bad one fails only itself, with a reason.
Against the core's in-memory stand-ins (tests/support/stubs.py), in seconds; the issue's own attack against the real
broker is tests/reliability/test_delivery_boundary.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.dedup import RedisState
from myshop_ops.base.contract import MAX_BODY_BYTES, make_event, serialise
from myshop_ops.base.values import Properties, count_value, epoch_value, read_properties
from myshop_ops.core.limits import Limits
from myshop_ops.core.retry_routing import H_ERROR_CLASS, H_ERROR_MESSAGE, H_IGNORED, H_ORIGINAL_SIZE
from myshop_ops.core.worker import BODY_PREFIX_BYTES, Delivery
from tests.support.services import redis_url
from tests.unit.test_core_worker import DIMS, SETTINGS, T0, TOPO, Shop

pytestmark = pytest.mark.timeout(60)


def send(shop: Shop, body: bytes, props: pika.BasicProperties, *, redelivered: bool = False) -> None:
    shop.broker.publish(TOPO.queue, body, properties=props, redelivered=redelivered)


def failed_copies(shop: Shop) -> list:
    return list(shop.broker.queues[TOPO.failed_queue])


# ---- the issue's cases, by name -----------------------------------------------------------------------------------

def test_a_redelivered_event_with_a_non_utf8_message_id_is_applied_and_crashes_nothing():
    """message_id=b'\\xff' (pika's form of an id that is not UTF-8) on a valid event, redelivered: the Redis
    journal's key was built from the raw bytes and every worker crashed (TypeError) until the delivery limit
    dead-lettered the batch. Now the id is ignored, the event known by its body's id and applied once."""
    shop = Shop(limits=Limits(messages=4))
    events = [make_event("victim", "product_view", "p1", T0.replace(hour=h)) for h in range(3)]
    send(shop, serialise(events[0]), pika.BasicProperties(message_id=b"\xff"), redelivered=True)
    for e in events[1:]:
        shop.broker.publish(TOPO.queue, serialise(e), message_id=e.message_id, redelivered=True)
    shop.broker.publish(TOPO.queue, serialise(make_event("neighbour", "product_view", "p2", T0)))
    assert shop.worker.run() == 0
    assert shop.store.profiles["victim"].event_count == 3 and shop.store.profiles["neighbour"].event_count == 1
    assert not failed_copies(shop) and shop.redis.journal == {}


def test_the_properties_record_keeps_clean_values_and_says_what_it_dropped():
    raw = pika.BasicProperties(
        message_id=b"\xff", content_type="text/\x1b[31m", timestamp=-1,
        headers={"ok": [1, 2.5, b"\x00", None, {"t": Decimal("1.5")}], b"\xfe": 1, "nan": Decimal("NaN"),
                 "deep": [[[[[[[[[["x"]]]]]]]]]], "odd": {1, 2}})
    props = read_properties(raw)
    assert props.message_id is None and props.content_type is None and props.timestamp is None
    assert props.headers == {"ok": [1, 2.5, b"\x00", None, {"t": Decimal("1.5")}]}
    assert len(props.ignored) == 7 and props.ignored[0].startswith("message_id: not UTF-8")
    assert read_properties(pika.BasicProperties(message_id="m1", timestamp=1_700_000_000, headers={"a": "b"})) == \
        Properties(message_id="m1", timestamp=1_700_000_000, headers={"a": "b"})
    assert read_properties(pika.BasicProperties(message_id="x" * 256)).message_id is None
    assert read_properties(pika.BasicProperties(message_id="é" * 128)).message_id is None  # 256 bytes
    assert read_properties(pika.BasicProperties(message_id="m\u202e1")).message_id is None
    assert read_properties(pika.BasicProperties(headers=5)).ignored == ("headers: not a table (int)",)


def test_an_unusable_message_id_of_a_failing_message_is_named_in_its_failed_copy():
    shop = Shop(limits=Limits(messages=1))
    send(shop, b"not json", pika.BasicProperties(message_id=b"\xff", headers={"x-n": 1}))
    assert shop.worker.run() == 0
    [copy] = failed_copies(shop)
    assert copy.properties.message_id.startswith("body-sha256:") and copy.properties.headers["x-n"] == 1
    assert "message_id: not UTF-8" in json.loads(copy.properties.headers[H_IGNORED])[0]
    assert shop.store.records[0]["message_id"] == copy.properties.message_id


def test_a_body_over_the_limit_fails_with_its_size_and_only_a_prefix_is_kept_and_stored():
    """A 1 MB body: the delivery keeps a 4 KiB prefix from the moment it arrives; the failed copy and the record hold
    that prefix and the size, and the reason names the size."""
    big = b'{"user_id": "u1", "pad": "' + b"x" * 1_000_000 + b'"}'
    delivery = Delivery.arrived(1, big, pika.BasicProperties())
    assert delivery.body == big[:BODY_PREFIX_BYTES] and delivery.size == len(big) and delivery.oversize
    shop = Shop(limits=Limits(messages=3))
    good = make_event("u2", "product_view", "p1", T0)
    shop.broker.publish(TOPO.queue, serialise(good), message_id=good.message_id)
    send(shop, big, pika.BasicProperties(message_id="big-1"))
    send(shop, b"y" * (MAX_BODY_BYTES + 1), pika.BasicProperties(message_id="big-2"), redelivered=True)
    assert shop.worker.run() == 0
    assert shop.store.profiles["u2"].event_count == 1
    first, second = failed_copies(shop)
    assert first.body == big[:BODY_PREFIX_BYTES] and first.properties.headers[H_ORIGINAL_SIZE] == len(big)
    assert first.properties.headers[H_ERROR_CLASS] == "InvalidMessage"
    assert f"body: larger than {MAX_BODY_BYTES} bytes (got {len(big)})" in first.properties.headers[H_ERROR_MESSAGE]
    assert len(second.body) == BODY_PREFIX_BYTES and second.properties.headers[H_ORIGINAL_SIZE] == MAX_BODY_BYTES + 1
    records = {r["message_id"]: r for r in shop.store.records}
    assert records["big-1"]["original_size"] == len(big) and len(records["big-1"]["body"]) == BODY_PREFIX_BYTES
    assert not Delivery.arrived(1, b"x" * MAX_BODY_BYTES, pika.BasicProperties()).oversize


# ---- Redis values -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, count", [(None, 0), (b"3", 3), (b"junk", 0), (b"-1", 0), (b"\xff", 0), (b"1.5", 0),
                                        (b"9" * 40, 0), ("7", 7), (7, 0), (b"\xd9\xa3", 0)])
def test_a_journal_count_is_read_totally(raw, count):
    assert count_value(raw) == count


@pytest.mark.parametrize("raw, at", [(None, None), (b"1700000000.5", 1_700_000_000.5), (b"nan", None),
                                     (b"inf", None), (b"junk", None), (b"\xff", None), (b"1" * 100, None)])
def test_a_stop_request_time_is_read_totally(raw, at):
    assert epoch_value(raw) == at


def test_garbage_in_redis_is_absent_to_the_journal_and_the_stop_flag():
    state = RedisState(redis_url(), prefix=f"test-boundary-{datetime.now(UTC).timestamp()}:")
    try:
        state.client.set(state.attempts_key + "m1", b"\xffjunk")
        state.client.set(state.attempts_key + "m2", b"2")
        assert state.attempts(["m1", "m2", "m3"]) == [0, 2, 0]
        for garbage in (b"\xff", b"nan", b"soon"):
            state.client.set(state.stop_flag, garbage)
            assert state.stop_requested(0.0) is False
        state.client.set(state.stop_flag, b"10.0")
        assert state.stop_requested(5.0) is True
    finally:
        state.client.delete(state.attempts_key + "m1", state.attempts_key + "m2", state.stop_flag)
        state.close()


# ---- generated deliveries over the whole consume path -------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.binary(max_size=20),
    st.decimals(), st.datetimes(), st.complex_numbers(), st.builds(object),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner,
                                                                max_size=3),
    max_leaves=12,
)
HEADER_NAMES = st.sampled_from(["x-retry-count", "x-published-at", "x-first-failure-at", "x-error-history",
                                "x-failure-id", "x-original-size", "x-death"]) | st.text(max_size=10) | st.binary(
    max_size=4)
HEADERS = st.dictionaries(HEADER_NAMES, VALUES, max_size=5) | VALUES
PROPERTIES = st.builds(
    pika.BasicProperties,
    message_id=st.one_of(st.binary(max_size=8), st.text(max_size=300), st.text(min_size=120, max_size=200), VALUES),
    content_type=st.one_of(st.just("application/json"), st.binary(max_size=8), VALUES),
    timestamp=st.one_of(st.integers(), VALUES),
    expiration=VALUES, priority=VALUES, correlation_id=VALUES, type=VALUES, app_id=VALUES,
    headers=HEADERS,
)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=3), max_leaves=8)
BAD_BODIES = st.one_of(
    st.binary(max_size=64),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.integers(MAX_BODY_BYTES + 1, MAX_BODY_BYTES + 2000).map(lambda n: b"{" + b" " * n),
)


@st.composite
def traffic(draw):
    """Valid events of innocent users (some sent twice, some redelivered), valid events under hostile properties
    (applied all the same), and bad bodies under hostile properties; shuffled."""
    messages = []  # (body, properties, redelivered, what): what is "good", "hostile-valid" or "bad"
    for u in range(draw(st.integers(1, 3))):
        for h in range(draw(st.integers(1, 3))):
            e = make_event(f"innocent-{u}", "product_view", f"p{1 + h % 2}", T0.replace(hour=h))
            props = pika.BasicProperties(message_id=e.message_id, content_type="application/json")
            messages.append((serialise(e), props, draw(st.booleans()), "good"))
            if draw(st.booleans()):
                messages.append((serialise(e), props, True, "copy"))
    for i in range(draw(st.integers(0, 3))):
        e = make_event(f"hostile-{i}", "product_view", "p1", T0)
        messages.append((serialise(e), draw(PROPERTIES), draw(st.booleans()), "hostile-valid"))
    for _ in range(draw(st.integers(1, 4))):
        messages.append((draw(BAD_BODIES), draw(PROPERTIES), draw(st.booleans()), "bad"))
    return draw(st.permutations(messages))


@settings(derandomize=True, database=None, max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages=traffic(), prefetch=st.integers(1, 8), window=st.booleans())
def test_property_any_delivery_fails_only_itself_and_every_valid_event_is_applied_once(messages, prefetch, window):
    config = Settings(embedding_provider="hash", embedding_dimensions=DIMS, max_retries=2, batch_enabled=window,
                      batch_window=0.01) if window else SETTINGS
    shop = Shop(config, limits=Limits(messages=len(messages)), prefetch=prefetch)
    for body, props, redelivered, _ in messages:
        send(shop, body, props, redelivered=redelivered)
    assert shop.worker.run() == 0  # never a crash: the run ends at its message limit
    assert shop.worker.limits.reason == f"message limit {len(messages)} reached"

    expected: dict[str, set[str]] = {}
    for body, _, _, what in messages:
        if what in ("good", "hostile-valid"):
            doc = json.loads(body)
            expected.setdefault(doc["user_id"], set()).add(doc["message_id"])
    for user, ids in expected.items():
        profile = shop.store.profiles[user]
        assert profile.event_count == len(ids), user  # each applied exactly once
        assert all(profile.seen(m) for m in ids), user

    bad = [m for m in messages if m[3] == "bad"]
    failed = failed_copies(shop)
    assert len(failed) == len(bad) == len(shop.store.records)  # each bad one fails, nothing else does
    assert sorted(c.body for c in failed) == sorted(
        b if len(b) <= MAX_BODY_BYTES else b[:BODY_PREFIX_BYTES] for b, *_ in bad)
    for copy in failed:
        headers = copy.properties.headers
        assert headers[H_ERROR_CLASS] == "InvalidMessage" and headers[H_ERROR_MESSAGE], headers
        assert isinstance(copy.properties.message_id, str) and isinstance(copy.properties.content_type, str)
        copy.properties.encode()  # what the real broker would be sent: pika can encode it
    assert all(isinstance(r["message_id"], str) for r in shop.store.records)
    assert not shop.broker.queues[TOPO.queue] and not any(shop.broker.queues[TOPO.retry_queue(n)] for n in (1, 2))
    assert all(isinstance(k, str) for k in shop.redis.processed)


@settings(derandomize=True, database=None, max_examples=100, deadline=None)
@given(raw=PROPERTIES)
def test_property_read_properties_is_total_and_clean(raw):
    props = read_properties(raw)
    assert props.message_id is None or isinstance(props.message_id, str)
    assert props.content_type is None or isinstance(props.content_type, str)
    assert props.timestamp is None or type(props.timestamp) is int
    assert all(isinstance(k, str) for k in props.headers)
    assert all(isinstance(r, str) for r in props.ignored)
