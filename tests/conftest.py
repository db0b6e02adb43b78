"""Fixtures on real services: RabbitMQ and Redis on 127.0.0.1, the Mongo-wire server, a fake OpenAI. Fixtures
only: the helpers tests import are in tests/support."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.config import Settings, load_settings
from myshop_ops.adapters.store import Store
from myshop_ops.tools.failed_queue import FailedBox
from tests.support.fake_openai import FakeOpenAI
from tests.support.services import DIMS, RABBIT, ROOT, MongoWire, forget_keys, redis_url
from tests.support.workers import Workers, prepare, remove_topology

REDIS = redis_url()
# what needs a running service: these fixtures, and the suites marked as such (`make check` runs the rest)
SERVICE_FIXTURES = frozenset({"mongo_wire", "redis_client"})
SERVICE_MARKERS = ("integration", "reliability", "cluster")


# the suites by how long their files take, longest first: pytest-xdist hands whole files to its processes in this
# order (--dist loadfile), so the long reliability and deployment files do not start last and stretch the run
SUITE_ORDER = ("reliability", "deploy", "shop", "integration", "cluster", "docs", "contract", "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the suites longest first; mark ``services`` every test that needs RabbitMQ, Redis or the Mongo-wire
    server (`make check` leaves them out)."""
    def rank(item: pytest.Item) -> int:
        parts = item.path.parts
        suite = parts[parts.index("tests") + 1] if "tests" in parts[:-1] else ""
        return SUITE_ORDER.index(suite) if suite in SUITE_ORDER else len(SUITE_ORDER)

    items.sort(key=rank)  # stable: the order within a suite stays
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())) or any(
                item.get_closest_marker(m) for m in SERVICE_MARKERS):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def mongo_wire(tmp_path_factory) -> Iterator[MongoWire]:
    server = MongoWire(tmp_path_factory.mktemp("mongo") / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(api_key="test-key").start()
    yield server
    server.stop()


class Env(dict):
    """The environment of one test: isolated queue, failed queue and database names."""

    def settings(self, **overrides: str) -> Settings:
        return load_settings(env={**self, **overrides}, env_file=None)

    def subprocess_env(self, **overrides: str) -> dict[str, str]:
        return {**os.environ, **self, **overrides, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def env(mongo_wire) -> Iterator[Env]:
    tag = "t" + uuid.uuid4().hex[:10]
    e = Env(
        APP_ENV="test",
        RABBITMQ_DSN=RABBIT,
        RABBITMQ_QUEUE=f"{tag}.events",
        RABBITMQ_FAILED_QUEUE=f"{tag}.failed",
        RABBITMQ_QUEUE_TYPE="quorum",
        MONGODB_URL=mongo_wire.url,
        MONGODB_DB=tag,
        REDIS_URL=REDIS,
        REDIS_KEY_PREFIX=f"{tag}:",  # every key of this test's workers; removed at its end, nobody else's
        EMBEDDING_PROVIDER="hash",
        EMBEDDING_DIMENSIONS=str(DIMS),
        WORKER_RETRY_DELAY="200",
        WORKER_MAX_RETRIES="3",
        LOG_FORMAT="console",
        MYSHOP_ALLOW_ROOT="1",  # CI runs as root; the refusal itself is tested without it
    )
    yield e
    _cleanup(e)


def _cleanup(e: Env) -> None:
    s = e.settings()
    forget_keys(e["REDIS_KEY_PREFIX"])
    remove_topology(RABBIT, Topology.from_settings(s))
    from pymongo import MongoClient

    client = MongoClient(s.mongodb_url, serverSelectionTimeoutMS=2000)
    with contextlib.suppress(Exception):
        client.drop_database(s.mongodb_db)
    client.close()


@pytest.fixture
def topology(env) -> Topology:
    """The test's topology declared on the real broker, and its database's indexes created."""
    return prepare(env.settings())


@pytest.fixture
def workers(tmp_path) -> Iterator[Workers]:
    """`myshop consume` subprocesses for one test, killed at its end if still running."""
    w = Workers(tmp_path)
    yield w
    w.cleanup()


@pytest.fixture
def redis_client() -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(REDIS)
    yield client
    client.close()


@pytest.fixture
def failed_box(env, topology) -> Iterator[FailedBox]:
    """The failed-queue tools (`failed show/retry/remove`) on this test's queues and database."""
    s = env.settings()
    conn = broker.connect(s.rabbitmq_dsn)
    store = Store(s.mongodb_url, s.mongodb_db)
    yield FailedBox(conn, store, topology)
    conn.close()
    store.close()
