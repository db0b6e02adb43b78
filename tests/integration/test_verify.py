"""`myshop verify`: the oracle accepts what the worker stored and catches every kind of damage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from myshop_ops.contract import make_event, serialise
from myshop_ops.layout import vector_value
from myshop_ops.limits import Limits
from myshop_ops.store import Store
from myshop_ops.worker import Worker
from tests.conftest import run_cli
from tests.support.events import T0, mixed_events, publish, seed_products

pytestmark = pytest.mark.integration


def run_verify(env, path) -> tuple[dict, int]:
    done = run_cli("verify", "--events", str(path), "--json", env=env.subprocess_env())
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout), done.returncode


@pytest.fixture
def applied(env, topology, tmp_path):
    """24 mixed events of 3 users, a duplicate, a product without vector, a product in another vector space and
    an invalid line, all published and consumed; the recorded file holds exactly what was published."""
    s = env.settings()
    products = seed_products(s, [f"p{i}" for i in range(4)])
    store = Store(s.mongodb_url, s.mongodb_db)
    store.upsert_products([{"product_id": "old", "embedding": np.ones(8, np.float32) / 8**0.5, "model": "ada",
                            "dimensions": 8}])
    users = [f"{env['MONGODB_DB']}-v{i}" for i in range(3)]
    events = mixed_events(users, list(products), per_user=8)
    ghost = make_event(users[0], "product_view", "no-such-product", T0)
    foreign = make_event(users[1], "product_purchase", "old", T0)
    bodies = [serialise(e) for e in [*events, events[3], ghost, foreign]] + [b'{"not": "an event"}']
    publish(s, topology, bodies, message_ids=False)
    worker = Worker(s, limits=Limits(messages=len(bodies), seconds=60))
    assert worker.run() == 0
    assert (worker.totals.applied, worker.totals.failed) == (24, 2)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(bodies) + b"\n")
    yield s, store, users, path
    store.close()


def test_verify_accepts_what_the_worker_stored(env, applied):
    _, _, _, path = applied
    report, code = run_verify(env, path)
    assert code == 0 and report["ok"] is True
    assert {k: report[k] for k in ("lines", "invalid_lines", "events", "duplicates_in_file", "skipped_no_product",
                                   "in_failed", "users", "users_ok", "events_lost", "events_duplicated")} == {
        "lines": 28, "invalid_lines": 1, "events": 26, "duplicates_in_file": 1, "skipped_no_product": 1,
        "in_failed": 1, "users": 3, "users_ok": 3, "events_lost": 0, "events_duplicated": 0}
    table = run_cli("verify", "--events", str(path), env=env.subprocess_env())
    assert table.returncode == 0 and "verification: OK" in table.stdout


def test_verify_reports_lost_duplicated_and_diverging_users(env, applied):
    s, store, users, path = applied
    store.users.delete_one({"user_id": users[0]})
    store.users.update_one({"user_id": users[1]}, {"$inc": {"event_count": 1}})
    doc = store.get_profile_doc(users[2])
    rng = np.random.default_rng(1)
    store.users.update_one({"user_id": users[2]}, {"$set": {"vector": vector_value(
        rng.standard_normal(s.embedding_dimensions).astype(np.float32), s.store_layout)}})
    assert doc is not None
    report, code = run_verify(env, path)
    assert code == 1 and report["ok"] is False
    assert (report["users_lost"], report["users_duplicated"], report["users_diverging"]) == (1, 1, 1)
    assert report["events_lost"] == 8 and report["events_duplicated"] == 1
    by_user = {p["user_id"]: p for p in report["problems"]}
    assert by_user[users[0]]["status"] == "lost" and by_user[users[0]]["stored_events"] == 0
    assert by_user[users[2]]["status"] == "diverging" and by_user[users[2]]["cosine"] < 0.9


def test_verify_bad_file_is_one_line(env, topology, tmp_path):
    done = run_cli("verify", "--events", str(tmp_path / "missing.jsonl"), env=env.subprocess_env())
    assert done.returncode == 2 and "No such file" in done.stderr and done.stderr.count("\n") == 1
