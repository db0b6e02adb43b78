"""Security: no secret (API key, broker password) in any log line, error message, --json output or failed
header; search phrases never in logs; the worker refuses to run as root unless allowed explicitly."""

from __future__ import annotations

import json
import os
import uuid

import pika
import pytest

from myshop_ops.base.contract import make_event
from myshop_ops.core.retry_routing import H_ERROR_MESSAGE
from tests.support.events import T0, publish
from tests.support.services import RABBIT, run_cli
from tests.support.workers import prepare, private_vhost, rabbitmqctl, wait_queue

pytestmark = pytest.mark.integration

API_KEY = "sk-live-" + uuid.uuid4().hex  # what a real key looks like; the fake server refuses it (401)
BROKER_PASSWORD = "pw-" + uuid.uuid4().hex
PHRASE = "confidential phrase " + uuid.uuid4().hex[:8]


@pytest.fixture
def secret_broker():
    """A private vhost reachable only by a user whose password is a secret; yields (DSN, management URL)."""
    user = "sec-" + uuid.uuid4().hex[:8]
    with private_vhost(RABBIT) as (vhost, dsn):
        rabbitmqctl("add_user", user, BROKER_PASSWORD)
        try:
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            rabbitmqctl("set_user_tags", user, "monitoring", "policymaker")  # setup-transports sets policies
            host_and_vhost = dsn.split("@", 1)[1]
            yield (f"amqp://{user}:{BROKER_PASSWORD}@{host_and_vhost}",
                   f"http://{user}:{BROKER_PASSWORD}@127.0.0.1:15672")
        finally:
            rabbitmqctl("delete_user", user)


def test_no_secret_or_phrase_leaks_anywhere(env, fake_openai, secret_broker, workers):
    dsn, mgmt = secret_broker
    fake_openai.clear()
    env.update(RABBITMQ_DSN=dsn, RABBITMQ_MANAGEMENT_URL=mgmt, EMBEDDING_PROVIDER="openai", OPENAI_API_KEY=API_KEY,
               OPENAI_BASE_URL=fake_openai.base_url, EMBEDDING_DIMENSIONS="1536", LOG_FORMAT="json")
    s = env.settings()
    topo = prepare(s)
    event = make_event(f"{env['MONGODB_DB']}-sec", "search", PHRASE, T0)
    publish(s, topo, [event])
    outputs: list[str] = []
    w = workers.start(env.subprocess_env(), "--limit", "1", "--time-limit", "60")
    assert w.wait(60) == 0, w.describe()
    outputs += [w.stdout, w.stderr]
    wait_queue(s, topo.failed_queue, messages=1)  # the provider refused the key: unrecoverable, failed at once
    for args in (("failed", "show", "--json"), ("failed", "show", event.message_id), ("stats", "--json"),
                 ("preflight", "--json"), ("consume", "--limit", "1", "--time-limit", "5", "no.such.queue")):
        done = run_cli(*args, env=env.subprocess_env())
        outputs += [done.stdout, done.stderr]
    down = {"RABBITMQ_DSN": dsn.replace("127.0.0.1:5672", "127.0.0.1:1")}
    for args in (("stats",), ("consume", "--limit", "1"), ("failed", "show"), ("purge", "x", "--force")):
        done = run_cli(*args, env=env.subprocess_env(**down))
        assert done.returncode == 3, done.stderr
        outputs += [done.stdout, done.stderr]
    conn = pika.BlockingConnection(pika.URLParameters(dsn))
    _, props, _ = conn.channel().basic_get(topo.failed_queue, auto_ack=False)
    conn.close()
    outputs.append(json.dumps({k: str(v) for k, v in props.headers.items()}))
    assert "Incorrect API key" in props.headers[H_ERROR_MESSAGE]  # the reason is kept, the key is not
    everything = "\n".join(outputs)
    assert API_KEY not in everything and API_KEY[-12:] not in everything
    assert BROKER_PASSWORD not in everything
    assert PHRASE not in w.stderr  # logs carry ids, never what a shopper searched for
    assert "***" in everything  # passwords are shown masked, not dropped silently


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal only applies when running as root")
def test_worker_refuses_to_run_as_root_unless_allowed(env, topology):
    without = {k: v for k, v in env.subprocess_env().items() if k != "MYSHOP_ALLOW_ROOT"}
    refused = run_cli("consume", "--limit", "1", "--time-limit", "5", env=without)
    assert refused.returncode == 2 and "refusing to consume as root" in refused.stderr
    assert "--allow-root" in refused.stderr and refused.stderr.count("\n") == 1
    allowed = run_cli("consume", "--allow-root", "--time-limit", "1", env=without)
    assert allowed.returncode == 0, allowed.stderr
