"""Hostile input (issue 18): messages whose headers a publisher forged. No header crashes a worker, steers its
retries or reaches a failed record unchecked; every valid neighbour is still applied. Real RabbitMQ, Redis and the
Mongo-wire server; in-process workers, each run of which must end with exit code 0."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import UTC

import pika
import pika.data
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import InvalidMessage, make_event, parse, serialise
from myshop_ops.base.exit_codes import EXIT_OK
from myshop_ops.core.limits import Limits
from myshop_ops.core.retry_routing import (
    H_FAILURE_ID,
    H_FIRST_FAILURE,
    H_HISTORY,
    H_IGNORED,
    H_RETRY_COUNT,
    failure_record,
    route,
)
from myshop_ops.core.worker import Worker
from myshop_ops.tools.verify import UserCheck, Verification
from tests.support.events import T0, seed_products
from tests.support.services import run_cli

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]


class Raw:
    """A header value sent as these exact AMQP field bytes (type tag included): what pika itself would never
    encode, but any other client may."""

    def __init__(self, data: bytes):
        self.data = data


@contextmanager
def raw_fields():
    original = pika.data.encode_value

    def encode(pieces, value):
        if isinstance(value, Raw):
            pieces.append(value.data)
            return len(value.data)
        return original(pieces, value)

    pika.data.encode_value = encode
    try:
        yield
    finally:
        pika.data.encode_value = original


def publish_raw(settings, topo, messages: list[tuple[bytes, str, dict | None]], **props) -> None:
    """Publish (body, message_id, headers) triples to the main exchange with confirms."""
    conn = broker.connect(settings.rabbitmq_dsn)
    ch = conn.channel()
    ch.confirm_delivery()
    with raw_fields():
        for body, mid, headers in messages:
            ch.basic_publish(topo.exchange, topo.queue, body, pika.BasicProperties(
                message_id=mid, delivery_mode=2, content_type="application/json", headers=headers, **props))
    conn.close()


def failed_queue(settings, topo) -> dict[str, tuple[dict, bytes]]:
    """message_id -> (headers, body) of every message in the failed queue (all left in it)."""
    conn = broker.connect(settings.rabbitmq_dsn)
    ch = conn.channel()
    out = {}
    while (got := ch.basic_get(topo.failed_queue, auto_ack=False))[0] is not None:
        out[got[1].message_id] = (got[1].headers or {}, got[2])
    conn.close()
    return out


def run_workers_until(settings, condition, timeout: float = 60.0) -> None:
    """In-process workers (1 s each) until ``condition(store)`` holds; each must stop with exit code 0."""
    store = Store(settings.mongodb_url, settings.mongodb_db)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            code = Worker(settings, limits=Limits(seconds=1), store=store).run()
            assert code == EXIT_OK, f"the worker exited with {code}"
            if condition(store):
                return
        raise AssertionError("condition not reached")
    finally:
        store.close()


def neighbours(tag: str, n: int) -> list[tuple[bytes, str, None]]:
    events = [make_event(f"{tag}-n{i}", "product_view", "p1", T0.replace(minute=i)) for i in range(n)]
    return [(serialise(e), e.message_id, None) for e in events]


def applied_users(store: Store) -> set[str]:
    return {d["user_id"] for d in store.users.find({}, {"user_id": 1})}


HOSTILE_HEADERS = {
    # crash loops of issue 18: pika could not encode the count again / fromisoformat raised on the record
    "huge retry count string": {H_RETRY_COUNT: "1000000000000000000000000000000"},
    "huge retry count int": {H_RETRY_COUNT: 2**62},
    "garbage first failure": {H_FIRST_FAILURE: "garbage"},
    "first failure a number": {H_FIRST_FAILURE: 12},
    "first failure naive": {H_FIRST_FAILURE: "2026-01-01T00:00:00"},
    "first failure far future": {H_FIRST_FAILURE: "9999-01-01T00:00:00+00:00"},
    # pika raised OverflowError decoding it: the connection died at every delivery
    "timestamp header out of range": {"x-when": Raw(b"T" + struct.pack(">Q", 2**64 - 1))},
    "history without at": {H_HISTORY: json.dumps([{"error_class": "X", "error_message": "forged"}])},
    "history not a list": {H_HISTORY: json.dumps({"at": 1})},
    "history of junk": {H_HISTORY: json.dumps([1, None, "x", {"at": 5, "error_class": [], "error_message": {}}])},
    "history binary": {H_HISTORY: b"\xff\xfe"},
    "published-at junk": {"x-published-at": "yesterday"},
    "published-at negative": {"x-published-at": -1},
    "published-at far future": {"x-published-at": 2**62},
    "published-at boolean": {"x-published-at": True},
}


def test_hostile_headers_on_invalid_bodies_are_ignored_and_recorded(env, topology):
    """Each forged header rides on an invalid body (straight to `failed`) between valid neighbours, all in one
    batch: the worker never exits, each lands in `failed` once with a record, the malformed header named in
    x-ignored-headers and never copied."""
    s = env.settings()
    seed_products(s, ["p1"])
    tag = topology.queue.split(".")[0]
    hostile = [(b"not json", f"{tag}-{i}", h) for i, h in enumerate(HOSTILE_HEADERS.values())]
    fine = neighbours(tag, 4)
    publish_raw(s, topology, [*fine[:2], *hostile, *fine[2:]])
    run_workers_until(s, lambda st: st.failed.count_documents({}) == len(hostile) and len(applied_users(st)) == 4)

    queued = failed_queue(s, topology)
    assert set(queued) == {mid for _, mid, _ in hostile}
    store = Store(s.mongodb_url, s.mongodb_db)
    for (kind, forged), (_, mid, _) in zip(HOSTILE_HEADERS.items(), hostile, strict=True):
        headers, _ = queued[mid]
        [(name, value)] = forged.items()
        assert headers[H_RETRY_COUNT] == 0, kind  # an invalid body is never retried, whatever the count said
        assert name in headers.get(H_IGNORED, ""), (kind, headers)
        assert name not in headers if isinstance(value, Raw) else headers.get(name) != value, (kind, headers)
        entries = json.loads(headers[H_HISTORY])
        assert [e["error_class"] for e in entries] == ["InvalidMessage"], (kind, entries)
        record = store.failed.find_one({"message_id": mid})
        assert record is not None and record["error_class"] == "InvalidMessage", kind
        assert record["first_failure_at"].year >= 2026 and record["retry_count"] == 0, (kind, record)
    store.close()


def test_a_forged_retry_count_never_steers_the_retries(env, topology, fake_openai):
    """A transient failure whose x-retry-count is negative (used to route to `.retry.-4`: unroutable, taken for a
    lost connection), past the maximum (used to skip every retry) or not a number goes through all its retries
    like any other message, then to `failed`."""
    s = env.settings(EMBEDDING_PROVIDER="openai", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake_openai.base_url,
                     EMBEDDING_DIMENSIONS="1536")
    seed_products(s, ["p1"])
    fake_openai.clear()
    fake_openai.fail_next(503, retry_after_ms=1, times=100_000)
    tag = topology.queue.split(".")[0]
    counts = {"negative": -5, "past the maximum": 99, "text": "abc", "boolean": True, "huge": "9" * 40}
    searches = [make_event(f"{tag}-s{i}", "search", f"phrase {i}", T0) for i in range(len(counts))]
    forged = [(serialise(e), e.message_id, {H_RETRY_COUNT: c}) for e, c in zip(searches, counts.values(),
                                                                             strict=True)]
    publish_raw(s, topology, [*neighbours(tag, 2), *forged])
    run_workers_until(s, lambda st: st.failed.count_documents({}) == len(forged), timeout=90)
    fake_openai.clear()

    queued = failed_queue(s, topology)
    store = Store(s.mongodb_url, s.mongodb_db)
    assert applied_users(store) == {f"{tag}-n0", f"{tag}-n1"}
    for kind, (_, mid, _) in zip(counts, forged, strict=True):
        headers, _ = queued[mid]
        assert headers[H_RETRY_COUNT] == 3, (kind, headers)
        assert headers["x-error-message"].startswith("gave up after 3 retries"), (kind, headers)
        assert H_RETRY_COUNT in headers[H_IGNORED], (kind, headers)
        assert len(store.failed.find_one({"message_id": mid})["history"]) == 4, kind
    store.close()


def test_a_forged_publish_time_is_ignored_and_the_event_applied(env, topology):
    """x-published-at and the AMQP timestamp feed the latency histogram: out of range or of another type, they are
    ignored and the event is applied like any other."""
    s = env.settings()
    seed_products(s, ["p1"])
    tag = topology.queue.split(".")[0]
    values = ["soon", -1, 2**62, True, None]
    events = [make_event(f"{tag}-p{i}", "product_view", "p1", T0) for i in range(len(values))]
    publish_raw(s, topology, [(serialise(e), e.message_id, {"x-published-at": v})
                              for e, v in zip(events, values, strict=True)], timestamp=2**64 - 1)
    run_workers_until(s, lambda st: len(applied_users(st)) == len(events))
    assert Store(s.mongodb_url, s.mongodb_db).failed.count_documents({}) == 0


# ---- secrets in URLs, settings from the current directory -------------------------------------------------------

SECRET_URLS = [
    ("RABBITMQ_DSN", "amqp://secprobe:pa55/w0rd@127.0.0.1:1/%2f", "pa55/w0rd"),
    ("RABBITMQ_DSN", "amqp://secprobe:pa?s#s,word@127.0.0.1:1/%2f", "s,word"),
    ("MONGODB_URL", "mongodb://u:pa55/w0rd@127.0.0.1:1/?serverSelectionTimeoutMS=300", "pa55/w0rd"),
    ("MONGODB_URL", "mongodb://127.0.0.1:1,127.0.0.1:2/?serverSelectionTimeoutMS=300"
                    "&tlsCertificateKeyFilePassword=k3ysecret", "k3ysecret"),
    ("REDIS_URL", "redis://127.0.0.1:1/0?password=r3dissecret", "r3dissecret"),
    ("REDIS_URL", "redis://:r3d/is@127.0.0.1:1/0", "r3d/is"),
]


@pytest.mark.parametrize(("var", "url", "secret"), SECRET_URLS)
def test_no_command_prints_a_secret_of_any_form_of_url(env, topology, var, url, secret):
    """Unencoded reserved characters in a password, secrets in the query string, host lists: whether the URL is
    invalid or its service unreachable, no output of any command holds the secret."""
    sub = env.subprocess_env(**{var: url})
    for args in (("failed", "show", "--json"), ("stop-workers",), ("preflight", "--offline", "--json"),
                 ("user", "show", "nobody")):
        done = run_cli(*args, env=sub, timeout=60)
        out = done.stdout + done.stderr
        assert secret not in out, (args, out)
        assert "Traceback" not in out, (args, out)


def test_settings_never_come_from_the_current_directory(env, topology, tmp_path):
    """A `.env` in the directory the operator stands in is not read (it could point OPENAI_BASE_URL at a listener
    that collects the API key); an explicit --env-file or MYSHOP_ENV_FILE is, and a missing one is one line."""
    (tmp_path / ".env").write_text("LOG_FORMAT=hostile\n")
    sub = env.subprocess_env()
    sub.pop("LOG_FORMAT")

    def cli(*args: str, **extra: str):
        return subprocess.run([sys.executable, "-m", "myshop_ops", *args], env={**sub, **extra}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    assert cli("failed", "show", "--json").returncode == 0
    explicit = cli("--env-file", str(tmp_path / ".env"), "failed", "show", "--json")
    assert explicit.returncode == 2 and "LOG_FORMAT='hostile' is invalid" in explicit.stderr
    assert cli("failed", "show", "--json", MYSHOP_ENV_FILE=".env").returncode == 2
    missing = cli("--env-file=nowhere.env", "failed", "show")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "MYSHOP_ENV_FILE='nowhere.env'" in \
        missing.stderr


def test_preflight_fails_a_settings_file_others_can_write(env, tmp_path):
    settings_file = tmp_path / "myshop.env"
    settings_file.write_text("LOG_FORMAT=console\n")
    # writable by others: FAIL (whoever writes it chooses the settings); readable rules: tests/integration/test_operator
    for mode, status in ((0o602, "FAIL"), (0o620, "FAIL"), (0o622, "FAIL"), (0o600, "PASS")):
        settings_file.chmod(mode)
        done = run_cli("preflight", "--json", "--offline", env=env.subprocess_env(MYSHOP_ENV_FILE=str(settings_file)))
        check = {(c["section"], c["name"]): c for c in json.loads(done.stdout)["checks"]}[("security", ".env")]
        assert check["status"] == status, (oct(mode), check)


# ---- the operator's terminal ----------------------------------------------------------------------------------

OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x1b\\"  # sets the clipboard of a terminal that prints it
RAW_CONTROL = ("\x1b", "\x9b", "\x07")


def raw_control(text: str) -> list[str]:
    return [c for c in RAW_CONTROL if c in text]


@pytest.mark.parametrize("field", ["user_id", "product_id", "search_phrase"])
@pytest.mark.parametrize("bad", ["\x1b[31m", "\x9b31m", "\x00", "\n12:00:00 ERROR forged", OSC52, "\u202etxt.exe",
                                 "\x7f"])
def test_the_contract_refuses_control_characters(field, bad):
    if field == "search_phrase" and bad.startswith("\n"):
        bad = "\x1b" + bad  # a phrase may hold newlines (see below), never ESC
    event_type, ref = ("search", "shoes") if field == "search_phrase" else ("product_view", "p1")
    doc = json.loads(serialise(make_event("u1", event_type, ref, T0)))
    doc[field] = doc[field] + bad
    with pytest.raises(InvalidMessage, match=f"{field}: must not contain control characters"):
        parse(json.dumps(doc).encode())


def test_a_search_phrase_may_hold_tabs_and_newlines():
    doc = json.loads(serialise(make_event("u1", "search", "shoes", T0)))
    doc["search_phrase"] = "red\tshoes\nsize 42"
    assert parse(json.dumps(doc).encode()).search_phrase == "red\tshoes\nsize 42"


def test_failed_tooling_shows_hostile_text_escaped_and_never_as_markup(env, topology):
    """Bodies, ids, event types and headers built to attack the terminal (ESC, 8-bit CSI, OSC 52, rich markup that
    used to raise MarkupError or become a link, a forged history entry without `at`) in `failed show`, its table,
    one record in full, and --json: every command exits 0, prints no raw control character, shows markup
    literally."""
    s = env.settings()
    tag = topology.queue.split(".")[0]
    bodies = [
        (json.dumps({"user_id": "u" + OSC52, "event_type": "[/x]"}).encode(), f"{tag}-osc", None),
        (json.dumps({"user_id": "[link=https://evil.example]click[/link]", "event_type": "[bold red]x"}).encode(),
         f"{tag}-markup", None),
        ("plain \x1b[2J\x9b31m text [/x]".encode(), f"{tag}-raw", {"x-note": "\x1b]0;title\x07"}),
        (b"not json", f"{tag}-forged-history", {H_HISTORY: json.dumps([{"error_class": "X", "error_message": 1}])}),
    ]
    publish_raw(s, topology, bodies)
    run_workers_until(s, lambda st: st.failed.count_documents({}) == len(bodies))
    sub = env.subprocess_env(COLUMNS="300")  # no cell cut short
    table = run_cli("failed", "show", env=sub)
    assert table.returncode == 0 and not raw_control(table.stdout + table.stderr), table.stdout + table.stderr
    assert "[/x]" in " ".join(table.stdout.split()) and "[bold red]x" in " ".join(table.stdout.split())
    assert json.loads(run_cli("failed", "show", "--json", env=sub).stdout)["record_count"] == len(bodies)
    for _, mid, _ in bodies:
        one = run_cli("failed", "show", mid, env=sub)
        assert one.returncode == 0 and not raw_control(one.stdout + one.stderr), (mid, one.stdout, one.stderr)
    raw = run_cli("failed", "show", f"{tag}-raw", env=sub).stdout
    assert "\\x1b[2J\\x9b31m text [/x]" in raw and "x-note: \\x1b]0;title\\x07" in raw
    markup = run_cli("failed", "show", f"{tag}-markup", env=sub).stdout
    assert "[link=https://evil.example]click[/link]" in markup


def test_recommend_and_user_show_render_hostile_catalog_text_literally(env, topology):
    """Product ids, names and categories in the store (the shop's sync or an import wrote them) with OSC 52, 8-bit
    CSI and rich markup: `recommend` and `user show` print them escaped and literal; a user id of markup is an
    error line, not a traceback."""
    s = env.settings()
    vectors = seed_products(s, ["p1"])
    hostile = [("h-osc" + OSC52, "clipboard", "c"), ("h-link", "[link=https://evil.example]click[/link]", "[/x]"),
               ("h-csi", "\x9b31mred", "[bold red]styled")]
    store = Store(s.mongodb_url, s.mongodb_db)
    store.upsert_products([{"product_id": pid, "embedding": vectors["p1"], "model": s.model,
                            "dimensions": s.embedding_dimensions, "name": name, "category": category}
                           for pid, name, category in hostile])
    store.close()
    tag = topology.queue.split(".")[0]
    user = f"{tag}-viewer"
    publish_raw(s, topology, [(serialise(e), e.message_id, None)
                              for e in [make_event(user, "product_view", "p1", T0)]])
    run_workers_until(s, lambda st: user in applied_users(st))
    sub = env.subprocess_env(COLUMNS="300")  # no cell cut short
    for args in (("recommend", user), ("user", "show", user)):
        done = run_cli(*args, env=sub)
        text = " ".join(done.stdout.split())
        assert done.returncode == 0 and not raw_control(done.stdout + done.stderr), (args, done.stdout, done.stderr)
        assert "[link=https://evil.example]click[/link]" in text, text
        assert "\\x9b31mred" in text and "[/x]" in text, text
    for args in (("recommend", "[/x]", "--json"), ("user", "show", "[/x]"), ("recommend", "[/x]")):
        done = run_cli(*args, env=sub)
        assert "Traceback" not in done.stderr and "MarkupError" not in done.stderr, (args, done.stderr)


def test_console_log_lines_cannot_be_forged_and_json_lines_carry_no_raw_c1():
    """LOG_FORMAT=console: a field or message holding a newline stays on its line; json: C1 characters escaped."""
    import logging

    from myshop_ops.adapters.logs import ConsoleFormatter, JsonFormatter

    record = logging.makeLogRecord({"msg": "message failed %s", "args": ("a\x1b[2Jb",), "levelname": "ERROR",
                                    "user_id": "u\n12:00:00 ERROR   forged line", "error": "x\x9by\u2028z"})
    line = ConsoleFormatter().format(record)
    assert "\n" not in line and not raw_control(line) and "\u2028" not in line
    assert 'user_id="u\\\\n12:00:00 ERROR   forged line"' in line
    doc = JsonFormatter().format(record)
    assert "\x9b" not in doc and "\u2028" not in doc and json.loads(doc)["error"] == "x\x9by\u2028z"


# ---- failed-message tooling, the metrics port ------------------------------------------------------------------

def test_failed_tooling_survives_any_header_name(env, topology):
    """Header names MongoDB refuses or interprets (NUL, a leading `$`, dots) used to lose the batch's records and
    break every later `failed show`: stored escaped, shown, and each message removable."""
    s = env.settings()
    tag = topology.queue.split(".")[0]
    hostile = [(b"not json", f"{tag}-nul", {"a\x00b": "x"}), (b"not json", f"{tag}-dollar", {"$where": "sleep(1)"}),
               (b"not json", f"{tag}-dots", {"a.b.c": 1, "$set": {"x": 1}})]
    publish_raw(s, topology, hostile)
    run_workers_until(s, lambda st: st.failed.count_documents({}) == len(hostile))
    sub = env.subprocess_env()
    listed = run_cli("failed", "show", "--json", env=sub)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["drift"] == {"recorded_from_queue": [], "orphan_records": []}
    store = Store(s.mongodb_url, s.mongodb_db)
    headers = {r["message_id"]: r["headers"] for r in store.failed.find({}, {"message_id": 1, "headers": 1})}
    store.close()
    assert headers[f"{tag}-nul"]["a\\x00b"] == "x" and headers[f"{tag}-dollar"]["\\u0024where"] == "sleep(1)"
    assert headers[f"{tag}-dots"]["a\\u002eb\\u002ec"] == 1
    for _, mid, _ in hostile:
        assert run_cli("failed", "show", mid, env=sub).returncode == 0
    removed = run_cli("failed", "remove", *(mid for _, mid, _ in hostile), "--force", env=sub)
    assert removed.returncode == 0 and f"removed {len(hostile)} message(s)" in removed.stdout, removed.stdout


def test_failed_remove_of_an_unknown_id_and_a_huge_since_are_one_line_errors(env, topology):
    sub = env.subprocess_env()
    gone = run_cli("failed", "remove", "no-such-id", "--force", env=sub)
    assert gone.returncode == 1 and "removed 0 message(s)" in gone.stdout and "no-such-id" in gone.stderr
    for since in ("99999999999999999999d", "9999999999w"):
        done = run_cli("failed", "show", "--since", since, env=sub)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def test_the_metrics_port_binds_localhost_and_bounds_idle_connections(monkeypatch):
    """Idle connections (372 held 377 threads) are capped at MAX_CONNECTIONS (each new one takes the slot of the
    oldest) and dropped after the request deadline; the server binds 127.0.0.1 unless told."""
    import socket
    import urllib.request

    from myshop_ops.adapters import metrics
    from myshop_ops.adapters.metrics import Metrics, serve
    from tests.support.services import wait_for

    monkeypatch.setattr(metrics, "REQUEST_DEADLINE_S", 1.0)
    server = serve(Metrics(), 0)
    host, port = server.server_address
    assert host == "127.0.0.1"
    serving = server.connections

    idle = [socket.create_connection((host, port)) for _ in range(3 * metrics.MAX_CONNECTIONS)]
    try:
        wait_for(lambda: serving() >= metrics.MAX_CONNECTIONS, timeout=5, what="the idle connections served")
        assert serving() <= metrics.MAX_CONNECTIONS < len(idle)
        wait_for(lambda: serving() == 0, timeout=10, what="idle connections timed out")
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as reply:
            assert reply.status in (200, 503)
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()


def test_two_failed_messages_with_one_message_id_keep_two_records(env, topology):
    """Two different bodies published with the same AMQP message_id both fail: two messages in `failed`, two records
    (each keyed by the x-failure-id of its copy), no drift; each is shown and removed by its failure id, and the
    message id names both."""
    s = env.settings()
    tag = topology.queue.split(".")[0]
    mid = f"{tag}-shared"
    publish_raw(s, topology, [(b"not json 1", mid, None), (b"not json 2", mid, None), (b"not json 3", mid, None)])
    run_workers_until(s, lambda st: st.failed.count_documents({}) == 3)
    queued = failed_queue_list(s, topology)
    assert len({h[H_FAILURE_ID] for h, _ in queued}) == 3
    sub = env.subprocess_env()
    listed = json.loads(run_cli("failed", "show", "--json", env=sub).stdout)
    assert listed["queue_count"] == listed["record_count"] == 3
    assert listed["drift"] == {"recorded_from_queue": [], "orphan_records": []}
    first = queued[0][0][H_FAILURE_ID]
    one = json.loads(run_cli("failed", "show", first, "--json", env=sub).stdout)
    assert one["failure_id"] == first and one["body"] == "not json 1"
    assert len(json.loads(run_cli("failed", "show", mid, "--json", env=sub).stdout)) == 3
    removed = run_cli("failed", "remove", first, "--force", env=sub)
    assert removed.returncode == 0 and "removed 1 message(s)" in removed.stdout
    assert sorted(b for _, b in failed_queue_list(s, topology)) == [b"not json 2", b"not json 3"]
    removed = run_cli("failed", "remove", mid, "--force", env=sub)
    assert removed.returncode == 0 and "removed 2 message(s)" in removed.stdout
    store = Store(s.mongodb_url, s.mongodb_db)
    assert store.failed.count_documents({}) == 0 and failed_queue_list(s, topology) == []
    store.close()


def test_setup_indexes_replaces_the_unique_message_id_index(env):
    """A database set up before failure ids has a unique index on failed_messages.message_id: the worker refuses to
    start until `setup-indexes`, which drops it; records without a failure id stay readable."""
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    try:
        store.failed.create_index([("message_id", 1)], name="message_id_unique", unique=True)
        store.failed.insert_many([{"message_id": "old-1"}, {"message_id": "old-2"}])
        assert ("failed_messages", "failure_id_unique") in store.missing_indexes()
        done = run_cli("setup-indexes", env=env.subprocess_env())
        assert done.returncode == 0 and "dropped" in done.stdout, done.stdout + done.stderr
        assert not store.missing_indexes()
        assert "message_id_unique" not in store.failed.index_information()
        assert store.failed.count_documents({"failure_id": {"$exists": False}}) == 2
    finally:
        store.close()


def failed_queue_list(settings, topo) -> list[tuple[dict, bytes]]:
    """(headers, body) of every message in the failed queue, in order (all left in it)."""
    conn = broker.connect(settings.rabbitmq_dsn)
    ch = conn.channel()
    out = []
    while (got := ch.basic_get(topo.failed_queue, auto_ack=False))[0] is not None:
        out.append((got[1].headers or {}, got[2]))
    conn.close()
    return out


# ---- properties: any header, any text -------------------------------------------------------------------------

header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=40) | st.binary(max_size=20)
    | st.datetimes(timezones=st.just(UTC)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6)
ours = st.sampled_from([H_RETRY_COUNT, H_FIRST_FAILURE, "x-last-failure-at", H_HISTORY, "x-published-at",
                        H_FAILURE_ID, H_IGNORED, "x-death"])
header_names = ours | st.text(min_size=1, max_size=20)
json_values = st.none() | st.booleans() | st.integers() | st.text(max_size=40) | st.lists(st.integers(), max_size=2)
history_values = st.lists(st.dictionaries(st.sampled_from(["at", "error_class", "error_message", "x"]),
                                          json_values, max_size=4) | json_values, max_size=12).map(json.dumps)


@settings(derandomize=True, database=None, max_examples=300, deadline=None)
@given(st.dictionaries(header_names, header_values | history_values, max_size=8), st.booleans())
def test_property_any_headers_route_to_an_encodable_copy(headers, transient):
    """Whatever headers a delivery has, route() returns a copy pika can publish, on a queue of the topology, with a
    retry count in range and failure times it can read back."""
    topo = Topology(queue="q", failed_queue="f")
    copy = route(topo, headers, ValueError("boom"), transient=transient)
    pika.data.encode_table([], copy.headers)
    assert copy.routing_key in (topo.failed_queue, *(topo.retry_queue(i) for i in range(1, 6)))
    assert 0 <= copy.retry_count <= len(topo.retry_delays_ms)
    record = failure_record(copy, b"body", "mid") if copy.failed else None
    if record is not None:
        assert all("\x00" not in k and not k.startswith("$") and "." not in k for k in record["headers"])


@settings(derandomize=True, database=None, max_examples=500, deadline=None)
@given(st.text())
def test_property_any_text_is_shown_without_control_characters_and_never_as_markup(text):
    from rich.console import Console

    from myshop_ops.base.contract import CONTROL
    from myshop_ops.base.printable import printable
    from myshop_ops.cli.common import shown

    assert CONTROL.search(printable(text)) is None
    console = Console(record=True, width=10_000, color_system=None)
    console.print(shown(text), highlight=False, soft_wrap=True)
    rendered, expected = console.export_text().rstrip("\n"), printable(text).rstrip("\n")
    assert CONTROL.search(rendered) is None
    # nothing consumed as markup; backslashes next to brackets may show one more or less (rich's escaping rules)
    assert rendered.replace("\\", "") == expected.replace("\\", ""), (rendered, expected)


@pytest.mark.parametrize("url", ["mongodb://u:p@ss@127.0.0.1:1/?serverSelectionTimeoutMS=300",
                                 "mongodb+srv://u:s3cret@nowhere.invalid/db"])
def test_preflight_reports_a_bad_mongodb_url_as_a_check_not_a_traceback(env, url):
    done = run_cli("preflight", "--offline", "--json", env=env.subprocess_env(MONGODB_URL=url), timeout=90)
    assert "Traceback" not in done.stderr, done.stderr
    check = {(c["section"], c["name"]): c for c in json.loads(done.stdout)["checks"]}[("mongodb", "reachable")]
    assert check["status"] == "FAIL" and "s3cret" not in done.stdout and "p@ss" not in done.stdout, check


@pytest.mark.parametrize(("var", "url"), [
    ("REDIS_URL", "rediss://127.0.0.1:1/0?ssl_cert_reqs=none"),
    ("MONGODB_URL", "mongodb://127.0.0.1:1/?tls=true&tlsInsecure=true&serverSelectionTimeoutMS=300"),
    ("MONGODB_URL", "mongodb://127.0.0.1:1/?tls=true&tlsAllowInvalidCertificates=true&serverSelectionTimeoutMS=300"),
])
def test_preflight_flags_tls_without_verification(env, var, url):
    for app_env, status in (("test", "WARN"), ("prod", "FAIL")):
        extra = {"APP_ENV": app_env}
        if app_env == "prod":
            extra |= {"EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test-key-000000"}
        done = run_cli("preflight", "--offline", "--json", env=env.subprocess_env(**{var: url, **extra}), timeout=90)
        checks = {(c["section"], c["name"]): c for c in json.loads(done.stdout)["checks"]}
        assert checks[("security", "tls verification")]["status"] == status, (app_env, checks)
        assert var in checks[("security", "tls verification")]["detail"]


def test_user_delete_erases_the_users_failed_messages(env, topology):
    """Erasure: `user delete` removes the user's failed messages from the queue and their records (their bodies
    hold the user's searches), also for a user whose every event failed (no profile); others' stay."""
    s = env.settings()
    tag = topology.queue.split(".")[0]
    gone, kept = f"{tag}-gone", f"{tag}-kept"
    bodies = [(json.dumps({"user_id": u, "event_type": "search", "search_phrase": f"secret {i}"}).encode(),
               f"{tag}-{i}", None) for i, u in enumerate([gone, kept, gone])]
    publish_raw(s, topology, bodies)
    run_workers_until(s, lambda st: st.failed.count_documents({}) == 3)
    done = run_cli("user", "delete", gone, "--force", env=env.subprocess_env(), input="")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 from the failed queue, 2 record(s)" in " ".join(done.stdout.split())
    left = failed_queue_list(s, topology)
    assert [json.loads(b)["user_id"] for _, b in left] == [kept]
    store = Store(s.mongodb_url, s.mongodb_db)
    assert [r["user_id"] for r in store.failed.find({}, {"user_id": 1})] == [kept]
    store.close()
    again = run_cli("user", "delete", gone, "--force", env=env.subprocess_env(), input="")  # safe to run again
    assert again.returncode == 0 and f"erased user {gone}: no profile" in again.stdout, again.stdout + again.stderr
    assert "failed messages" not in again.stdout


def test_failed_commands_on_a_missing_failed_queue_say_so_in_one_line(env):
    """No topology declared: every failed command names the queue and the fix, exit 3, no traceback."""
    sub = env.subprocess_env()
    for args in (("failed", "show"), ("failed", "show", "--json"), ("failed", "retry", "--all", "--force"),
                 ("failed", "remove", "x", "--force")):
        done = run_cli(*args, env=sub)
        assert done.returncode == 3 and "Traceback" not in done.stderr, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr, (args, done.stderr)


def test_products_import_survives_a_hostile_catalog(env, tmp_path):
    """Catalog (issue 18): `<![<` crashed the import (AssertionError from html.parser), `"<a" * 200_000` took 73 s
    to strip, a 50 MB line 15.7 s and 1.27 GB, an id with OSC 52 reached `recommend`. Each bad line is reported by
    number, every other line imported, names stored without control characters."""
    s = env.settings()
    tag = s.mongodb_db
    rows = [{"product_id": f"{tag}-cdata", "name": "Decl", "description": "<![<"},
            {"product_id": f"{tag}-tags", "name": "Tags", "description": "<a" * 200_000},
            {"product_id": "osc" + OSC52, "name": "Clip"},
            {"product_id": f"{tag}-ctl", "name": "Mug\x9b31m\x1b[2J", "category": "cups\u202e"}]
    path = tmp_path / "catalog.jsonl"
    with open(path, "wb") as fh:
        fh.writelines(json.dumps(row).encode() + b"\n" for row in rows)
        fh.write(b'{"product_id": "big", "name": "')
        fh.writelines(b"<a" * (512 * 1024) for _ in range(50))
        fh.write(b'"}\n' + json.dumps({"product_id": f"{tag}-after", "name": "After"}).encode() + b"\n")
    done = run_cli("products", "import", str(path), env=env.subprocess_env())
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    big = 50 * 1024 * 1024 + len('{"product_id": "big", "name": ""}')
    assert done.stderr.splitlines() == ["line 3: product_id: must not contain control characters (U+001B at 3)",
                                        f"line 5: line too long: {big} bytes, at most 1048576 (MAX_LINE_BYTES)",
                                        "importing: 6 lines read"]
    assert ("4 embedded (new or changed text), 0 price/stock-only updates (not re-embedded), 0 unchanged, "
            "2 bad line(s) skipped") in done.stdout
    store = Store(s.mongodb_url, s.mongodb_db)
    got = {d["product_id"]: d for d in store.products.find({"product_id": {"$regex": f"^{tag}-"}})}
    store.close()
    assert sorted(got) == sorted(f"{tag}-{k}" for k in ("cdata", "tags", "ctl", "after"))
    assert (got[f"{tag}-ctl"]["name"], got[f"{tag}-ctl"]["category"]) == ("Mug 31m [2J", "cups")


def test_verify_of_a_file_with_nothing_to_verify_is_not_ok(env, topology, tmp_path):
    """A file of invalid lines only (a 200 KB one among them, never held whole) or of no events: verify said OK,
    exit 0. Now exit 1 with one line naming why nothing was checked; --json says ok false and the reason."""
    invalid = tmp_path / "invalid.jsonl"
    invalid.write_bytes(b'{"not": "an event"}\nnot json\n' + b"x" * 200_000 + b"\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n  \n")
    sub = env.subprocess_env(COLUMNS="300")
    for path, reason in ((invalid, "nothing to verify: none of its 3 line(s) is a valid event"),
                         (empty, "nothing to verify: the file holds no events")):
        done = run_cli("verify", "--events", str(path), "--wait", "0", env=sub)
        assert (done.returncode, done.stdout, done.stderr) == (1, "", f"error: --events {path}: {reason}\n")
        done = run_cli("verify", "--events", str(path), "--wait", "0", "--json", env=sub)
        report = json.loads(done.stdout)
        assert (done.returncode, report["ok"], report["reason"], report["users"]) == (1, False, reason, 0)


def test_verify_that_checked_no_user_is_not_ok():
    """Valid events that are all in failed_messages or without a product vector: nothing compared, not OK."""
    report = Verification(lines=3, events=3, in_failed=2, skipped_no_product=1)
    assert not report.ok and report.nothing_checked == (
        "nothing to verify: each of its 3 event(s) is in failed_messages (2) or names a product without a vector (1)")
    report.add(UserCheck("u", "ok", 3, 3))
    assert report.ok and report.nothing_checked is None and report.as_json()["reason"] is None
