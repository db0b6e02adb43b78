"""When a worker stops (limits.py): each limit's reason, the first reason kept, sizes as operators write them."""

from __future__ import annotations

import pytest

from myshop_ops.core.limits import Limits, parse_size

# the core's stand-in suite runs in seconds: a change that makes the loop hang fails here in 30 s, not 300
pytestmark = pytest.mark.timeout(30)


def test_no_limit_never_stops():
    limits = Limits()
    limits.count(10**6, 10**6)
    assert limits.check() is None and limits.remaining_messages() is None


def test_the_message_limit_counts_processed_messages():
    limits = Limits(messages=5)
    limits.count(3, 0)
    assert limits.check() is None and limits.remaining_messages() == 2
    limits.count(2, 0)
    assert limits.check() == "message limit 5 reached" and limits.remaining_messages() == 0


def test_the_failure_limit_counts_failed_messages():
    limits = Limits(failures=2)
    limits.count(10, 1)
    assert limits.check() is None
    limits.count(1, 1)
    assert limits.check() == "failure limit 2 reached"


def test_the_time_and_memory_limits():
    assert Limits(seconds=60, started=0.0).check() == "time limit 60s reached"
    assert Limits(seconds=60).check() is None
    assert Limits(memory_bytes=1).check().startswith("memory limit 0M reached (RSS ")
    assert Limits(memory_bytes=2**50).check() is None


def test_a_signal_stops_and_the_first_reason_is_kept():
    limits = Limits(messages=1)
    limits.signalled = 1
    assert limits.check() == "signal"
    limits.count(1, 0)
    limits.stop("stop-workers requested")
    assert limits.check() == "signal" and limits.reason == "signal"
    other = Limits()
    other.stop("stop-workers requested")
    other.stop("later")
    assert other.check() == "stop-workers requested"


@pytest.mark.parametrize(("text", "size"), [("512M", 512 * 2**20), ("1.5G", 3 * 2**29), ("800000K", 800000 * 1024),
                                            ("1024", 1024), (" 2 GiB ", 2 * 2**30), ("64mb", 64 * 2**20)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "12T", "-1M", "1,5G"])
def test_bad_sizes_say_what_a_size_is(text):
    with pytest.raises(ValueError, match="is not a size like 512M or 1G"):
        parse_size(text)
