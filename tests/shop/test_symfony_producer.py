"""The shop's real producer: Symfony Messenger's AMQP transport (Debian's php-amqp and Symfony packages), sending a
message class of the shop's shape with the Symfony serializer, against `setup-transports` + `consume`.

Every test runs in its own vhost with the shop's own names (user_embedding_updates, failed), and ends with
`myshop verify` over the bodies exactly as the shop serialised them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from myshop_ops.adapters.management import for_dsn
from myshop_ops.adapters.store import Store
from myshop_ops.core.limits import Limits
from myshop_ops.core.worker import Worker
from tests.support.events import seed_products
from tests.support.services import ROOT, run_cli, wait_for
from tests.support.workers import private_vhost, queue_state

pytestmark = pytest.mark.integration

PHP = shutil.which("php")
SCRIPT = Path(__file__).with_name("symfony_publish.php")
AMQP_BRIDGE = Path("/usr/share/php/Symfony/Component/Messenger/Bridge/Amqp/autoload.php")
if not PHP or not AMQP_BRIDGE.is_file() or "amqp" not in subprocess.run(
        [PHP, "-m"], capture_output=True, text=True).stdout.split():
    pytest.skip("the shop's PHP side is not installed (make debian-tools)", allow_module_level=True)

QUEUE = "user_embedding_updates"
PAIR_TIME = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0).isoformat()
PRODUCTS = ["42", "43", "44"]
# the shop's messenger.yaml before myshop: auto_setup declares a classic queue without arguments
SHOP_TODAY = {"auto_setup": True,
              "exchange": {"name": QUEUE, "type": "direct", "default_publish_routing_key": "user.embedding.update"},
              "queues": {QUEUE: {"binding_keys": ["user.embedding.update"]}}}


@pytest.fixture
def shop(env, tmp_path):
    """The test's environment in a private vhost, with the shop's queue names and products 42..44."""
    with private_vhost(env["RABBITMQ_DSN"]) as (_vhost, dsn):
        env = type(env)({**env, "RABBITMQ_DSN": dsn, "RABBITMQ_QUEUE": QUEUE, "RABBITMQ_FAILED_QUEUE": "failed"})
        seed_products(env.settings(), PRODUCTS)
        assert run_cli("setup-indexes", env=env.subprocess_env()).returncode == 0
        env.record = tmp_path / "published.jsonl"
        yield env


def events(n: int, *, start: int = 0) -> list[dict]:
    """``n`` events of the shop's shape: UUID users, int product ids, `[]` and `{}` metadata, searches."""
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    kinds = ["search", "product_view", "product_click", "product_purchase"]
    out = []
    for i in range(start, start + n):
        kind = kinds[i % 4]
        e = {"userId": str(uuid.UUID(int=(i % 6) + 1)).replace("0", "a", 1), "eventType": kind,
             "occurredAt": (base + timedelta(minutes=i)).isoformat(),
             "metadata": [] if i % 3 == 0 else {"source": "home", "position": i} if i % 3 == 1 else {}}
        if kind == "search":
            e["searchPhrase"] = f"gaming laptop {i % 5}"
        else:
            e["productId"] = int(PRODUCTS[i % 3])
        out.append(e)
    return out


def colliding_pair() -> list[dict]:
    """Two users whose UUIDs start with a letter view one product in one second: the shop's ids are equal."""
    return [{"userId": f"{c}9a3f12-7b00-413f-8e2a-e25d19efe76b", "eventType": "product_view", "productId": 42,
             "occurredAt": PAIR_TIME, "metadata": []} for c in "ab"]


def shop_publish(env, options: dict, batch: list[dict], *, routing_key: str | None = None,
                 background: bool = False) -> list[str] | subprocess.Popen:
    """Dispatch through the shop's transport; returns each dispatch's outcome line ("ok <id>" / "error ...")."""
    if routing_key:
        options = {**options, "exchange": {**options["exchange"], "default_publish_routing_key": routing_key}}
    cmd = [PHP, str(SCRIPT), f"{env['RABBITMQ_DSN']}/{QUEUE}", json.dumps(options)]
    stdin = "".join(json.dumps(e) + "\n" for e in batch)
    penv = {"RECORD": str(env.record), "PATH": "/usr/bin:/bin"}
    if background:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=penv)
        proc.stdin.write(stdin)
        proc.stdin.close()
        return proc
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=penv, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def documented_options(env, *extra: str) -> dict:
    """The transport options of the messenger.yaml that `myshop messenger-config` prints (the tested text)."""
    done = run_cli("messenger-config", *extra, env=env.subprocess_env())
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    transport = config["framework"]["messenger"]["transports"][QUEUE]
    assert transport["serializer"] == "messenger.transport.symfony_serializer"
    assert "failure_transport" not in config["framework"]["messenger"]
    return transport["options"]


def consume(env, n: int) -> Worker:
    worker = Worker(env.settings(), limits=Limits(messages=n, seconds=60))
    assert worker.run() == 0 and worker.limits.reason == f"message limit {n} reached"
    return worker


def verified(env) -> dict:
    done = run_cli("verify", "--events", str(env.record), "--json", env=env.subprocess_env())
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], report
    return report


def setup_transports(env, *args: str) -> dict:
    done = run_cli("setup-transports", "--json", *args, env=env.subprocess_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return {(st["kind"], st["name"]): st for st in json.loads(done.stdout)["steps"]}


@pytest.mark.parametrize("first", ["myshop", "shop"])
def test_the_documented_config_publishes_whoever_declares_first_and_every_event_is_applied_once(shop, first):
    batch = [*events(22), *colliding_pair()]
    if first == "myshop":
        setup_transports(shop)
        outcome = shop_publish(shop, documented_options(shop), batch)
    else:  # the shop's auto_setup declares the queue, then setup-transports adopts it as it is
        options = documented_options(shop)
        outcome = shop_publish(shop, options, batch[:12])
        steps = setup_transports(shop)
        assert steps[("queue", QUEUE)]["state"] == "existing"
        outcome += shop_publish(shop, options, batch[12:])  # auto_setup again, against the finished topology
    assert all(line.startswith("ok ") for line in outcome), outcome
    assert outcome[-1] == outcome[-2]  # the shop gave both users' events one id
    worker = consume(shop, len(batch))
    assert worker.totals.applied == len(batch) and worker.totals.duplicate == 0 and worker.totals.failed == 0
    report = verified(shop)
    assert report["events"] == len(batch) and report["users_ok"] == report["users"] == 8
    # a real duplicate (same user, same id) is still applied once
    shop_publish(shop, documented_options(shop), colliding_pair()[:1])
    again = consume(shop, 1)
    assert again.totals.duplicate == 1 and again.totals.applied == 0
    assert verified(shop)["duplicates_in_file"] == 1


def test_a_publish_no_binding_matches_is_kept_shown_and_republished(shop):
    setup_transports(shop)
    options = documented_options(shop)
    outcome = shop_publish(shop, {**options, "auto_setup": False}, events(6), routing_key="user.embedding.updated")
    assert all(line.startswith("ok ") for line in outcome)  # the broker took them: nothing tells the shop
    s = shop.settings()
    assert wait_for(lambda: queue_state(s, f"{QUEUE}.unrouted")[0] == 6, timeout=10, what="6 unrouted")
    assert queue_state(s, QUEUE)[0] == 0
    stats = json.loads(run_cli("stats", "--json", env=shop.subprocess_env()).stdout)
    [row] = [q for q in stats["queues"] if q["role"] == "unrouted"]
    assert row["ready"] == 6 and row["level"] == "warn" and "myshop unrouted show" in row["notes"][0]
    checks = json.loads(run_cli("preflight", "--json", env=shop.subprocess_env()).stdout)["checks"]
    [unrouted] = [c for c in checks if c["name"] == "unrouted"]
    assert unrouted["status"] == "WARN" and "myshop unrouted republish" in unrouted["fix"]
    shown = json.loads(run_cli("unrouted", "show", "--json", env=shop.subprocess_env()).stdout)
    assert shown["total"] == 6 and {m["routing_key"] for m in shown["messages"]} == {"user.embedding.updated"}
    assert queue_state(s, f"{QUEUE}.unrouted")[0] == 6  # showing consumed nothing
    moved = run_cli("unrouted", "republish", env=shop.subprocess_env())
    assert moved.returncode == 0 and "moved 6 message(s)" in moved.stdout
    assert consume(shop, 6).totals.applied == 6
    assert verified(shop)["events"] == 6


def test_a_running_shops_queue_is_adopted_then_migrated_while_the_shop_publishes(shop):
    s = shop.settings()
    # the shop as it runs today: its auto_setup made a classic queue without arguments, and it holds messages
    assert all(line.startswith("ok ") for line in shop_publish(shop, SHOP_TODAY, events(20)))
    steps = setup_transports(shop)
    assert steps[("queue", QUEUE)]["state"] == "adopted" and "configured quorum" in steps[("queue", QUEUE)]["detail"]
    assert documented_options(shop)["queues"][QUEUE]["arguments"] == {}  # what the live queue takes
    checks = json.loads(run_cli("preflight", "--json", env=shop.subprocess_env()).stdout)["checks"]
    [topology] = [c for c in checks if c["name"] == "topology"]
    assert topology["status"] == "WARN" and "--migrate" in topology["fix"]
    # the worker runs on the adopted queue meanwhile
    assert consume(shop, 8).totals.applied == 8
    # cutover: the shop stops declaring (auto_setup: false), keeps publishing; the workers are stopped
    publisher = shop_publish(shop, documented_options(shop, "--no-auto-setup"),
                             [{**e, "sleepMs": 40} for e in events(30, start=20)], background=True)
    assert wait_for(lambda: shop.record.read_text().count("\n") >= 25, timeout=20, what="the shop publishing")
    migrated = setup_transports(shop, "--migrate")
    assert migrated[("queue", QUEUE)]["state"] == "recreated"
    assert publisher.wait(timeout=60) == 0
    outcome = publisher.stdout.read().splitlines()
    assert len(outcome) == 30 and all(line.startswith("ok ") for line in outcome), outcome
    api = for_dsn(None, s.rabbitmq_dsn)
    assert api.queue(QUEUE).type == "quorum" and api.queue(f"{QUEUE}.migrating") is None
    assert wait_for(lambda: queue_state(s, QUEUE)[0] >= 42, timeout=10, what="every message in the new queue")
    assert queue_state(s, f"{QUEUE}.unrouted")[0] == 0
    # a message published in the instant both the old and the holding queue were bound has a copy in each
    queued = queue_state(s, QUEUE)[0]
    assert queued <= 43
    assert consume(shop, queued).totals.applied == 42
    report = verified(shop)
    assert report["events"] == 50 and report["events_lost"] == 0 and report["events_duplicated"] == 0
    # after the cutover the documented config (auto_setup: true, quorum) declares cleanly again
    assert documented_options(shop)["queues"][QUEUE]["arguments"] == {"x-queue-type": "quorum"}
    assert shop_publish(shop, documented_options(shop), events(1, start=60))[0].startswith("ok ")
    store = Store(s.mongodb_url, s.mongodb_db)
    assert store.users.count_documents({}) == 6
    store.close()


# the shop's failure transport as its messenger.yaml has it (`failure_transport: failed`)
SHOP_FAILED = {"auto_setup": True,
               "exchange": {"name": "failed", "type": "direct", "default_publish_routing_key": "failed"},
               "queues": {"failed": {"binding_keys": ["failed"]}}}


def test_the_handover_from_the_php_workers_in_the_order_of_docs_handover(shop):
    """docs/HANDOVER.md step by step, as far as the shop's side runs here: the shop as it runs today (a classic
    queue, events the PHP workers gave up on in its `failed` failure transport, put there by Symfony's own
    listeners), setup-transports, the shop on the printed config without auto_setup, what `failed` holds, the
    migration with no consumer attached, the workers, the PHP era's failures retried, the final config."""
    page = (ROOT / "docs" / "HANDOVER.md").read_text()
    order = ["`myshop setup-transports`", "`myshop messenger-config --no-auto-setup`", "`myshop failed show`",
             "**Stop the PHP consumers", "`myshop setup-transports --migrate`", "**Start myshop's workers",
             "`myshop failed retry --all`", "`myshop messenger-config` prints"]
    assert [page.index(step) for step in order] == sorted(page.index(step) for step in order)  # the test's order
    s = shop.settings()
    # before: the shop publishes with its own config; its worker sent 3 events to its failure transport
    assert all(x.startswith("ok ") for x in shop_publish(shop, SHOP_TODAY, events(10)))
    failed_events = events(3, start=10)
    done = subprocess.run([PHP, str(SCRIPT), f"{shop['RABBITMQ_DSN']}/{QUEUE}", json.dumps(SHOP_TODAY)],
                          input="".join(json.dumps(e) + "\n" for e in failed_events), capture_output=True, text=True,
                          env={"RECORD": str(shop.record), "PATH": "/usr/bin:/bin", "FAILED": json.dumps(SHOP_FAILED)},
                          timeout=60)
    assert done.returncode == 0 and done.stdout.count("ok ") == 3, done.stdout + done.stderr
    assert wait_for(lambda: queue_state(s, "failed")[0] == 3, timeout=10, what="3 in the shop's failed queue")
    # step 2: setup-transports adopts the shop's queue and its failed exchange and queue as they are
    steps = setup_transports(shop)
    assert steps[("queue", QUEUE)]["state"] == "adopted" and steps[("queue", "failed")]["state"] == "existing"
    # step 3: the shop on `messenger-config --no-auto-setup` (its failure transport renamed: not run here)
    no_setup = documented_options(shop, "--no-auto-setup")
    assert no_setup["auto_setup"] is False
    assert all(x.startswith("ok ") for x in shop_publish(shop, no_setup, events(5, start=13)))
    # step 4: what `failed` holds: the PHP era's failures, recorded from the queue, with their users
    shown = json.loads(run_cli("failed", "show", "--json", env=shop.subprocess_env()).stdout)
    assert shown["queue_count"] == 3 and len(shown["drift"]["recorded_from_queue"]) == 3
    assert sorted(m["user_id"] for m in shown["messages"]) == sorted(e["userId"] for e in failed_events)
    # steps 5-6: no consumer attached (the PHP workers stopped, myshop's not started): the migration
    assert queue_state(s, QUEUE)[1] == 0
    assert setup_transports(shop, "--migrate")[("queue", QUEUE)]["state"] == "recreated"
    assert for_dsn(None, s.rabbitmq_dsn).queue(QUEUE).type == "quorum"
    # step 7: the workers; step 8: the PHP era's failures retried through myshop
    assert consume(shop, 15).totals.applied == 15
    retried = run_cli("failed", "retry", "--all", "--force", env=shop.subprocess_env())
    assert retried.returncode == 0 and "retried 3 message(s)" in retried.stdout, retried.stdout + retried.stderr
    assert consume(shop, 3).totals.applied == 3
    assert queue_state(s, "failed")[0] == 0
    # step 9: the shop on the printed config again (auto_setup, the quorum queue's arguments)
    assert shop_publish(shop, documented_options(shop), events(1, start=18))[0].startswith("ok ")
    assert consume(shop, 1).totals.applied == 1
    report = verified(shop)
    assert report["events"] == 19 and report["events_lost"] == 0 and report["events_duplicated"] == 0
