"""Text from outside systems never carries a configured secret out: a provider answering 401 with the API key in
its message (in full, as a hostile or careless server may, or in OpenAI's partial form) through the real openai SDK
against tests/support/fake_openai.py. The key appears in no output of `products import`, `verify`, the worker's
log, the failed_messages record or the failed copy's headers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pymongo import MongoClient

from myshop_ops.adapters.config import load_settings, redact
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.core.retry_routing import H_ERROR_MESSAGE, H_HISTORY
from tests.support.events import T0, publish
from tests.support.fake_openai import FakeOpenAI
from tests.support.services import run_cli, wait_for
from tests.support.workers import failed_messages

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

KEY = "sk-proj-Wr0ngKeyHygieneTest0123456789abcdQz7V"
MASKED = "***Qz7V"  # how the key shows (its last four characters tell which key it was)


@pytest.fixture(params=["full", "partial"])
def provider(request):
    with FakeOpenAI(api_key="the-right-key") as server:
        server.quote_key = request.param
        yield server


def with_provider(env, provider: FakeOpenAI, **more: str) -> dict[str, str]:
    return env.subprocess_env(EMBEDDING_PROVIDER="openai", OPENAI_API_KEY=KEY, OPENAI_BASE_URL=provider.base_url,
                              **more)


def assert_masked(text: str, what: str) -> None:
    assert KEY[:8] not in text and KEY[-16:] not in text, f"{what} shows the key (or its partial form):\n{text}"
    assert "Incorrect API key provided" not in text or MASKED in text, f"{what}: the provider's words are gone:\n{text}"


def test_a_401_quoting_the_key_shows_it_nowhere(env, topology, provider, tmp_path):
    # products import: the catalog's embedding call is refused
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(json.dumps({"product_id": "HYG-1", "name": "Hygiene headphones", "category": "audio"}) + "\n")
    done = run_cli("products", "import", str(catalog), env=with_provider(env, provider))
    assert_masked(done.stdout + done.stderr, "products import")
    assert "Incorrect API key provided" in done.stdout + done.stderr, done.stdout + done.stderr

    # the worker: a search event fails permanently (401); its log, the record and the failed copy
    user = f"{env['MONGODB_DB']}-u1"
    publish(env.settings(), topology, [make_event(user, "search", "hygiene phrase one", T0)])
    sub = with_provider(env, provider, LOG_FORMAT="json")
    done = run_cli("consume", "--limit", "1", "--time-limit", "60", env=sub)
    assert_masked(done.stdout + done.stderr, "the worker's log")
    s = env.settings()
    client = MongoClient(s.mongodb_url)
    try:
        records = wait_for(lambda: list(client[s.mongodb_db].failed_messages.find({}, {"_id": 0})), timeout=30,
                           what="the failed_messages record")
    finally:
        client.close()
    assert len(records) == 1 and "Incorrect API key provided" in records[0]["error_message"], records
    assert_masked(json.dumps(records, default=str), "the failed_messages record")
    copies = failed_messages(s, topology)
    assert len(copies) == 1
    headers = copies[0][0].headers
    assert MASKED in headers[H_ERROR_MESSAGE]
    assert_masked(json.dumps(headers, default=str), "the failed copy's headers")
    assert MASKED in json.loads(headers[H_HISTORY])[-1]["error_message"]

    # verify: recomputing another search phrase is refused
    events = tmp_path / "events.jsonl"
    events.write_bytes(serialise(make_event(user, "search", "hygiene phrase two", T0)) + b"\n")
    done = run_cli("verify", "--events", str(events), env=with_provider(env, provider))
    assert done.returncode != 0
    assert_masked(done.stdout + done.stderr, "verify")
    assert "Incorrect API key provided" in done.stdout + done.stderr, done.stdout + done.stderr


def test_an_unexpected_traceback_masks_the_key(env):
    """`myshop` itself: a crash that quotes a secret prints the traceback without it, exit 1."""
    code = ("from myshop_ops.cli import app; from myshop_ops.adapters.config import load_settings; "
            f"load_settings(env_file=None); app.build = lambda only: exec(\"raise RuntimeError('reply: {KEY}')\"); "
            "app.main()")
    done = subprocess.run([sys.executable, "-c", code], env={**env.subprocess_env(), "OPENAI_API_KEY": KEY},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "RuntimeError: reply: " + MASKED in done.stderr, done.stderr
    assert KEY not in done.stderr


@pytest.mark.parametrize("said", [
    KEY, f"'{KEY}'", f"Bearer {KEY}.", "sk-proj-" + "*" * 36 + "Qz7V", "sk-Wr0...Qz7V", "sk-proj-****...****Qz7V",
    json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}}),
])
def test_redact_masks_the_key_in_every_form_a_provider_quotes(said):
    load_settings({"OPENAI_API_KEY": KEY}, env_file=None)
    out = redact(f"Error code: 401 - {said} end")
    assert "sk-" not in out and out.endswith(" end"), out


def test_redact_masks_url_passwords_in_every_form():
    load_settings({"RABBITMQ_DSN": "amqp://app:Hyg%2Fpw%40rabbit@127.0.0.1:5672/%2f",
                   "MONGODB_URL": "mongodb://app:HygMongoPw@127.0.0.1/?tlsCertificateKeyFilePassword=HygCertPw",
                   "RABBITMQ_MANAGEMENT_URL": "http://app:HygMgmtPw@127.0.0.1:15672"}, env_file=None, embeds=False)
    said = ("ACCESS_REFUSED for Hyg/pw@rabbit (Hyg%2Fpw%40rabbit) auth HygMongoPw / HygCertPw / HygMgmtPw "
            '{"p": "Hyg/pw@rabbit"} guest')
    out = redact(said)
    for secret in ("Hyg/pw@rabbit", "Hyg%2Fpw%40rabbit", "HygMongoPw", "HygCertPw", "HygMgmtPw"):
        assert secret not in out, out
    assert out.endswith("guest")  # RabbitMQ's public default password is not a secret (and a common word)
