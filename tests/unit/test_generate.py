"""The pure parts of `generate-test-events`: the plan, event synthesis, percentiles, visibility tracking."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from bson.decimal128 import Decimal128

from myshop_ops.adapters.config import mask_url
from myshop_ops.base.contract import EVENT_TYPES, message_id, parse, serialise
from myshop_ops.tools.generate import (
    MAX_EVENTS,
    SEARCH_PHRASES,
    SPAN_S,
    NoProducts,
    Plan,
    QueueCount,
    VisibilityTracker,
    expected_sent_times,
    percentile,
    synthesize,
    wait_visible,
    where_missing,
)

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
PRODUCTS = [f"p{i}" for i in range(7)]


# ---- percentiles --------------------------------------------------------------------------------


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.5], 50) == percentile([7.5], 99) == 7.5
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # ceil(0.5 * 4) = rank 2
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == 4.0


# ---- the plan -----------------------------------------------------------------------------------


def test_plan_properties_and_description():
    plan = Plan(users=3, events_per_user=4, event_type="search", start_user_id=41)
    assert plan.total == 12
    assert plan.user_ids == ["41", "42", "43"]
    assert plan.types == ("search",) and not plan.needs_products
    assert Plan(event_type="mixed").types == EVENT_TYPES and Plan(event_type="mixed").needs_products
    assert Plan(event_type="product_view").needs_products
    assert [plan.user_index(i) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    text = plan.describe(exchange="ex", queue="q", broker=mask_url("amqp://app:s3cret@rabbit:5672/%2f"))
    assert "12 search events" in text and "3 users 41..43" in text and "'ex'" in text and "'q'" in text
    assert "app:***@rabbit" in text and "s3cret" not in text
    assert "ms apart" in Plan(delay_ms=5).describe(exchange="e", queue="q", broker="b")


def test_plan_problems():
    assert Plan().problems() == []
    assert "mixed, search" in Plan(event_type="clicks").problems()[0]
    too_many = Plan(users=MAX_EVENTS, events_per_user=2).problems()
    assert len(too_many) == 1 and f"{MAX_EVENTS:,}" in too_many[0]
    assert Plan(users=0).problems() and Plan(events_per_user=0).problems() and Plan(start_user_id=-1).problems()


# ---- synthesis ----------------------------------------------------------------------------------


def test_synthesized_events_are_valid_contract_events():
    plan = Plan(users=6, events_per_user=9, event_type="mixed", start_user_id=500_000)
    run = synthesize(plan, PRODUCTS, now=NOW, seed=12345)
    assert len(run.messages) == plan.total == 54
    per_user = defaultdict(list)
    for i, (body, mid) in enumerate(run.messages):
        event = parse(body, now=NOW)
        assert serialise(event) == body  # canonical bytes
        assert event.message_id == mid == message_id(event.user_id, event.event_type, event.reference,
                                                     event.occurred_at)
        assert event.user_id == plan.user_ids[plan.user_index(i)]  # round-robin publish order
        assert event.occurred_at <= NOW and event.occurred_at >= NOW - timedelta(seconds=SPAN_S)
        assert event.occurred_at.microsecond == 12345  # the run nonce
        if event.event_type == "search":
            assert event.search_phrase in SEARCH_PHRASES and event.product_id is None
            assert run.product_ids[i] is None
        else:
            assert event.product_id in PRODUCTS and event.search_phrase is None
            assert run.product_ids[i] == event.product_id
        per_user[event.user_id].append(event.occurred_at)
    assert len({mid for _, mid in run.messages}) == plan.total
    for times in per_user.values():  # each user's events are published in occurred_at order
        assert times == sorted(times) and len(set(times)) == len(times)
    assert set(run.by_type) == set(EVENT_TYPES) and sum(run.by_type.values()) == plan.total
    assert run.used_products() <= set(PRODUCTS)


def test_mixed_covers_every_type_from_four_events_and_single_types_stay_single():
    for seed in range(20):
        run = synthesize(Plan(users=2, events_per_user=2, event_type="mixed"), PRODUCTS, now=NOW, seed=seed)
        assert set(run.by_type) == set(EVENT_TYPES), seed
    run = synthesize(Plan(users=3, events_per_user=3, event_type="product_purchase"), PRODUCTS, now=NOW, seed=1)
    assert run.by_type == Counter({"product_purchase": 9})


def test_runs_make_new_message_ids_and_a_seed_repeats_a_run():
    plan = Plan(users=5, events_per_user=10, event_type="search")
    a = synthesize(plan, [], now=NOW)
    b = synthesize(plan, [], now=NOW)
    assert not {m for _, m in a.messages} & {m for _, m in b.messages}
    assert a.run_id != b.run_id
    assert synthesize(plan, [], now=NOW, seed=7).messages == synthesize(plan, [], now=NOW, seed=7).messages


def test_never_in_the_future_at_the_extremes():
    now = datetime.now(UTC)
    for epu in (1, 2, 10_000):
        run = synthesize(Plan(users=1, events_per_user=epu, event_type="search"), [], now=now, seed=999_999)
        last = parse(run.messages[-1][0])  # validated against the real clock too
        assert last.occurred_at < now


def test_product_events_without_products_are_refused():
    with pytest.raises(NoProducts):
        synthesize(Plan(event_type="mixed"), [], now=NOW)
    with pytest.raises(NoProducts):
        synthesize(Plan(event_type="product_click"), [], now=NOW)
    assert len(synthesize(Plan(users=2, events_per_user=2, event_type="search"), [], now=NOW).messages) == 4


# ---- --wait: visibility and latencies -----------------------------------------------------------


def _doc(user: str, count: int, at: float) -> dict:
    return {"user_id": user, "event_count": count, "updated_at": datetime.fromtimestamp(at, UTC)}


def test_expected_events_skip_failed_publishes_and_unusable_products():
    plan = Plan(users=2, events_per_user=3, event_type="mixed")
    run = synthesize(plan, ["a", "b"], now=NOW, seed=3)
    sent = [100.0 + i for i in range(plan.total)]
    expected, unusable = expected_sent_times(run, lambda i: True, sent)
    assert unusable == 0 and sum(len(t) for t in expected.values()) == 6
    assert expected[plan.user_ids[0]] == [100.0, 102.0, 104.0]  # events 0, 2, 4 (round-robin)
    expected, _ = expected_sent_times(run, lambda i: i != 2, sent)
    assert expected[plan.user_ids[0]] == [100.0, 104.0]
    n_a = sum(1 for p in run.product_ids if p == "a")
    expected, unusable = expected_sent_times(run, lambda i: True, sent, usable_products={"b"})
    assert unusable == n_a and sum(len(t) for t in expected.values()) == 6 - n_a


def test_tracker_uses_updated_at_and_subtracts_the_baseline():
    expected = {"u1": [10.0, 11.0, 12.0], "u2": [10.5]}
    t = VisibilityTracker(expected, baseline={"u1": 5})
    assert t.total == 4 and not t.done and t.pending_users() == ["u1", "u2"]
    t.observe([_doc("u1", 5, 9.0)], seen_at=13.0)  # the pre-existing profile: nothing new yet
    assert t.observed == 0
    t.observe([_doc("u1", 6, 10.2)], seen_at=13.1)
    t.observe([_doc("u1", 8, 12.4), _doc("u2", 1, 10.9), _doc("stranger", 3, 1.0)], seen_at=13.2)
    assert t.done and t.observed == 4 and t.pending_users() == []
    assert t.history["u1"] == [(5, 9.0), (6, 10.2), (8, 12.4)]
    # event 1 of u1 seen at 10.2; events 2 and 3 only at the later write (an upper bound: 12.4 - 11.0)
    lat = t.latencies_ms()
    assert lat == pytest.approx(sorted([200.0, 1400.0, 400.0, 400.0]))
    assert t.last_visible_at() == pytest.approx(12.4)


def test_tracker_clamps_negative_latencies_and_falls_back_to_the_poll_time():
    t = VisibilityTracker({"u": [10.0, 20.0]})
    t.observe([_doc("u", 1, 9.9995)], seen_at=30.0)  # the store truncates to ms
    t.observe([{"user_id": "u", "event_count": 2}], seen_at=30.0)  # no updated_at (another writer)
    assert t.latencies_ms() == [0.0, 10_000.0]


def test_tracker_takes_any_stored_user_id_and_event_count():
    """Profiles are read from MongoDB: an array holding a user id matches the ``$in``, a count may be anything."""
    t = VisibilityTracker({"u": [10.0]})
    t.observe([{"user_id": ["u", 1], "event_count": 1}, {"user_id": {"u": 1}}], seen_at=30.0)
    for count in ({"n": 1}, "x", float("inf"), Decimal128("1"), [1]):
        t.observe([{"user_id": "u", "event_count": count}], seen_at=30.0)
    assert t.observed == 0 and not t.done
    t.observe([{"user_id": "u", "event_count": 1.0}], seen_at=30.0)
    assert t.done


def test_wait_visible_completes_and_times_out():
    t0 = time.time()
    states = iter([[], [_doc("u", 1, t0 + 0.05)], [_doc("u", 2, t0 + 0.08)]])
    tracker = VisibilityTracker({"u": [t0, t0 + 0.01]})
    out = wait_visible(tracker, lambda ids: next(states), publish_end=t0 + 0.02, timeout=5, interval=0.01,
                       queue_state=lambda: (0, 1))
    assert out.completed and out.observed == out.expected == 2 and out.polls == 3
    assert out.drain_s == pytest.approx(0.06, abs=1e-5) and out.queue_ready == 0 and out.consumers == 1
    assert out.summary()["p50"] == pytest.approx(50.0, abs=0.1) and out.summary()["max"] == pytest.approx(70.0, abs=0.1)

    tracker = VisibilityTracker({"u": [t0]})
    out = wait_visible(tracker, lambda ids: [], publish_end=t0, timeout=0.1, interval=0.02)
    assert not out.completed and out.observed == 0 and out.drain_s is None and 0.1 <= out.waited_s < 2
    assert out.summary() == {"p50": None, "p95": None, "p99": None, "max": None}


def _counts(main: tuple[int, int | None, int], **ready: int) -> list[QueueCount]:
    q = "user_embedding_updates"
    out = [QueueCount(q, "main", main[0], main[1], main[2])]
    out += [QueueCount(f"{q}.retry.{i}", "retry", ready.get(f"retry{i}", 0), delay_s=d)
            for i, d in enumerate((5, 10, 20, 40, 60), start=1)]
    return [*out, QueueCount("failed", "failed", ready.get("failed", 0)),
            QueueCount(f"{q}.unrouted", "unrouted", ready.get("unrouted", 0))]


def test_where_missing_points_at_the_retry_queue_that_holds_them():
    """The give-up line of --wait once seen: 3 consumers, an empty main queue, 10 events in the fourth retry
    queue; it must say where they are and that they come back, not ask whether a worker runs."""
    line = where_missing(_counts((0, 0, 3), retry4=10))
    assert line == ("queues: 'user_embedding_updates' 0 ready, 0 unacked, 3 consumer(s); "
                    "'user_embedding_updates.retry.4' 10; every other queue empty; 10 message(s) wait in retry "
                    "queues and go back to 'user_embedding_updates' within 40 s: wait longer (--wait-timeout)")


def test_where_missing_says_what_to_do_for_each_place():
    assert where_missing(_counts((7, None, 0))).endswith("no worker consumes 'user_embedding_updates': start "
                                                         "`myshop consume`")
    busy = where_missing(_counts((120, 200, 3), failed=2, unrouted=1))
    assert "120 ready, 200 unacked, 3 consumer(s)" in busy and "'failed' 2; 'user_embedding_updates.unrouted' 1" in busy
    assert busy.endswith("the workers have 320 message(s) left: wait longer (--wait-timeout) or add workers; 2 in the "
                         "failed queue: `myshop failed show`; 1 matched no binding: `myshop unrouted show`")
    assert where_missing(_counts((0, 0, 2))).endswith("every other queue empty; no queue holds a message: see the "
                                                      "workers' logs for skipped events, and `myshop failed show`")
    unreadable = [QueueCount("q", "main", None), QueueCount("q.retry.1", "retry", None, delay_s=5)]
    assert where_missing(unreadable).startswith("queues: 'q' ? ready; every other queue empty")
