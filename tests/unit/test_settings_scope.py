"""Each command checks only the settings it uses: OPENAI_API_KEY is required by the commands that embed (consume,
products import, verify, preflight's provider check), not by the others (setup-transports, stats, failed, ...)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from myshop_ops.adapters.config import ConfigError, load_settings
from myshop_ops.adapters.embeddings import make_provider
from tests.support.services import ROOT

NO_KEY = {"APP_ENV": "dev", "EMBEDDING_PROVIDER": "openai"}


def test_the_api_key_is_required_only_of_a_caller_that_embeds():
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as err:
        load_settings(NO_KEY, None)
    assert "required when EMBEDDING_PROVIDER=openai" in str(err.value)
    s = load_settings(NO_KEY, None, embeds=False)
    assert s.openai_api_key is None
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):  # and embedding with such settings still says why
        make_provider(s)


def test_values_given_are_still_validated_for_a_caller_that_does_not_embed():
    with pytest.raises(ConfigError, match="WORKER_MAX_RETRIES"):
        load_settings({**NO_KEY, "WORKER_MAX_RETRIES": "42"}, None, embeds=False)


def myshop(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env_file = tmp_path / "myshop.env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EMBEDDING_", "MYSHOP_", "APP_ENV"))}
    env.update(NO_KEY, MYSHOP_ENV_FILE=str(env_file), RABBITMQ_DSN="amqp://guest:guest@127.0.0.1:1/%2f",
               LOG_FORMAT="console")
    return subprocess.run([sys.executable, "-m", "myshop_ops", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_setup_transports_without_an_api_key_gets_to_rabbitmq(tmp_path):
    result = myshop("setup-transports", tmp_path=tmp_path)
    assert result.returncode == 3, result.stderr  # the broker (nothing listens on port 1), not the configuration
    assert "RabbitMQ unreachable" in result.stderr and "OPENAI_API_KEY" not in result.stderr


def test_consume_without_an_api_key_stops_on_it(tmp_path):
    result = myshop("consume", "--allow-root", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "OPENAI_API_KEY" in result.stderr and "required when EMBEDDING_PROVIDER=openai" in result.stderr
