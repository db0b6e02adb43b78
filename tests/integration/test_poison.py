"""A message that kills the worker process ends in `failed` through the quorum delivery limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from myshop_ops.contract import make_event
from myshop_ops.store import Store
from tests.conftest import run_cli
from tests.support.events import T0, publish
from tests.support.services import ROOT, wait_for

pytestmark = pytest.mark.integration


def test_poison_message_that_kills_the_worker_ends_in_failed(env, topology, fake_openai):
    extra = {"EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": fake_openai.base_url,
             "EMBEDDING_DIMENSIONS": "1536"}
    s = env.settings(**extra)
    fake_openai.clear()
    current: dict[str, subprocess.Popen] = {}

    def kill_on_poison(body):  # stands in for a crash in native code on this input (segfault, OOM kill)
        if isinstance(body, dict) and any("poison" in str(t) for t in body.get("input", [])):
            os.kill(current["p"].pid, signal.SIGKILL)

    fake_openai.on_request = kill_on_poison
    poison = make_event("victim", "search", "poison pill", T0)
    fine = [make_event("victim", "search", f"fine phrase {i}", T0.replace(minute=i + 1)) for i in range(3)]
    publish(s, topology, [poison, *fine])
    store = Store(s.mongodb_url, s.mongodb_db)
    deaths = 0
    try:
        while deaths < 15:  # a supervisor: restart the worker like systemd would
            current["p"] = subprocess.Popen(
                [sys.executable, "-m", "myshop_ops", "consume", "--prefetch", "1", "--time-limit", "20"],
                env=env.subprocess_env(**extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            code = current["p"].wait(60)
            if code != -signal.SIGKILL:
                break
            deaths += 1
            doc = store.get_profile_doc("victim")
            if doc and doc["event_count"] == 3:
                break
    finally:
        fake_openai.on_request = None
        if current["p"].poll() is None:
            current["p"].kill()
    # The quorum queue's delivery limit (10) dead-letters the poison; the fine events are applied once.
    shown = json.loads(run_cli("failed", "show", "--json", env=env.subprocess_env(**extra)).stdout)
    # Dead-lettered by the broker, so the worker never wrote a record: `failed show` records it from the queue.
    assert shown["drift"]["recorded_from_queue"] == [poison.message_id]
    assert 10 <= deaths <= 12, deaths
    rec = store.failed.find_one({"message_id": poison.message_id})
    assert rec["error_class"] == "DeliveryLimitExceeded" and "poison pill" in rec["body"]
    run_cli("consume", "--limit", "3", "--time-limit", "20", env=env.subprocess_env(**extra))
    doc = wait_for(lambda: store.get_profile_doc("victim"), what="profile")
    assert doc["event_count"] == 3
