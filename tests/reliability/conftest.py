"""Fixtures of the reliability suite (issue 8): its own Redis database and worker processes cleaned up."""

from __future__ import annotations

import pytest

from tests.reliability.harness.supervisor import halt_all
from tests.support.services import RELIABILITY, redis_url
from tests.support.workers import Workers


@pytest.fixture
def renv(env):
    """The test's environment with workers on the suite's own Redis database (a stop-workers flag of another
    suite never reaches them) and quick retries."""
    env["REDIS_URL"] = redis_url(RELIABILITY)
    env["WORKER_RETRY_DELAY"] = "200"
    env["WORKER_MAX_RETRIES"] = "5"
    env["LOG_LEVEL"] = "debug"  # one line per batch in the workers' logs: what happened when, after a failure
    return env


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    halt_all()  # a failed scenario leaves its supervisor running: no more restarts
    w.cleanup()
