"""`myshop verify`: the oracle accepts what the worker stored and catches every kind of damage."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest

from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.base.layout import vector_value
from myshop_ops.core.limits import Limits
from myshop_ops.core.worker import Worker
from tests.support.events import T0, mixed_events, publish, seed_products
from tests.support.services import run_cli
from tests.support.workers import wait_queue

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
    piped = {k: v for k, v in env.subprocess_env().items() if k != "COLUMNS"}  # a pipe, no terminal width given
    table = run_cli("verify", "--events", str(path), env=piped)
    assert table.returncode == 0 and "verification: OK" in table.stdout
    assert "lost (users/events)" in table.stdout and "…" not in table.stdout  # whole columns, nothing cut


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


def test_verify_reports_messages_in_flight_as_pending_not_lost(env, topology, workers, tmp_path):
    """Right after a worker kill the queue still holds events: verify says so instead of reporting a loss, and
    waits (bounded) for them while a consumer drains the queue."""
    s = env.settings()
    seed_products(s, ["p0", "p1"])
    users = [f"{env['MONGODB_DB']}-f{i}" for i in range(2)]
    events = mixed_events(users, ["p0", "p1"], per_user=6)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(serialise(e) for e in events) + b"\n")
    publish(s, topology, events)
    worker = Worker(s, prefetch=4, limits=Limits(messages=4, seconds=60))
    assert worker.run() == 0  # 4 applied, 8 still queued with no consumer
    report, code = run_verify(env, path)
    assert code == 1 and report["ok"] is False and report["in_flight"] == 8
    assert report["users_lost"] == 0 and report["events_lost"] == 8 and report["users_pending"] >= 1
    assert {p["status"] for p in report["problems"]} == {"pending"}
    table = run_cli("verify", "--events", str(path), "--wait", "0", env=env.subprocess_env())
    assert "NOT SETTLED" in table.stdout and "8 message(s) still queued or unacked" in " ".join(table.stdout.split())
    workers.start(env.subprocess_env(), "--time-limit", "60")  # a consumer drains the rest while verify waits
    wait_queue(s, topology.queue, consumers=1)
    report, code = run_verify(env, path)
    assert code == 0 and report["ok"] is True and report["in_flight"] == 0 and report["users_ok"] == 2


def _forge_adoption(s, store, user: str, cosine: float) -> None:
    """Replace the user's vector by one at ``cosine`` to the true one and add the adoption record that makes the
    rule's residual exactly 0: the prior's time chosen so that its decayed weight is |S_forged - S_true|."""
    doc = store.get_profile_doc(user)
    true = np.asarray(doc["vector"], np.float64)
    other = np.random.default_rng(7).standard_normal(true.size)
    other -= (other @ true) * true
    forged = cosine * true + np.sqrt(1 - cosine**2) * other / np.linalg.norm(other)
    rest = doc["magnitude"] * np.linalg.norm(forged - true)
    prior_t = doc["last_updated"] + timedelta(days=float(np.log(rest)) / s.decay_lambda)
    store.users.update_one({"user_id": user}, {"$set": {
        "vector": vector_value(forged.astype(np.float32), s.store_layout),
        "adopted": {"version": 0, "last_updated": prior_t, "event_count": 0}}})


@pytest.mark.parametrize("cosine", [0.287, 0.758])
def test_verify_forged_adoption_record_is_not_ok(env, applied, cosine):
    """A profile whose vector was replaced (cosine 0.287, then 0.758 to the truth) plus a forged `adopted` record
    passed as ok: the residual rule only measures the sum's length beyond the events. A profile carrying an
    adoption record is never ok now: its prior is not in the file."""
    s, store, users, path = applied
    _forge_adoption(s, store, users[1], cosine)
    report, code = run_verify(env, path)
    assert code == 1 and report["ok"] is False
    assert (report["users_ok"], report["users_unverifiable"], report["users_adopted"]) == (2, 1, 1)
    [problem] = report["problems"]
    assert problem["user_id"] == users[1] and problem["status"] == "unverifiable" and problem["adopted"] is True
    table = run_cli("verify", "--events", str(path), "--wait", "0", env=env.subprocess_env(COLUMNS="300"))
    assert table.returncode == 1 and "verification: UNVERIFIABLE" in table.stdout


def test_verify_checks_what_a_profile_says_about_its_past(env, applied):
    """Records a profile keeps about itself excuse nothing: an adoption record that contradicts the profile, an
    unreadable one, a counter or a time that is not the events' are reported, never ok."""
    _, store, users, path = applied
    doc = store.get_profile_doc(users[0])
    store.users.update_one({"user_id": users[0]}, {"$set": {"adopted": {
        "version": doc["version"] + 5, "last_updated": doc["last_updated"], "event_count": 0}}})
    store.users.update_one({"user_id": users[1]}, {"$set": {"adopted": "yes"}})
    store.users.update_one({"user_id": users[2]}, {"$set": {"last_updated": doc["last_updated"] + timedelta(days=9)}})
    report, code = run_verify(env, path)
    assert code == 1 and report["users_ok"] == 0
    by_user = {p["user_id"]: p for p in report["problems"]}
    assert by_user[users[0]]["status"] == "unverifiable" and "contradicts" in by_user[users[0]]["reason"]
    assert by_user[users[1]]["status"] == "unverifiable" and "unreadable" in by_user[users[1]]["reason"]
    assert by_user[users[2]]["status"] == "diverging" and "last_updated" in by_user[users[2]]["reason"]
