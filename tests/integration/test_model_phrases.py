"""`myshop model run` re-embeds the searches of every profile under the next model once per distinct normalised phrase
(whatever the users, cases and spacings it was typed with, and whichever process embedded it first), and waits the
provider's Retry-After before every retry of a rate-limited request (the local OpenAI-compatible server, two models of
different sizes)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

import pytest

from myshop_ops.adapters.embeddings import normalise_phrase
from myshop_ops.adapters.store import NEXT, Store
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.core.limits import Limits
from myshop_ops.core.worker import Worker
from tests.support.events import T0, publish
from tests.support.services import run_cli

pytestmark = pytest.mark.integration
NEXT_MODEL, NEXT_DIMS = "text-embedding-3-large", 32
RETRY_AFTER_S = 2
RATE_LIMITED = 3  # the SDK's first try and its 2 retries (OpenAIProvider max_retries): the next try is the migration's
# one phrase, typed as shoppers do: each group normalises to one text
TYPED = {
    "wireless headphones": ["Wireless Headphones", "wireless   headphones", "WIRELESS headphones "],
    "running shoes": ["Running  Shoes", "running shoes", "RUNNING SHOES"],
    "café crème": ["Café Crème", "CAFÉ   CRÈME", "café crème"],
}
OPENAI = {"EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "test-key"}


class Deployment:
    """This test's deployment on the fake OpenAI server: its settings, `myshop` runs, workers."""

    def __init__(self, env, topology, fake_openai):
        fake_openai.clear()
        self.env, self.topology = env, topology
        self.vars = {**OPENAI, "OPENAI_BASE_URL": fake_openai.base_url}
        self.settings = env.settings(**self.vars)
        self.users = [f"{env['MONGODB_DB']}-u{i}" for i in range(6)]

    def run(self, *args: str):
        return run_cli(*args, env=self.env.subprocess_env(**self.vars))

    def cli(self, *args: str) -> dict:
        done = self.run(*args, "--json")
        assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stdout, done.stderr)
        return json.loads(done.stdout)

    def consume(self, events) -> None:
        publish(self.settings, self.topology, [serialise(e) for e in events])
        worker = Worker(self.settings, limits=Limits(messages=len(events), seconds=60))
        assert worker.run() == 0 and worker.totals.failed == worker.totals.retried == 0

    def started(self) -> None:
        """Profiles of the current model with their item maps (u0 searched the first phrase only; u1..u5 every
        phrase, in every spelling, several times), then the migration to the next model started."""
        spellings = [t for group in TYPED.values() for t in group]
        assert {normalise_phrase(t) for t in spellings} == set(TYPED)
        first = TYPED[next(iter(TYPED))]
        searches = [make_event(self.users[0], "search", t, T0 + timedelta(minutes=k)) for k, t in enumerate(first)]
        searches += [make_event(u, "search", spellings[(i + k) % len(spellings)], T0 + timedelta(hours=i, minutes=k))
                     for i, u in enumerate(self.users[1:], 1) for k in range(2 * len(spellings))]
        self.consume(searches)
        self.cli("model", "start", "--model", NEXT_MODEL, "--dimensions", str(NEXT_DIMS))


def test_model_run_embeds_each_distinct_phrase_once_and_waits_retry_after(env, topology, fake_openai):
    shop = Deployment(env, topology, fake_openai)
    shop.started()
    first, *others = TYPED
    fake_openai.clear()  # from here on: what the migration asks of the provider
    # while the migration runs, the workers keep u0's shadow: the first phrase is embedded under the next model here
    shop.consume([make_event(shop.users[0], "search", TYPED[first][1], T0 + timedelta(days=1))])

    sent_before_run = len(fake_openai.requests)
    fake_openai.fail_next(429, retry_after=RETRY_AFTER_S, times=RATE_LIMITED)
    shop.cli("model", "run")
    assert fake_openai.pending_faults() == 0
    requests = fake_openai.requests
    refused = requests[sent_before_run:sent_before_run + RATE_LIMITED]

    # (a) each distinct normalised phrase embedded under the next model exactly once in all (the refused requests
    # are the same request sent again: they are not embeddings)
    inputs = fake_openai.inputs()
    served = Counter(t for r, texts in zip(requests, inputs, strict=True)
                     if r["body"]["model"] == NEXT_MODEL and not any(r is x for x in refused) for t in texts)
    assert served == Counter(list(TYPED)), served
    assert all(r["body"]["model"] == NEXT_MODEL and sorted(r["body"]["input"]) == sorted(others) for r in refused)

    # (b) every retry of a rate-limited request came at least Retry-After after it (the server's clock)
    after = requests[sent_before_run + 1:sent_before_run + RATE_LIMITED + 1]
    gaps = [b["at"] - a["at"] for a, b in zip(refused, after, strict=True)]
    assert len(gaps) == RATE_LIMITED and min(gaps) >= RETRY_AFTER_S, gaps

    # (c) every profile rebuilt under the next model
    users = shop.users
    status = shop.cli("model", "status")
    assert (status["state"], status["profiles"], status["shadows"], status["rebuilt"], status["unmapped"]) == (
        "running", len(users), len(users), len(users), 0), status
    assert status["to"] == f"{NEXT_MODEL}/{NEXT_DIMS}d"
    store = Store(shop.settings.mongodb_url, shop.settings.mongodb_db).view(NEXT)
    try:
        sizes = {(d["model"], len(d["vector"])) for d in store.users.find({}, {"model": 1, "vector": 1})}
    finally:
        store.close()
    assert sizes == {(NEXT_MODEL, NEXT_DIMS)}


def test_a_wait_beyond_the_bound_stops_the_run_with_one_line(env, topology, fake_openai):
    shop = Deployment(env, topology, fake_openai)
    shop.started()
    fake_openai.fail_next(429, retry_after=600)  # beyond the SDK's bound too: it does not retry either
    done = shop.run("model", "run")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "asks to wait 600 s" in lines[0] and "myshop model run" in lines[0], done.stderr
    assert fake_openai.pending_faults() == 0
    assert shop.cli("model", "status")["shadows"] == 0
    assert shop.cli("model", "run")["rebuilt"] == len(shop.users)  # run again once the wait is over
