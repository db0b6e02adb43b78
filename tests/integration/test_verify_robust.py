"""`myshop verify` whatever its inputs and dependencies do: special files, provider errors, a dependency failing
mid-way, no broker connection held while it computes, bounded memory for large files (benchmarks/bench_verify.py
measures the big sizes)."""

from __future__ import annotations

import json
import os

import pytest

from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.embeddings import PhraseEmbedder, make_provider
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.cli import verify as verify_cli
from myshop_ops.core.limits import Limits
from myshop_ops.core.worker import Worker
from myshop_ops.tools import verify as verify_tool
from tests.integration.test_failures import openai_env
from tests.support.events import T0, mixed_events, publish, seed_products
from tests.support.services import run_cli

pytestmark = pytest.mark.integration


def _applied(env, topology, tmp_path, users: int = 3, per_user: int = 6, **overrides: str):
    s = env.settings(**overrides)
    products = seed_products(s, [f"p{i}" for i in range(4)])
    ids = [f"{env['MONGODB_DB']}-r{i}" for i in range(users)]
    events = mixed_events(ids, list(products), per_user=per_user)
    publish(s, topology, events)
    worker = Worker(s, prefetch=200, limits=Limits(messages=len(events), seconds=60))
    assert worker.run() == 0 and worker.totals.applied == len(events)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(serialise(e) for e in events) + b"\n")
    return s, ids, path


@pytest.mark.timeout(60)
def test_verify_events_fifo_is_refused_at_once(env, tmp_path):
    """`verify --events` on a FIFO nobody writes to never finished (the open blocked): refused by fstat of the
    descriptor, opened without blocking. A directory and /dev/zero likewise."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), (tmp_path, "a directory"), ("/dev/zero", "a character device")):
        done = run_cli("verify", "--events", str(path), "--wait", "0", env=env.subprocess_env(COLUMNS="300"),
                       timeout=30)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr == f"error: --events {path}: not a regular file ({kind}): give a file, not a pipe or a " \
                              "device\n"


def test_verify_phrase_the_provider_refuses_is_that_users_problem(env, topology, tmp_path):
    """A provider error during verify was an EmbeddingError traceback: the user whose search phrase the provider
    refuses (here the hash provider: a phrase without words) is unverifiable with the reason; the others are
    checked."""
    _s, users, path = _applied(env, topology, tmp_path)
    with path.open("ab") as fh:
        fh.write(serialise(make_event(users[1], "search", "!!!", T0)) + b"\n")
    done = run_cli("verify", "--events", str(path), "--json", "--wait", "0", env=env.subprocess_env())
    assert "Traceback" not in done.stderr and done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert (report["users_ok"], report["users_unverifiable"], report["complete"]) == (2, 1, True)
    [problem] = report["problems"]
    assert problem["user_id"] == users[1] and "could not be embedded" in problem["reason"]


def test_verify_provider_down_reports_searchers_unverifiable(env, topology, tmp_path, fake_openai):
    """The provider answers 503 to everything (its retries spent): no traceback, one call made, every user with a
    phrase the provider had to embed is unverifiable with the reason (one whose phrases are cached is checked);
    verify does not keep calling a provider that is down."""
    sub = openai_env(env, fake_openai)
    fake_openai.clear()
    _s, users, path = _applied(env, topology, tmp_path, users=4, per_user=4, **sub)
    with path.open("ab") as fh:  # phrases the worker never embedded: not in the shared cache
        fh.write(b"".join(serialise(make_event(u, "search", f"fresh phrase {u}", T0)) + b"\n" for u in users[:3]))
    fake_openai.clear()
    fake_openai.fail_next(503, retry_after_ms=1, times=10_000)
    try:
        done = run_cli("verify", "--events", str(path), "--json", "--wait", "0", env=env.subprocess_env(**sub))
        inputs = {json.dumps(r["body"]["input"]) for r in fake_openai.requests}
    finally:
        fake_openai.clear()
    assert "Traceback" not in done.stderr and done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    unverifiable = {p["user_id"] for p in report["problems"] if p["status"] == "unverifiable"}
    # the users with a fresh phrase; the last one's phrases are all in the shared cache: checked, and ok
    assert unverifiable == set(users[:3]) and report["users_ok"] == 1
    assert all("could not be embedded" in p["reason"] and "503" in p["reason"] for p in report["problems"])
    assert len(inputs) == 1  # one call (repeated by the SDK's own retries), none after it


def test_verify_mongodb_unreachable_is_one_line_and_the_report_so_far(env, topology, tmp_path):
    """A dependency failing during verify: the report of what was done so far (complete false), then one line,
    exit 3; never a traceback."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(serialise(make_event("u1", "product_view", "p0", T0)) + b"\nnot json\n")
    sub = env.subprocess_env(MONGODB_URL="mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=300")
    done = run_cli("verify", "--events", str(path), "--json", "--wait", "0", env=sub)
    assert "Traceback" not in done.stderr and done.returncode == 3
    report = json.loads(done.stdout)
    assert (report["ok"], report["complete"], report["lines"], report["invalid_lines"], report["events"]) == (
        False, False, 2, 1, 1)
    assert done.stderr.startswith("error: MongoDB at ") and done.stderr.count("\n") == 1


def test_verify_failing_mid_way_keeps_the_users_checked(env, topology, tmp_path, monkeypatch):
    """MongoDB goes away after the first users were judged: the report holds them, complete is False."""
    s, _users, path = _applied(env, topology, tmp_path, users=5, per_user=3)
    monkeypatch.setattr(verify_tool, "CHUNK", 2)
    store = Store.from_settings(s)
    real = store.profile_docs

    def profile_docs(ids):
        docs = real(ids)
        store.close()  # the next read fails: pymongo's InvalidOperation, a PyMongoError
        return docs

    monkeypatch.setattr(store, "profile_docs", profile_docs)
    report = verify_tool.Verification()
    phrases = PhraseEmbedder(make_provider(s), RedisState.from_settings(s), ttl=60)
    lines = path.read_bytes().splitlines()
    with pytest.raises(Exception, match="after close"):
        verify_tool.verify(s, lines, store, phrases, report)
    assert (report.complete, report.users, report.count("ok"), report.ok) == (False, 2, 2, False)
    assert report.as_json()["complete"] is False


def test_verify_holds_no_broker_connection_while_it_computes(env, topology, tmp_path, monkeypatch, capsys):
    """300,000 lines kept verify computing for minutes on an AMQP connection it never serviced (StreamLostError,
    then ConnectionWrongStateError in a `finally`, no report). It only needs the broker to count messages in
    flight: each count opens and closes its own connection, none is open while the events are recomputed."""
    _s, _users, path = _applied(env, topology, tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    opened = []
    real_connect, real_verify = verify_cli.broker.connect, verify_cli.verify

    def connect(*args, **kwargs):
        opened.append(real_connect(*args, **kwargs))
        return opened[-1]

    def computing(*args, **kwargs):
        assert opened and not [c for c in opened if c.is_open]  # counted before, closed since
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(verify_cli.broker, "connect", connect)
    monkeypatch.setattr(verify_cli, "verify", computing)
    verify_cli.run_verify(events=path, max_problems=5, wait=0, as_json=True)  # ok: returns, no Exit
    assert json.loads(capsys.readouterr().out)["users_ok"] == 3
    assert len(opened) == 2 and not [c for c in opened if c.is_open]
