"""A message that kills the worker process (segfault, OOM kill, kill -9) ends in `failed` instead of looping.

First line of defence: attempts at redelivered messages are counted in Redis; a redelivered message whose batch
died again is processed alone, and after two solo deaths the next worker routes it to `failed` as a
PoisonMessage, so its batch neighbours are applied after a redelivery or two. Backstop (Redis down): the
quorum queue's delivery limit dead-letters it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import make_event
from tests.support.events import T0, publish
from tests.support.services import ROOT, run_cli

pytestmark = pytest.mark.integration


def supervise(env, extra, fake_openai, done, *args: str, max_deaths: int = 15) -> int:
    """Run `myshop consume ARGS` like systemd would (restart after each death) until ``done()``; the fake
    provider SIGKILLs the worker whenever a request carries the word "poison". Returns the number of deaths."""
    current: dict[str, subprocess.Popen] = {}

    def kill_on_poison(body):  # stands in for a crash in native code on this input
        if isinstance(body, dict) and any("poison" in str(t) for t in body.get("input", [])):
            os.kill(current["p"].pid, signal.SIGKILL)

    fake_openai.on_request = kill_on_poison
    deaths = 0
    try:
        while deaths < max_deaths:
            current["p"] = p = subprocess.Popen(
                [sys.executable, "-m", "myshop_ops", "consume", "--time-limit", "60", *args],
                env=env.subprocess_env(**extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while p.poll() is None and not done() and time.monotonic() < deadline:
                time.sleep(0.1)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                assert p.wait(20) == 0
                return deaths
            assert p.returncode == -signal.SIGKILL, p.returncode
            deaths += 1
        return deaths
    finally:
        fake_openai.on_request = None
        if current["p"].poll() is None:
            current["p"].kill()


def openai_extra(fake_openai) -> dict[str, str]:
    fake_openai.clear()
    return {"EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": fake_openai.base_url,
            "EMBEDDING_DIMENSIONS": "1536"}


@pytest.mark.reliability  # `make soak` runs the reliability tests
@pytest.mark.skipif(os.environ.get("SOAK", "") != "1",
                    reason="4 worker deaths (~50 s): `make soak` runs it; a stand-in test of make check, the journal")
def test_poison_goes_to_failed_after_two_solo_deaths_and_its_batch_neighbours_are_applied(env, topology,
                                                                                           fake_openai):
    extra = openai_extra(fake_openai)
    s = env.settings(**extra)
    user = f"{env['MONGODB_DB']}-victim"
    fine = [make_event(user, "search", f"{user} fine phrase {i}", T0.replace(minute=i + 1)) for i in range(10)]
    poison = make_event(user, "search", f"{user} poison pill", T0)
    publish(s, topology, [*fine[:3], poison, *fine[3:]])
    store = Store(s.mongodb_url, s.mongodb_db)

    def done() -> bool:
        doc = store.get_profile_doc(user)
        return bool(doc and doc["event_count"] == 10 and store.failed.count_documents({}) == 1)

    deaths = supervise(env, extra, fake_openai, done, "--prefetch", "20")
    # deaths 1 and 2: the batch, fresh then redelivered; deaths 3 and 4: the poison alone; the 5th worker fails
    # it without running it
    assert deaths == 4
    rec = store.failed.find_one({"message_id": poison.message_id})
    assert rec["error_class"] == "PoisonMessage" and "2 workers died" in rec["error_message"]
    shown = json.loads(run_cli("failed", "show", "--json", env=env.subprocess_env(**extra)).stdout)
    assert [(m["message_id"], m["error_class"]) for m in shown["messages"]] == [(poison.message_id, "PoisonMessage")]
    assert shown["drift"] == {"recorded_from_queue": [], "orphan_records": []}
    assert store.get_profile_doc(user)["event_count"] == 10  # every neighbour applied exactly once


@pytest.mark.reliability
@pytest.mark.skipif(os.environ.get("SOAK", "") != "1", reason="10+ worker deaths (~50 s): `make soak` runs it")
def test_delivery_limit_is_the_backstop_when_redis_is_down(env, topology, fake_openai):
    extra = {**openai_extra(fake_openai), "REDIS_URL": "redis://127.0.0.1:1/0"}  # nothing listens there
    s = env.settings(**extra)
    user = f"{env['MONGODB_DB']}-victim"
    poison = make_event(user, "search", f"{user} poison pill", T0)
    fine = [make_event(user, "search", f"{user} fine phrase {i}", T0.replace(minute=i + 1)) for i in range(3)]
    publish(s, topology, [poison, *fine])
    store = Store(s.mongodb_url, s.mongodb_db)

    def done() -> bool:
        doc = store.get_profile_doc(user)
        return bool(doc and doc["event_count"] == 3)

    deaths = supervise(env, extra, fake_openai, done, "--prefetch", "1")
    # The quorum queue's delivery limit (10) dead-letters the poison; the fine events are applied once.
    assert 10 <= deaths <= 12, deaths
    shown = json.loads(run_cli("failed", "show", "--json", env=env.subprocess_env(**extra)).stdout)
    # Dead-lettered by the broker, so the worker never wrote a record: `failed show` records it from the queue.
    assert shown["drift"]["recorded_from_queue"] == [poison.message_id]
    rec = store.failed.find_one({"message_id": poison.message_id})
    assert rec["error_class"] == "DeliveryLimitExceeded" and "poison pill" in rec["body"]
    assert store.get_profile_doc(user)["event_count"] == 3
