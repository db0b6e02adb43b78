"""The per-user batching window: sliding quiet period, cap, pressure release, order."""

from __future__ import annotations

import pytest

from myshop_ops.core.window import BatchWindow, user_of

# the core's stand-in suite runs in seconds: a change that makes the loop hang fails here in 30 s, not 300
pytestmark = pytest.mark.timeout(30)


def test_a_user_is_released_after_a_quiet_window_sliding_with_each_event():
    w = BatchWindow(window=5.0, max_held=100)
    w.hold("a", 1, now=0.0)
    w.hold("a", 2, now=4.0)  # slides the window: due at 9
    assert w.release(now=8.9) == [] and len(w) == 2
    assert w.next_due(now=8.0) == 1.0
    assert w.release(now=9.0) == [1, 2] and len(w) == 0 and w.next_due(now=9.0) is None


def test_a_user_that_never_goes_quiet_is_released_at_the_cap():
    w = BatchWindow(window=5.0, max_held=100)  # cap = 4 x window = 20 s
    for t in range(0, 20, 2):
        w.hold("busy", t, now=float(t))
        assert w.release(now=float(t)) == []
    assert w.next_due(now=19.0) == 1.0
    assert w.release(now=20.0) == list(range(0, 20, 2))


def test_users_are_independent():
    w = BatchWindow(window=1.0, max_held=100)
    w.hold("a", "a1", now=0.0)
    w.hold("b", "b1", now=0.5)
    w.hold("a", "a2", now=0.6)
    assert w.release(now=1.5) == ["b1"]
    assert w.release(now=1.6) == ["a1", "a2"]


def test_pressure_releases_the_oldest_users_first():
    w = BatchWindow(window=60.0, max_held=3)
    for i, user in enumerate("abcd"):
        w.hold(user, user, now=float(i))
    w.hold("a", "a2", now=5.0)  # a was held first: it goes first under pressure, with everything it holds
    assert w.release(now=6.0) == ["a", "a2"] and len(w) == 3
    assert w.release_all() == ["b", "c", "d"] and len(w) == 0


def test_user_of_reads_both_spellings_and_refuses_non_events():
    assert user_of(b'{"user_id": "u1"}') == "u1"
    assert user_of(b'{"userId": 42}') == "42"
    assert user_of(b'{"user_id": true}') is None
    assert user_of(b"[1]") is None and user_of(b"\xff") is None and user_of(b"{") is None
