"""The staging recipe (CHECKLIST.md "Rehearsing on staging"): APP_ENV=prod with a local OpenAI-compatible server
instead of an API key. Prod settings and checks stay in force, and prod keeps refusing the hash provider."""

from __future__ import annotations

import pytest

from tests.integration.test_operator import MGMT, preflight
from tests.support.fake_openai import FakeOpenAI

pytestmark = pytest.mark.integration


def test_staging_rehearses_prod_with_a_local_openai_compatible_server(env, topology, fake_openai: FakeOpenAI):
    env["RABBITMQ_MANAGEMENT_URL"] = MGMT
    staging = {"APP_ENV": "prod", "EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "test-key",
               "OPENAI_BASE_URL": fake_openai.base_url, "EMBEDDING_DIMENSIONS": "1536"}
    checks, _, _ = preflight(env, **staging)
    assert checks[("config", "variables")]["detail"].startswith("APP_ENV=prod"), checks[("config", "variables")]
    assert checks[("provider", "one embedding")]["status"] == "PASS", checks[("provider", "one embedding")]
    # the prod-only checks still apply (this test's broker is guest/guest: refused in prod, as on a real staging)
    assert checks[("config", "RABBITMQ_DSN")]["status"] == "FAIL"
    checks, code, output = preflight(env, **{**staging, "EMBEDDING_PROVIDER": "hash"})
    assert code == 1 and checks[("config", "EMBEDDING_PROVIDER")]["status"] == "FAIL", output
