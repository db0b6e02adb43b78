"""Worker logs: JSON lines by default, with the fields an operator greps for; one line per batch at debug."""

from __future__ import annotations

import json

import pytest

from myshop_ops.base.contract import make_event
from tests.support.events import T0, publish
from tests.support.workers import Workers

pytestmark = pytest.mark.integration


def test_json_log_lines_carry_ids_type_retry_count_and_duration(env, topology, fake_openai, tmp_path):
    fake_openai.clear()
    env.update(EMBEDDING_PROVIDER="openai", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake_openai.base_url,
               EMBEDDING_DIMENSIONS="1536", LOG_FORMAT="json", LOG_LEVEL="debug")
    user = f"{env['MONGODB_DB']}-log"
    event = make_event(user, "search", "trail running shoes", T0)
    fake_openai.fail_next(500, times=3)  # the SDK retries twice itself; then the event is retried once (queue)
    publish(env.settings(), topology, [event, b"{broken"], message_ids=False)
    workers = Workers(tmp_path)
    try:
        w = workers.start(env.subprocess_env(), "--limit", "3", "--time-limit", "60")
        assert w.wait(60) == 0, w.describe()
    finally:
        workers.cleanup()
    lines = [json.loads(line) for line in w.stderr.splitlines() if line.strip()]  # every line is JSON
    assert w.stdout == ""  # no plain summary among JSON logs (supervisor and docker merge both streams)
    stopped = next(x for x in lines if x["msg"] == "worker stopped")
    assert stopped["applied"] == 1 and stopped["reason"] == "message limit 3 reached"
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    retried = next(x for x in lines if x["msg"] == "message retried later")
    assert (retried["message_id"], retried["user_id"], retried["event_type"], retried["retry_count"]) == (
        event.message_id, user, "search", 1)
    assert retried["error_class"] == "EmbeddingError" and retried["level"] == "warning"
    failed = next(x for x in lines if x["msg"] == "message failed")
    assert failed["error_class"] == "InvalidMessage" and failed["retry_count"] == 0 and failed["user_id"] is None
    batches = [x for x in lines if x["msg"] == "batch settled"]
    assert batches and all(x["duration_ms"] >= 0 and x["size"] >= 1 for x in batches)
    assert sum(x.get("applied", 0) for x in batches) == 1
    assert "trail running shoes" not in w.stderr
