"""The consume path's boundary: a delivery's properties and headers of any type, bodies of any size and Redis values of
any form are parsed once (myshop_ops/base/values.py) where they enter; a bad one fails only itself, with a reason.
Against the core's in-memory stand-ins (tests/support/stubs.py), in seconds; the issue's own attack against the real
broker is tests/reliability/test_delivery_boundary.py."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
import pika
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.embeddings import PhraseEmbedder, normalise_phrase
from myshop_ops.base.contract import MAX_BODY_BYTES, Event, make_event, serialise
from myshop_ops.base.values import Properties, count_value, epoch_value, read_properties
from myshop_ops.core.limits import Limits
from myshop_ops.core.retry_routing import H_ERROR_CLASS, H_ERROR_MESSAGE, H_FAILURE_ID, H_IGNORED, H_ORIGINAL_SIZE
from myshop_ops.core.worker import BODY_PREFIX_BYTES, Delivery, Worker
from tests.support.generated import (
    BAD_BODIES,
    BAD_REPLIES,
    GOOD_REPLIES,
    PROPERTIES,
    REFUSED_INPUT,
    TRANSIENT_REPLIES,
)
from tests.support.services import redis_url
from tests.support.stubs import Message, StubBroker, StubNotifier, StubProvider, StubRedis, StubStore
from tests.unit.test_core_worker import DIMS, SETTINGS, T0, TOPO, Shop, unit

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


@pytest.mark.services  # real Redis
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


# ---- generated deliveries under generated provider replies, over the whole consume path ---------------------------

# One phrase per kind of provider reply, named after it ("nan", "429", "input refused", ...: as sent to the provider,
# normalised); "red shoes" and "green tea" get the hash vector, "!!!" has no words.
REPLIES = {**GOOD_REPLIES, **BAD_REPLIES, **REFUSED_INPUT, **TRANSIENT_REPLIES}
PHRASES = {**dict.fromkeys([*GOOD_REPLIES, "red shoes", "green tea"], "fine"),
           **dict.fromkeys([*BAD_REPLIES, *REFUSED_INPUT, "!!!"], "permanent"),
           **dict.fromkeys(TRANSIENT_REPLIES, "transient")}
PRODUCTS = {"p1": "fine", "p2": "fine", "p404": "skipped", "p9": "permanent"}  # p9: a vector of another model
SPELLINGS = st.sampled_from([str, str.upper, lambda p: f" {p.replace(' ', '  ')} "])  # one phrase, as typed


@dataclass(frozen=True)
class Sent:
    """One delivery, and what must become of it: ``fate`` is fine (applied once: for a transient phrase, once the
    provider is back), permanent (fails, with a reason), skipped (no product vector: acked), bad (an invalid
    message: fails alone)."""

    body: bytes
    properties: pika.BasicProperties
    redelivered: bool
    event: Event | None
    fate: str

    def __repr__(self) -> str:  # a falsifying example, readable
        e = self.event
        what = (f"{e.event_type} {e.search_phrase or e.product_id!r} of {e.user_id}" if e
                else f"{len(self.body)}-byte body {self.body[:24]!r}")
        return f"<{what}: {self.fate}{', redelivered' if self.redelivered else ''}>"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints a falsifying example with this
        printer.text(repr(self))

    @property
    def kept(self) -> bytes:
        return self.body if len(self.body) <= MAX_BODY_BYTES else self.body[:BODY_PREFIX_BYTES]

    @property
    def error_class(self) -> str:
        if self.event is None:
            return "InvalidMessage"
        return "InputRefused" if self.event.search_phrase is not None else "VectorSpaceMismatch"


@st.composite
def traffic_under_replies(draw):
    """Searches of about half the phrases above (each spelled in one of several ways) and product events, by innocent
    users (some sent twice, some redelivered), valid product events under hostile properties, and bad bodies under
    hostile properties, shuffled."""
    events = []  # (event type, phrase or product, fate)
    for phrase, fate in PHRASES.items():
        for _ in range(draw(st.integers(0, 1))):
            events.append(("search", draw(SPELLINGS)(phrase), fate))
    for product, fate in PRODUCTS.items():
        for _ in range(draw(st.integers(0, 2))):
            events.append((draw(st.sampled_from(["product_view", "product_purchase"])), product, fate))
    sent = []
    for minute, (kind, ref, fate) in enumerate(events):
        e = make_event(f"innocent-{draw(st.integers(0, 2))}", kind, ref, T0 + timedelta(minutes=minute))
        props = pika.BasicProperties(message_id=e.message_id, content_type="application/json")
        sent += [Sent(serialise(e), props, redelivered, e, fate)
                 for redelivered in [draw(st.booleans())] + ([True] if draw(st.booleans()) else [])]
    for i in range(draw(st.integers(0, 2))):
        e = make_event(f"hostile-{i}", "product_view", "p1", T0)
        sent.append(Sent(serialise(e), draw(PROPERTIES), draw(st.booleans()), e, "fine"))
    for _ in range(draw(st.integers(1, 3))):
        sent.append(Sent(draw(BAD_BODIES), draw(PROPERTIES), draw(st.booleans()), None, "bad"))
    return draw(st.permutations(sent))


class ConsumePath:
    """What `myshop consume` runs on, as stand-ins: the phrase cache in (stub) Redis behind the embedder's LRU. Each
    ``consume`` is one worker run until its message limit, on the same embedder (one process)."""

    def __init__(self, settings: Settings, prefetch: int):
        self.settings, self.prefetch = settings, prefetch
        self.broker = StubBroker(bindings={TOPO.failed_exchange: TOPO.failed_queue})
        self.broker.declare(TOPO.queue, TOPO.failed_queue, *(TOPO.retry_queue(n) for n in (1, 2)))
        self.store = StubStore({"p1": unit(1), "p2": unit(2)})
        self.store.foreign["p9"] = "a vector of model other-model"
        self.redis = StubRedis()
        self.provider = StubProvider(DIMS, settings.model)
        self.phrases = PhraseEmbedder(self.provider, self.redis, ttl=60)

    def consume(self, messages: int) -> None:
        worker = Worker(self.settings, limits=Limits(messages=messages), prefetch=self.prefetch, store=self.store,
                        redis=self.redis, phrases=self.phrases, notifier=StubNotifier(), connect=self.broker.connect)
        assert worker.run() == 0  # never a crash: the run ends at its message limit
        assert worker.limits.reason == f"message limit {messages} reached"

    def copies(self, *queues: str) -> list[Message]:
        return [m for q in queues for m in self.broker.queues[q]]

    def requeue_retries(self) -> int:
        """What the delay queues do when their time is up: each retry copy back to the main queue."""
        retries = self.copies(*(TOPO.retry_queue(n) for n in (1, 2)))
        for n in (1, 2):
            self.broker.queues[TOPO.retry_queue(n)].clear()
        self.broker.queues[TOPO.queue].extend(Message(m.body, m.properties) for m in retries)
        return len(retries)

    def assert_only_usable_vectors_cached(self, refused: set[str]) -> None:
        """Every vector in the LRU and in Redis is a finite unit vector of the right size; no refused phrase's key."""
        lru = {k: v for k, (v, _) in self.phrases._lru._items.items()}
        shared = {k: np.frombuffer(raw, "<f4") for k, raw in self.redis.vectors.items()}
        for key, vec in [*lru.items(), *shared.items()]:
            assert vec.shape == (DIMS,) and np.isfinite(vec).all() and abs(np.linalg.norm(vec) - 1) < 1e-3, (key, vec)
        cached_refused = {self.phrases.key(p) for p in refused} & (lru.keys() | shared.keys())
        assert not cached_refused, [p for p in refused if self.phrases.key(p) in cached_refused]


def assert_copies_are_encodable(copies: list[Message]) -> None:
    for copy in copies:
        assert isinstance(copy.properties.message_id, str) and isinstance(copy.properties.content_type, str)
        copy.properties.encode()  # what the real broker would be sent: pika can encode it


@settings(derandomize=True, database=None, max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
          phases=[p for p in Phase if p != Phase.explain])  # explaining a failure took ~55 s of redrawn deliveries
@given(sent=traffic_under_replies(), prefetch=st.integers(1, 8), window=st.booleans())
def test_property_any_delivery_under_any_provider_reply_fails_only_itself_and_nothing_bad_is_cached(
        sent, prefetch, window):
    """Hostile deliveries among valid events of innocent users (searches and product events, duplicates,
    redeliveries) through a Worker, while the provider answers per phrase with a good vector, NaN, Inf, 1e30, zero,
    a wrong size, a refusal of that input, a whole-request 400 to split, or a 429/503/timeout; then the retry copies
    come back once the provider recovered. The worker never exits; each innocent event whose phrase or product is
    fine is applied exactly once (a transient one after its retry); each bad message, refused phrase or foreign
    product fails alone with its reason; a transient failure retries only the searches of its request; no refused
    vector is cached, in the LRU or in Redis."""
    config = Settings(embedding_provider="hash", embedding_dimensions=DIMS, max_retries=2, batch_enabled=True,
                      batch_window=0.01) if window else SETTINGS
    path = ConsumePath(config, prefetch)
    for phrase, reply in REPLIES.items():
        path.provider.replies[phrase] = reply(path.provider.embed_one(phrase))
    for s in sent:
        path.broker.publish(TOPO.queue, s.body, properties=s.properties, redelivered=s.redelivered)
    refused = {p for p, fate in PHRASES.items() if fate == "permanent"}
    transient = {p for p, fate in PHRASES.items() if fate == "transient"}
    by_body = {s.kept: s for s in sent}

    path.consume(len(sent))
    # a transient failure is its request's (not split): it retries the searches of that request, and only those
    exposed = {t for call in path.provider.calls if transient & set(call) for t in call}
    retries = path.copies(*(TOPO.retry_queue(n) for n in (1, 2)))
    for copy in retries:
        s = by_body[copy.body]
        assert s.event is not None and s.event.search_phrase is not None, (s.fate, copy.properties.headers)
        assert normalise_phrase(s.event.search_phrase) in exposed, (s.event.search_phrase, exposed)
    retried = {c.body for c in retries}
    assert all(s.body in retried for s in sent if s.event and s.event.search_phrase
               and normalise_phrase(s.event.search_phrase) in transient)
    path.assert_only_usable_vectors_cached(refused | transient)

    for phrase in transient:  # the provider is back; the retry copies come back from their delay queue
        del path.provider.replies[phrase]
    if requeued := path.requeue_retries():
        path.consume(requeued)
    assert not path.copies(TOPO.queue, *(TOPO.retry_queue(n) for n in (1, 2)))
    path.assert_only_usable_vectors_cached(refused)

    failed = path.copies(TOPO.failed_queue)
    for copy in failed:  # each a bad message or an event whose phrase or product is refused, with the reason
        s, headers = by_body[copy.body], copy.properties.headers
        assert s.fate in ("bad", "permanent"), (s.fate, s.event, headers)
        assert headers[H_ERROR_CLASS] == s.error_class and headers[H_ERROR_MESSAGE], headers
    assert_copies_are_encodable(failed + retries)
    assert sorted(r["failure_id"] for r in path.store.records) == sorted(c.properties.headers[H_FAILURE_ID]
                                                                        for c in failed)
    assert all(isinstance(r["message_id"], str) for r in path.store.records)
    failures = Counter(c.body for c in failed)
    assert Counter(s.kept for s in sent if s.fate == "bad") == {b: n for b, n in failures.items()
                                                               if by_body[b].fate == "bad"}
    deliveries = Counter(s.body for s in sent)
    assert all(1 <= failures[s.body] <= deliveries[s.body] for s in sent if s.fate == "permanent")

    expected: dict[str, set[str]] = defaultdict(set)  # applied exactly once, in each innocent user's profile
    for s in sent:
        if s.event and s.fate in ("fine", "transient"):
            expected[s.event.user_id].add(s.event.message_id)
    assert sorted(path.store.profiles) == sorted(expected)
    for user, ids in expected.items():
        profile = path.store.profiles[user]
        assert profile.event_count == len(ids) and all(profile.seen(m) for m in ids), user
        assert np.isfinite(profile.profile.magnitude) and profile.profile.magnitude < 100, user
    assert not any(path.store.profiles[s.event.user_id].seen(s.event.message_id) for s in sent
                   if s.fate in ("permanent", "skipped") and s.event.user_id in path.store.profiles)
    assert all(isinstance(k, str) for k in path.redis.processed)


@settings(derandomize=True, database=None, max_examples=100, deadline=None)
@given(raw=PROPERTIES)
def test_property_read_properties_is_total_and_clean(raw):
    props = read_properties(raw)
    assert props.message_id is None or isinstance(props.message_id, str)
    assert props.content_type is None or isinstance(props.content_type, str)
    assert props.timestamp is None or type(props.timestamp) is int
    assert all(isinstance(k, str) for k in props.headers)
    assert all(isinstance(r, str) for r in props.ignored)
