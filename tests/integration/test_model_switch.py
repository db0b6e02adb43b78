"""`myshop model switch|rollback|finish` on a small deployment (hash provider, 3 users): the shop's reader never
finds the live collections missing or empty; rollback goes back to the old model; finish drops it and refuses a
rollback after; a run or switch killed (SIGKILL) after any step is finished by the next; a rebuilt profile that is
not its events' recomputation stops the switch, with one line naming the user."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from pymongo import MongoClient

from myshop_ops.adapters.store import NEXT, PREV, PRODUCTS, USERS, Store
from myshop_ops.base.contract import serialise
from myshop_ops.core.limits import Limits
from myshop_ops.core.worker import Worker
from myshop_ops.tools.migration import KILL_AFTER
from tests.support.events import mixed_events, publish
from tests.support.services import DIMS, run_cli, wait_for

pytestmark = pytest.mark.integration
NEXT_DIMS = 24
PRODUCT_IDS = [f"p{i}" for i in range(6)]


def cli(env, *args: str, **extra: str) -> dict:
    done = run_cli(*args, env=env.subprocess_env(**extra))
    assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stdout, done.stderr)
    return json.loads(done.stdout) if "--json" in args else {}


def killed(env, step: str, *args: str) -> None:
    """Run `myshop ARGS` killed (SIGKILL) after ``step``."""
    done = run_cli(*args, env=env.subprocess_env(**{KILL_AFTER: step}))
    assert done.returncode == -signal.SIGKILL, (step, done.returncode, done.stdout, done.stderr)


def deployment(env, topology, tmp_path: Path) -> tuple[list[str], Path]:
    """Profiles of the current model (with item maps), a migration started, the catalog imported under the next
    model. Returns the users and the file of the events recorded."""
    s = env.settings()
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps({"product_id": p, "name": f"Product {p}", "category": "test"}) + "\n"
                               for p in PRODUCT_IDS))
    cli(env, "products", "import", str(catalog))
    users = [f"{env['MONGODB_DB']}-u{i}" for i in range(3)]
    events = mixed_events(users, PRODUCT_IDS, per_user=6)
    publish(s, topology, [serialise(e) for e in events])
    assert Worker(s, limits=Limits(messages=len(events), seconds=60)).run() == 0
    cli(env, "model", "start", "--dimensions", str(NEXT_DIMS))
    cli(env, "products", "import", "--next", str(catalog))
    recorded = tmp_path / "events.jsonl"
    recorded.write_bytes(b"".join(serialise(e) + b"\n" for e in events))
    return users, recorded


def live_sizes(env) -> tuple[set[int], set[int], int, int]:
    """What the shop's reader finds now: the vector sizes of the live profiles and products, and their counts."""
    store = Store(env["MONGODB_URL"], env["MONGODB_DB"])
    try:
        profiles = [len(d["vector"]) for d in store.users.find({}, {"vector": 1})]
        products = [d["dimensions"] for d in store.products.find({}, {"dimensions": 1})]
        return set(profiles), set(products), len(profiles), len(products)
    finally:
        store.close()


def assert_verified(env, recorded: Path, dims: int, users: list[str]) -> None:
    done = run_cli("verify", "--events", str(recorded), "--json", env=env.subprocess_env())
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"] and report["users_ok"] == len(users), report
    assert live_sizes(env) == ({dims}, {dims}, len(users), len(PRODUCT_IDS))
    recs = cli(env, "recommend", users[0], "--json")
    assert recs["dimensions"] == dims and recs["recommendations"] and recs["fallback"] is False


class Reader(threading.Thread):
    """The shop's reader: one user's profile and one product, read in a loop on its own connection."""

    def __init__(self, env, user_id: str):
        super().__init__(daemon=True)
        self.client = MongoClient(env["MONGODB_URL"], serverSelectionTimeoutMS=5000)
        self.db, self.user_id = self.client[env["MONGODB_DB"]], user_id
        self.reads, self.misses, self.sizes = 0, [], set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            profile = self.db[USERS].find_one({"user_id": self.user_id}, {"dimensions": 1})
            product = self.db[PRODUCTS].find_one({"product_id": PRODUCT_IDS[0]}, {"dimensions": 1})
            self.reads += 1
            if profile is None or product is None:
                self.misses.append(("profile" if profile is None else "product", self.reads))
            else:
                self.sizes.add((profile["dimensions"], product["dimensions"]))

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        self.client.close()


def test_the_reader_never_misses_the_live_collections_and_rollback_returns_to_the_old_model(env, topology,
                                                                                          tmp_path):
    users, recorded = deployment(env, topology, tmp_path)
    cli(env, "model", "run")
    reader = Reader(env, users[0])
    reader.start()
    try:
        wait_for(lambda: reader.reads >= 20, timeout=30, what="the reader's first reads")
        assert cli(env, "model", "switch", "--grace", "0", "--events", str(recorded), "--json")["state"] == "switched"
        wait_for(lambda: (NEXT_DIMS, NEXT_DIMS) in reader.sizes, timeout=30, what="the reader on the new model")
        assert_verified(env, recorded, NEXT_DIMS, users)
        assert cli(env, "model", "rollback", "--grace", "0", "--json")["state"] == "running"
        wait_for(lambda: (DIMS, DIMS) in reader.sizes and reader.reads > 100, timeout=30,
                 what="the reader on the old model again")
    finally:
        reader.finish()
    assert reader.misses == [], f"{len(reader.misses)} of {reader.reads} reads found nothing: {reader.misses[:5]}"
    assert_verified(env, recorded, DIMS, users)  # profiles, products and recommendations of the old model
    names = set(MongoClient(env["MONGODB_URL"])[env["MONGODB_DB"]].list_collection_names())
    assert {USERS + NEXT, PRODUCTS + NEXT} <= names and not {USERS + PREV, PRODUCTS + PREV} & names


def test_finish_drops_the_old_model_and_a_rollback_is_then_refused(env, topology, tmp_path):
    users, recorded = deployment(env, topology, tmp_path)
    cli(env, "model", "run")
    cli(env, "model", "switch", "--grace", "0")
    assert cli(env, "model", "finish", "--json")["state"] == "finished"
    names = set(MongoClient(env["MONGODB_URL"])[env["MONGODB_DB"]].list_collection_names())
    assert not {USERS + PREV, PRODUCTS + PREV, USERS + NEXT, PRODUCTS + NEXT} & names
    done = run_cli("model", "rollback", "--grace", "0", env=env.subprocess_env())
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no way back" in lines[0] and "myshop model start" in lines[0], done.stderr
    assert_verified(env, recorded, NEXT_DIMS, users)


@pytest.mark.parametrize(("command", "step"), [
    ("run", "rebuilt"),
    ("switch", "held"),
    ("switch", "caught up"),
    ("switch", f"copied {PRODUCTS}"),
    ("switch", f"renamed {PRODUCTS}"),
    ("switch", f"copied {USERS}"),
])
def test_a_step_killed_midway_is_finished_by_the_next_run(env, topology, tmp_path, command, step):
    """Killed after ``step``: the reader finds every profile and product, each collection of one model, and the
    command run again finishes the migration (verify OK under the new model)."""
    users, recorded = deployment(env, topology, tmp_path)
    if command == "switch":
        cli(env, "model", "run")
    killed(env, step, "model", command, *(("--grace", "0", "--events", str(recorded)) if command == "switch" else ()))
    profiles, products, n_profiles, n_products = live_sizes(env)
    assert len(profiles) == len(products) == 1 and (n_profiles, n_products) == (len(users), len(PRODUCT_IDS))
    if command == "run":
        cli(env, "model", "run")
    assert cli(env, "model", "switch", "--grace", "0", "--events", str(recorded), "--json")["state"] == "switched"
    assert_verified(env, recorded, NEXT_DIMS, users)


def test_a_rebuilt_profile_unlike_its_events_stops_the_switch_with_one_line(env, topology, tmp_path):
    users, recorded = deployment(env, topology, tmp_path)
    cli(env, "model", "run")
    client = MongoClient(env["MONGODB_URL"])
    shadows = client[env["MONGODB_DB"]][USERS + NEXT]
    other = np.random.default_rng(7).normal(size=NEXT_DIMS).astype(np.float32)
    other /= np.linalg.norm(other)
    tampered = shadows.update_one({"user_id": users[1]}, {"$set": {"vector": other.astype(float).tolist()}})
    assert tampered.modified_count == 1
    done = run_cli("model", "switch", "--grace", "0", "--events", str(recorded), env=env.subprocess_env())
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and users[1] in lines[0] and "myshop model switch" in lines[0], done.stderr
    assert (Store(env["MONGODB_URL"], env["MONGODB_DB"]).migration() or {}).get("state") == "running"
    assert live_sizes(env)[:2] == ({DIMS}, {DIMS})  # nothing switched
    # as the line says: the switch again rebuilds that profile from its item map, and goes through
    assert cli(env, "model", "switch", "--grace", "0", "--events", str(recorded), "--json")["state"] == "switched"
    assert_verified(env, recorded, NEXT_DIMS, users)
    client.close()
