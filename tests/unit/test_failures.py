"""A dependency failure as one readable line (adapters/failures.py): what, where (masked), why, what to do; and
preflight showing the checks that cannot run as SKIP instead of dropping them."""

from __future__ import annotations

import pika.exceptions
import pymongo
import pytest
import redis
from pymongo.errors import PyMongoError

from myshop_ops.adapters.config import load_settings
from myshop_ops.adapters.failures import MAX_REASON, explain, one_line
from myshop_ops.tools import preflight
from tests.support.services import ROOT

DEAD_MONGO = "mongodb://myshop:s3cret@127.0.0.1:1/"
SETTINGS = load_settings({"APP_ENV": "test", "MONGODB_URL": DEAD_MONGO, "REDIS_URL": "redis://:s3cret@127.0.0.1:1/0",
                          "RABBITMQ_DSN": "amqp://myshop:s3cret@127.0.0.1:1/%2f", "EMBEDDING_PROVIDER": "hash"}, None)


def mongo_timeout() -> PyMongoError:
    client = pymongo.MongoClient(DEAD_MONGO, serverSelectionTimeoutMS=200, connectTimeoutMS=200)
    try:
        client.admin.command("ping")
    except PyMongoError as exc:
        return exc
    finally:
        client.close()
    raise AssertionError("port 1 answered")


def test_a_mongodb_server_selection_timeout_is_one_line_without_the_topology_dump():
    exc = mongo_timeout()
    assert "Topology Description" in str(exc)  # what pymongo says: the dump the operator saw cut mid-way
    line = one_line(exc, SETTINGS)
    assert "\n" not in line and "Topology" not in line and "<" not in line, line
    assert line.startswith("MongoDB at mongodb://myshop:***@127.0.0.1:1/ failed: ServerSelectionTimeoutError: "), line
    assert "Connection refused" in line and "check MONGODB_URL" in line
    assert "s3cret" not in line
    assert line.count("(") == line.count(")")


def test_redis_pika_and_file_errors_name_the_service_and_what_to_do():
    try:
        redis.Redis.from_url("redis://:s3cret@127.0.0.1:1/0", socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        line = one_line(exc, SETTINGS)
    assert line.startswith("Redis at redis://:***@127.0.0.1:1/0 failed: ConnectionError: ") and "REDIS_URL" in line
    line = one_line(pika.exceptions.AMQPConnectionError("connection refused"), SETTINGS)
    assert line.startswith("RabbitMQ at amqp://myshop:***@127.0.0.1:1/%2f failed: AMQPConnectionError: ")
    assert "RABBITMQ_DSN" in line and "s3cret" not in line
    line = one_line(FileNotFoundError(2, "No such file or directory", "/etc/myshop/myshop.env"))
    assert line.startswith("a file at /etc/myshop/myshop.env failed: FileNotFoundError: ")
    assert explain(ValueError("not a dependency")) is None


def test_a_long_multi_line_reason_is_cut_to_one_line():
    exc = PyMongoError("first line\n" + "x" * 1000)
    reason = explain(exc, SETTINGS).reason
    assert "\n" not in reason and len(reason) <= MAX_REASON + len("PyMongoError: ")


@pytest.mark.timeout(60)
def test_preflight_with_mongodb_unreachable_shows_its_dependent_checks_as_skipped():
    checks = {(c.section, c.name): c for c in preflight.run(
        {"APP_ENV": "test", "MONGODB_URL": DEAD_MONGO, "REDIS_URL": "redis://127.0.0.1:1/0",
         "RABBITMQ_DSN": "amqp://guest:guest@127.0.0.1:1/%2f", "EMBEDDING_PROVIDER": "hash",
         "MYSHOP_ALLOW_ROOT": "1"}, env_file=None, offline=True)}
    mongo = checks[("mongodb", "reachable")]
    assert mongo.status == "FAIL" and "Topology" not in mongo.detail and "\n" not in mongo.detail, mongo
    assert "ServerSelectionTimeoutError" in mongo.detail and "s3cret" not in mongo.detail
    for name in (("mongodb", "indexes"), ("mongodb", "product vectors"), ("data", "profiles"),
                 ("data", "untagged products")):
        assert checks[name].status == "SKIP" and "mongodb reachable failed" in checks[name].detail, checks.get(name)
    assert checks[("redis", "eviction")].status == "SKIP"
    assert checks[("rabbitmq", "reachable")].status == "FAIL"
    assert {checks[("rabbitmq", n)].status for n in preflight.RABBITMQ_CHECKS} == {"SKIP"}


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_reach_mongodb_says_so_in_one_json_line(tmp_path):
    """Under supervisor or systemd the worker's stderr is JSON lines: its start-up failure is one of them."""
    import json
    import os
    import subprocess
    import sys

    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "APP_ENV": "test", "MONGODB_URL": DEAD_MONGO,
           "MONGODB_DB": "t_dead", "EMBEDDING_PROVIDER": "hash", "MYSHOP_ALLOW_ROOT": "1", "LOG_FORMAT": "json",
           "MYSHOP_ENV_FILE": str(tmp_path / "none.env"), "PYTHONPATH": str(ROOT)}
    (tmp_path / "none.env").write_text("")
    done = subprocess.run([sys.executable, "-m", "myshop_ops", "consume"], env=env, capture_output=True, text=True,
                          timeout=60, cwd="/tmp")
    assert done.returncode == 3, done
    records = [json.loads(line) for line in done.stderr.splitlines()]  # every line parses: no plain text among them
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1 and "Topology" not in errors[0]["msg"], records
    assert errors[0]["msg"].startswith("cannot start: MongoDB at mongodb://myshop:***@127.0.0.1:1/ failed: ")
