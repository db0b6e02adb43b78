"""`make demo` on a deployed box: the demo's settings, never the machine's settings file (tools/demo.py)."""

from __future__ import annotations

import importlib.util

from myshop_ops.adapters.config import load_settings
from tests.support.services import ROOT

_spec = importlib.util.spec_from_file_location("demo", ROOT / "tools" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

DEPLOYMENT = {
    "APP_ENV": "prod",
    "RABBITMQ_DSN": "amqps://myshop:s3cret@rabbit.prod.example:5671/%2f",
    "RABBITMQ_QUEUE": "user_embedding_updates",
    "RABBITMQ_FAILED_QUEUE": "failed",
    "MONGODB_URL": "mongodb+srv://myshop:s3cret@cluster0.prod.example/",
    "MONGODB_DB": "myshop",
    "REDIS_URL": "rediss://:s3cret@redis.prod.example:6380/0",
    "REDIS_KEY_PREFIX": "myshop:",
    "EMBEDDING_PROVIDER": "openai",
    "OPENAI_API_KEY": "sk-live-deployment",
}


def test_make_demo_ignores_a_deployed_machines_settings_file(tmp_path):
    deployed = tmp_path / "etc-myshop.env"
    deployed.write_text("".join(f"{k}={v}\n" for k, v in DEPLOYMENT.items()))
    environ = {"PATH": "/usr/bin:/bin", "MYSHOP_ENV_FILE": str(deployed)}  # the box's settings file, named

    env = demo.demo_environment(environ, tmp_path / "run" / "demo.env")
    s = load_settings(env)

    assert (s.queue, s.failed_queue, s.mongodb_db, s.redis_prefix) == (
        "myshop_demo", "myshop_demo.failed", "myshop_demo", "myshop_demo:")
    assert "prod.example" not in s.rabbitmq_dsn + s.mongodb_url + s.redis_url
    assert (s.app_env, s.embedding_provider) == ("dev", "hash")
    assert env["MYSHOP_ENV_FILE"] != str(deployed)


def test_an_explicit_variable_still_wins_over_the_demos_settings(tmp_path):
    """A test (or a developer) that exports its own queue keeps it: only the settings file is replaced."""
    env = demo.demo_environment({"RABBITMQ_QUEUE": "t1.events"}, tmp_path / "demo.env")
    assert load_settings(env).queue == "t1.events"
