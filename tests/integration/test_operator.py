"""Operator commands of issue 4 on real services: `stats`, `purge`, `preflight` — outputs, exit codes, failure
paths (service down, wrong topology, missing indexes, no consumer), JSON parsed, prompts on a real pty."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys

import pika
import pytest

from myshop_ops.adapters import broker
from myshop_ops.adapters.store import Store
from tests.support.events import seed_products
from tests.support.fake_openai import FakeOpenAI
from tests.support.services import RABBIT, ROOT, run_cli, wait_for
from tests.support.terminal import run_in_terminal
from tests.support.workers import prepare, queue_state, wait_queue

pytestmark = pytest.mark.integration

MGMT = os.environ.get("TEST_RABBITMQ_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672")
SECRET = "s3cretpw"  # a password that must never show up in any output


@pytest.fixture
def menv(env):
    """The test env with the management API configured."""
    env["RABBITMQ_MANAGEMENT_URL"] = MGMT
    return env


def fill(queue: str, n: int) -> None:
    """Put ``n`` small messages in ``queue``, each confirmed: without confirms a close right after the publishes
    left a quorum queue counting 2 of 4 for over 10 s on a loaded box."""
    conn = pika.BlockingConnection(pika.URLParameters(RABBIT))
    ch = conn.channel()
    ch.confirm_delivery()
    for i in range(n):
        ch.basic_publish("", queue, b"{}", pika.BasicProperties(message_id=str(i)))
    conn.close()


def stats_json(env, *args: str) -> tuple[dict, int]:
    done = run_cli("stats", "--json", *args, env=env.subprocess_env())
    assert done.stderr == "", done.stderr
    return json.loads(done.stdout), done.returncode


# ---- stats ----------------------------------------------------------------------------------------


def test_stats_reports_every_queue_of_the_topology(menv, topology):
    report, code = stats_json(menv)
    assert code == 0 and report["level"] == "ok" and report["management"] is True
    assert [(q["name"], q["role"]) for q in report["queues"]] == [
        (topology.queue, "main"), *((topology.retry_queue(i), "retry") for i in range(1, 4)),
        (topology.failed_queue, "failed"), (topology.unrouted, "unrouted")]
    assert all(q["ready"] == 0 and q["unacked"] == 0 and q["level"] == "ok" for q in report["queues"])
    plain = run_cli("stats", topology.queue, env=menv.subprocess_env())
    assert plain.stdout.splitlines() == [f"{topology.queue} ready=0 unacked=0 consumers=0 in=- out=- level=ok",
                                         "level=ok"]


def test_stats_json_of_a_missing_queue_is_json_too(menv, topology):
    missing = run_cli("stats", "no-such-queue", "--json", env=menv.subprocess_env())
    assert missing.returncode == 2 and json.loads(missing.stdout)["error"].startswith("queue 'no-such-queue' does not")


def test_stats_warns_without_consumer_and_is_critical_above_5000(menv, topology):
    fill(topology.queue, 1200)
    wait_queue(menv.settings(), topology.queue, messages=1200)
    report, code = stats_json(menv, topology.queue)
    [main] = report["queues"]
    assert code == 0 and main["level"] == "warn"
    assert main["notes"] == ["more than 1000 ready", "messages waiting with no consumer"]
    fill(topology.queue, 3900)
    wait_queue(menv.settings(), topology.queue, messages=5100)
    report, code = stats_json(menv)
    assert code == 1 and report["level"] == "critical"  # usable from cron: exit 1
    assert report["queues"][0]["notes"][0] == "more than 5000 ready"


def test_stats_sees_consumers_and_unacked_messages(menv, topology):
    fill(topology.queue, 5)
    conn = pika.BlockingConnection(pika.URLParameters(RABBIT))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=3)
    held = []
    ch.basic_consume(topology.queue, lambda c, m, p, b: held.append(m.delivery_tag))
    wait_for(lambda: conn.process_data_events(0.1) or len(held) == 3, timeout=10, what="3 deliveries")

    def settled():
        report, _ = stats_json(menv, topology.queue)
        return report["queues"][0] if report["queues"][0]["unacked"] == 3 else None

    main = wait_for(settled, timeout=20, interval=0.5, what="the management API to count 3 unacked")
    assert (main["ready"], main["consumers"], main["level"]) == (2, 1, "ok")
    conn.close()


def test_stats_failure_paths_are_one_line(menv, topology):
    unknown = run_cli("stats", "no.such.queue", env=menv.subprocess_env())
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "no.such.queue" in unknown.stderr and topology.queue in unknown.stderr
    down = run_cli("stats", env=menv.subprocess_env(RABBITMQ_DSN=f"amqp://guest:{SECRET}@127.0.0.1:1/%2f"))
    assert down.returncode == 3 and down.stderr.count("\n") == 1 and "Traceback" not in down.stderr
    assert "RabbitMQ unreachable" in down.stderr and "127.0.0.1:1" in down.stderr and SECRET not in down.stderr
    no_api = run_cli("stats", "--json", env=menv.subprocess_env(
        RABBITMQ_MANAGEMENT_URL=f"http://guest:{SECRET}@127.0.0.1:1"))
    assert no_api.returncode == 0 and "management API" in no_api.stderr and SECRET not in no_api.stderr
    report = json.loads(no_api.stdout)
    assert report["management"] is False and report["queues"][0]["unacked"] is None


def test_stats_missing_topology_is_critical(menv):
    report, code = stats_json(menv)
    assert code == 1 and report["level"] == "critical"
    assert all(q["notes"] == ["missing: run `myshop setup-transports`"] for q in report["queues"])


def test_stats_watch_refreshes_until_interrupted(menv, topology):
    proc = subprocess.Popen([sys.executable, "-m", "myshop_ops", "stats", topology.queue, "--json", "--watch", "0.5"],
                            env=menv.subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = json.loads(proc.stdout.readline())
        fill(topology.queue, 7)
        seen = [first]
        while seen[-1]["queues"][0]["ready"] != 7:  # each refresh is a new snapshot (bounded by the timeout)
            seen.append(json.loads(proc.stdout.readline()))
            assert len(seen) < 40, seen[-1]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0  # a bound, not a pause: it exits as soon as it sees the flag
    finally:
        proc.kill()
    assert first["queues"][0]["ready"] == 0 and len(seen) >= 2


def test_stats_watch_on_a_terminal_refreshes_in_place_every_2s_by_default(menv, topology):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "myshop_ops", "stats", topology.queue, "--watch"],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                            env={**menv.subprocess_env(), "TERM": "xterm", "COLUMNS": "100"})
    os.close(slave)
    output = b""
    try:
        while output.count(b"queues: OK") < 2:  # two renders: the first and the refresh 2 s later
            ready, _, _ = select.select([master], [], [], 10)
            assert ready, f"no refresh within 10 s: {output!r}"
            output += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0  # a bound, not a pause: it exits as soon as it sees the flag
    finally:
        proc.kill()
        os.close(master)
    assert b"\x1b[" in output and b"Traceback" not in output  # cursor movements: redrawn in place


# ---- purge ----------------------------------------------------------------------------------------


def test_purge_refuses_without_terminal_and_dry_run_changes_nothing(env, topology):
    fill(topology.queue, 4)
    wait_queue(env.settings(), topology.queue, messages=4)
    refused = run_cli("purge", topology.queue, env=env.subprocess_env())
    assert refused.returncode == 2 and "without a terminal" in refused.stderr and "--force" in refused.stderr
    dry = run_cli("purge", topology.queue, "--dry-run", "--json", env=env.subprocess_env())
    assert dry.returncode == 0
    assert json.loads(dry.stdout) == {"queue": topology.queue, "ready": 4, "consumers": 0, "records": None,
                                      "dry_run": True, "purged": 0, "records_deleted": 0}
    assert queue_state(env.settings(), topology.queue) == (4, 0)
    forced = run_cli("purge", topology.queue, "--force", env=env.subprocess_env())
    assert forced.returncode == 0 and f"purged 4 message(s) from '{topology.queue}'" in forced.stdout
    assert queue_state(env.settings(), topology.queue) == (0, 0)
    unknown = run_cli("purge", "nope.queue", "--force", env=env.subprocess_env())
    assert unknown.returncode == 2 and "'nope.queue' does not exist" in unknown.stderr


def test_purge_asks_for_the_queue_name_on_a_terminal(env, topology):
    fill(topology.queue, 3)
    wait_queue(env.settings(), topology.queue, messages=3)
    wrong = run_in_terminal("purge", topology.queue, env=env.subprocess_env(), typed="failed\n")
    assert wrong.returncode == 1 and "Type the queue name" in wrong.output and "nothing purged" in wrong.output
    assert queue_state(env.settings(), topology.queue) == (3, 0)
    right = run_in_terminal("purge", topology.queue, env=env.subprocess_env(), typed=topology.queue + "\n")
    assert right.returncode == 0 and "purged 3 message(s)" in right.output
    assert queue_state(env.settings(), topology.queue) == (0, 0)


def test_purging_the_failed_queue_clears_its_records(env, topology):
    from myshop_ops.core.limits import Limits
    from myshop_ops.core.worker import Worker
    from tests.support.events import publish

    publish(env.settings(), topology, [b"not json", b"{}", b"[1]"], message_ids=False)
    worker = Worker(env.settings(), limits=Limits(messages=3, seconds=30))
    worker.run()
    assert worker.totals.failed == 3
    store = Store(env.settings().mongodb_url, env.settings().mongodb_db)
    wait_queue(env.settings(), topology.failed_queue, messages=3)
    assert store.failed.count_documents({}) == 3
    done = run_cli("purge", topology.failed_queue, "--force", "--json", env=env.subprocess_env())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["purged"] == 3 and json.loads(done.stdout)["records_deleted"] == 3
    assert store.failed.count_documents({}) == 0 and queue_state(env.settings(), topology.failed_queue)[0] == 0
    shown = json.loads(run_cli("failed", "show", "--json", env=env.subprocess_env()).stdout)
    assert shown["drift"] == {"recorded_from_queue": [], "orphan_records": []}


# ---- preflight ------------------------------------------------------------------------------------


def preflight(env, *args: str, **overrides: str) -> tuple[dict[tuple[str, str], dict], int, str]:
    done = run_cli("preflight", "--json", *args, env=env.subprocess_env(**overrides))
    assert "Traceback" not in done.stderr, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] == (done.returncode == 0)
    return {(c["section"], c["name"]): c for c in out["checks"]}, done.returncode, done.stdout + done.stderr


def test_preflight_passes_on_a_prepared_deployment(menv, topology):
    seed_products(menv.settings(), ["p1", "p2"])
    checks, code, _ = preflight(menv)
    assert code == 0, [c for c in checks.values() if c["status"] == "FAIL"]
    for key in [("config", "variables"), ("packages", "versions"), ("mongodb", "reachable"), ("mongodb", "indexes"),
                ("mongodb", "product vectors"), ("rabbitmq", "reachable"), ("rabbitmq", "topology"),
                ("rabbitmq", "bindings"), ("rabbitmq", "depth"), ("rabbitmq", "failed"), ("redis", "reachable"),
                ("provider", "one embedding")]:
        assert checks[key]["status"] == "PASS", checks[key]
    assert checks[("rabbitmq", "consumers")]["status"] == "WARN"  # no worker attached yet
    assert "myshop consume" in checks[("rabbitmq", "consumers")]["fix"]
    offline, _, _ = preflight(menv, "--offline")
    assert offline[("provider", "one embedding")]["status"] == "SKIP"


def test_preflight_reports_missing_indexes_and_topology_without_creating_them(env):
    s = env.settings()
    checks, code, _ = preflight(env)
    assert code == 1
    assert checks[("mongodb", "indexes")]["status"] == "FAIL" and checks[("mongodb", "indexes")]["fix"] == \
        "myshop setup-indexes"
    topo = checks[("rabbitmq", "topology")]
    assert topo["status"] == "FAIL" and topo["fix"] == "myshop setup-transports"
    assert f"queue {s.queue}: missing" in topo["detail"] and f"exchange {s.queue}.unrouted: missing" in topo["detail"]
    conn = broker.connect(s.rabbitmq_dsn)
    assert broker.queue_depth(conn, s.queue) is None  # preflight changed nothing
    conn.close()
    assert Store(s.mongodb_url, s.mongodb_db).missing_indexes()


def test_preflight_catches_a_queue_declared_differently(env):
    classic = env.settings(RABBITMQ_QUEUE_TYPE="classic")
    prepare(classic)  # the broker has a classic queue; the configuration says quorum
    checks, _, _ = preflight(env)
    topo = checks[("rabbitmq", "topology")]
    assert topo["status"] == "WARN"  # the worker runs on it; the delivery limit is what is missing
    assert f"queue {env['RABBITMQ_QUEUE']}: adopted (classic; configured quorum" in topo["detail"]
    assert "setup-transports --migrate" in topo["fix"]


def test_preflight_with_services_down_names_each_and_masks_passwords(env):
    checks, code, output = preflight(
        env, RABBITMQ_DSN=f"amqp://guest:{SECRET}@127.0.0.1:1/%2f",
        MONGODB_URL=f"mongodb://app:{SECRET}@127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=500",
        REDIS_URL=f"redis://:{SECRET}@127.0.0.1:1/0")
    assert code == 1 and SECRET not in output
    for section in ("mongodb", "rabbitmq", "redis"):
        assert checks[(section, "reachable")]["status"] == "FAIL" and "127.0.0.1:1" in checks[(section, "reachable")][
            "detail"]


def test_preflight_catches_prod_placeholders_and_guest(env):
    prod = {"APP_ENV": "prod", "EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "sk-...",
            "REDIS_URL": "redis://127.0.0.1:6379/0"}
    checks, code, output = preflight(env, "--offline", **prod)
    assert code == 1 and "sk-..." not in output
    assert checks[("config", "OPENAI_API_KEY")]["status"] == "FAIL"
    assert checks[("config", "RABBITMQ_DSN")]["detail"].endswith("uses guest/guest in prod")
    assert "set_permissions -p / myshop" in checks[("config", "RABBITMQ_DSN")]["fix"]
    # .env.example's placeholder key does not matter to an offline provider
    offline, _, _ = preflight(env, "--offline", OPENAI_API_KEY="sk-...", EMBEDDING_PROVIDER="hash")
    assert ("config", "OPENAI_API_KEY") not in offline
    bad = run_cli("preflight", env=env.subprocess_env(WORKER_MAX_RETRIES="99"))
    assert bad.returncode == 1 and "FAIL config" in " ".join(bad.stdout.split()) and "WORKER_MAX_RETRIES" in bad.stdout
    assert "SKIP services" in " ".join(bad.stdout.split())


def test_preflight_provider_check_uses_the_real_sdk(menv, topology, fake_openai: FakeOpenAI):
    fake_openai.clear()
    openai = {"EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": fake_openai.base_url,
              "EMBEDDING_DIMENSIONS": "1536"}
    checks, _, _ = preflight(menv, **openai)
    assert checks[("provider", "one embedding")]["status"] == "PASS" and len(fake_openai.requests) == 1
    checks, code, output = preflight(menv, **{**openai, "OPENAI_API_KEY": "wrong-key"})
    assert code == 1 and checks[("provider", "one embedding")]["status"] == "FAIL" and "wrong-key" not in output


@pytest.mark.parametrize(("mode", "status", "fix"), [
    (0o640, "PASS", None),  # the checklist's 0640 root:myshop: the service user reads it through its group
    (0o600, "PASS", None),
    (0o644, "WARN", "chmod o-rwx"),
    (0o660, "FAIL", "chmod g-w,o-rwx"),
    (0o602, "FAIL", "chmod g-w,o-rwx"),
])
def test_settings_file_modes_and_fixes_that_keep_the_group_reading(tmp_path, mode, status, fix):
    from myshop_ops.tools.preflight import _settings_file_mode

    path = tmp_path / "myshop.env"
    path.write_text("APP_ENV=test\n")
    path.chmod(mode)
    check = _settings_file_mode(path)
    assert check.status == status and check.fix == (f"{fix} {path}" if fix else None)
    assert f"{mode:04o}" in check.detail
    if fix:  # the fix never takes read away from the owner or the group
        assert "u-" not in fix and "g-r" not in fix and "600" not in fix


def test_preflight_flags_an_env_file_readable_by_others(env, tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LOG_FORMAT=console\n")
    dotenv.chmod(0o644)
    done = subprocess.run([sys.executable, "-m", "myshop_ops", "--env-file", str(dotenv), "preflight", "--json",
                           "--offline"], env={**env.subprocess_env()}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    check = {(c["section"], c["name"]): c for c in json.loads(done.stdout)["checks"]}[("security", ".env")]
    assert check["status"] == "WARN" and check["fix"] == f"chmod o-rwx {dotenv}"
    dotenv.chmod(0o600)
    done = subprocess.run([sys.executable, "-m", "myshop_ops", "preflight", "--json", "--offline"],
                          env={**env.subprocess_env(MYSHOP_ENV_FILE=str(dotenv))}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    check = {(c["section"], c["name"]): c for c in json.loads(done.stdout)["checks"]}[("security", ".env")]
    assert check["status"] == "PASS"
