"""A live deployment moved to another model of another size (`myshop model ...`) while events keep arriving: after
the switch every profile is of the new model, `recommend` works, verify finds no event lost or applied twice, and
nothing is in failed."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest

from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import serialise
from myshop_ops.core.limits import Limits
from myshop_ops.core.worker import Worker
from tests.support.events import T0, mixed_events, publish
from tests.support.services import DIMS, run_cli, wait_for

pytestmark = pytest.mark.integration
NEXT_DIMS = 24


def cli(env, *args: str) -> dict:
    done = run_cli(*args, env=env.subprocess_env())
    assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stdout, done.stderr)
    return json.loads(done.stdout) if "--json" in args else {}


def test_a_live_deployment_moves_to_a_model_of_another_size(env, topology, tmp_path):
    s = env.settings()
    products = [f"p{i}" for i in range(6)]
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps({"product_id": p, "name": f"Product {p}", "category": "test"}) + "\n"
                               for p in products))
    cli(env, "products", "import", str(catalog))
    users = [f"{env['MONGODB_DB']}-m{i}" for i in range(4)]
    batches = [mixed_events(users, products, per_user=6, start=T0 + timedelta(days=3 * k)) for k in range(4)]
    recorded = tmp_path / "events.jsonl"

    def consume(events) -> Worker:
        publish(s, topology, [serialise(e) for e in events])
        worker = Worker(s, limits=Limits(messages=len(events), seconds=90))
        assert worker.run() == 0
        return worker

    consume(batches[0])  # profiles of the current model, with their item maps
    cli(env, "model", "start", "--dimensions", str(NEXT_DIMS))
    cli(env, "products", "import", "--next", str(catalog))
    consume(batches[1])  # the workers keep the shadows too
    cli(env, "model", "run")

    # events keep arriving: batch 2 folded under the current model and its shadow kept, batch 3 published while the
    # switch runs (held by the workers during it, folded with the new model after it)
    worker = Worker(s, limits=Limits(messages=len(batches[2]) + len(batches[3]), seconds=120))
    thread = threading.Thread(target=worker.run)
    thread.start()
    publish(s, topology, [serialise(e) for e in batches[2]])
    wait_for(lambda: worker.totals.applied >= len(batches[2]), timeout=60, what="batch 2 applied")
    recorded.write_bytes(b"".join(serialise(e) + b"\n" for batch in batches[:3] for e in batch))
    switching: list = []
    switcher = threading.Thread(target=lambda: switching.append(cli(
        env, "model", "switch", "--grace", "3", "--events", str(recorded), "--json")))
    switcher.start()
    wait_for(lambda: (Store(s.mongodb_url, s.mongodb_db).migration() or {}).get("state") == "switching",
             timeout=30, what="the switch to begin")
    publish(s, topology, [serialise(e) for e in batches[3]])
    switcher.join(timeout=120)
    assert switching and switching[0]["state"] == "switched"
    thread.join(timeout=150)
    assert not thread.is_alive() and worker.totals.failed == 0 and worker.totals.retried == 0

    store = Store(s.mongodb_url, s.mongodb_db)
    try:
        spaces = {(d["model"], d["dimensions"], len(d["vector"])) for d in store.users.find({}, {"model": 1,
                                                                                                "dimensions": 1,
                                                                                                "vector": 1})}
        assert spaces == {(s.model, NEXT_DIMS, NEXT_DIMS)}
        assert store.count_failures() == 0
    finally:
        store.close()
    recorded.write_bytes(b"".join(serialise(e) + b"\n" for batch in batches for e in batch))
    done = run_cli("verify", "--events", str(recorded), "--json", env=env.subprocess_env())
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], report
    assert report["users_ok"] == len(users) and report["events_lost"] == report["events_duplicated"] == 0
    recs = cli(env, "recommend", users[0], "--json")
    assert recs["dimensions"] == NEXT_DIMS and recs["recommendations"] and recs["fallback"] is False
    assert DIMS != NEXT_DIMS
