"""lru.Recent: the bounded LRU (optionally with a time to live) behind the profile, product and phrase caches."""

from __future__ import annotations

from myshop_ops.base.lru import Recent


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_hits_and_misses_keep_the_order_asked():
    r = Recent(10)
    r.put({"a": 1, "b": 2})
    assert r.take(["b", "x", "a", "y"]) == ({"b": 2, "a": 1}, ["x", "y"])


def test_the_least_recently_used_goes_first():
    r = Recent(2)
    r.put({"a": 1, "b": 2})
    r.take(["a"])  # a is now the most recent
    r.put({"c": 3})
    assert r.take(["a", "b", "c"]) == ({"a": 1, "c": 3}, ["b"])
    r.put({"a": 10})  # a new value refreshes it
    r.put({"d": 4})
    assert r.take(["a", "c", "d"]) == ({"a": 10, "d": 4}, ["c"])


def test_dropped_keys_are_misses():
    r = Recent(5)
    r.put({"a": 1, "b": 2})
    r.drop(["a", "zzz"])
    assert r.take(["a", "b"]) == ({"b": 2}, ["a"])


def test_values_older_than_the_ttl_are_misses_until_put_again():
    clock = Clock()
    r = Recent(5, ttl=60, clock=clock)
    r.put({"a": 1})
    clock.now += 30
    r.put({"b": 2})
    clock.now += 30  # a is 60 s old: still fresh
    assert r.take(["a", "b"]) == ({"a": 1, "b": 2}, [])
    clock.now += 0.5
    assert r.take(["a", "b"]) == ({"b": 2}, ["a"])
    r.put({"a": 3})
    assert r.take(["a"]) == ({"a": 3}, [])


def test_without_ttl_values_never_expire():
    clock = Clock()
    r = Recent(5, clock=clock)
    r.put({"a": 1})
    clock.now += 10**9
    assert r.take(["a"]) == ({"a": 1}, [])
