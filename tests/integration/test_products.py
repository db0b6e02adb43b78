"""`myshop products import` on the real Mongo-wire server, with the real openai SDK against the fake server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from myshop_ops.adapters.embeddings import HashProvider, make_provider
from myshop_ops.adapters.store import Store
from myshop_ops.tools.catalog import import_catalog, text_hash
from tests.support.services import DIMS, run_cli
from tests.support.terminal import run_in_terminal
from tests.support.workers import one_line

pytestmark = pytest.mark.integration

CATEGORIES = ("audio", "kitchen", "garden")


def products(n: int) -> list[dict]:
    return [
        {"product_id": f"p{i}", "name": f"Product {i} {CATEGORIES[i % 3]} thing", "category": CATEGORIES[i % 3],
         "description": f"<p>Model <b>{i}</b> &amp; friends</p>\n<ul><li>feature {i}</li></ul>", "price": 10.0 + i,
         "stock": i}
        for i in range(n)
    ]


def write(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def stored(settings) -> dict[str, dict]:
    store = Store(settings.mongodb_url, settings.mongodb_db)
    try:
        return {d["product_id"]: d for d in store.products.find({}, {"_id": 0})}
    finally:
        store.close()


def import_in_process(path: Path, settings, batch_size: int = 256) -> dict:
    """The import core as the CLI runs it (the re-runs of a test need no new process)."""
    store = Store(settings.mongodb_url, settings.mongodb_db)
    try:
        return import_catalog(path, store, make_provider(settings), batch_size=batch_size).as_dict()
    finally:
        store.close()


def import_json(path: Path, env: dict[str, str], *extra: str) -> tuple[int, dict]:
    done = run_cli("products", "import", str(path), "--json", *extra, env=env)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_import_in_batches_then_only_changed_products(env, fake_openai, tmp_path):
    fake_openai.clear()
    e = env.subprocess_env(EMBEDDING_PROVIDER="openai", OPENAI_API_KEY="test-key",
                           OPENAI_BASE_URL=fake_openai.base_url)
    s = env.settings(EMBEDDING_PROVIDER="openai", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake_openai.base_url)
    catalog = products(10)
    path = write(tmp_path / "catalog.jsonl", catalog)

    code, summary = import_json(path, e, "--batch-size", "4")
    assert code == 0
    assert summary | {"bad_lines": []} == {
        "file": str(path), "model": "text-embedding-3-small", "dimensions": DIMS, "lines": 10, "products": 10,
        "imported": 10, "updated": 0, "unchanged": 0, "bad": 0, "bad_lines": []}
    assert [len(inputs) for inputs in fake_openai.inputs()] == [4, 4, 2]
    assert {(r["body"]["model"], r["body"]["dimensions"]) for r in fake_openai.requests} == {
        ("text-embedding-3-small", DIMS)}
    texts = [t for inputs in fake_openai.inputs() for t in inputs]
    assert texts[1] == "Product 1 kitchen thing. kitchen. Model 1 & friends feature 1"
    docs = stored(s)
    assert sorted(docs) == sorted(p["product_id"] for p in catalog)
    native = HashProvider(1536)
    for text, p in zip(texts, catalog, strict=True):
        doc = docs[p["product_id"]]
        assert (doc["model"], doc["dimensions"], doc["name"], doc["category"], doc["price"], doc["stock"]) == (
            "text-embedding-3-small", DIMS, p["name"], p["category"], p["price"], p["stock"])
        assert doc["text_hash"] == text_hash(text)
        # STORE_LAYOUT=shop: an array of doubles the shop's ranking reads, and the id its sync upserts by
        assert doc["productId"] == p["product_id"] and all(type(x) is float for x in doc["embedding"])
        expected = native.embed_one(text)[:DIMS]  # what text-embedding-3 returns for `dimensions`
        got = np.asarray(doc["embedding"], np.float32)
        np.testing.assert_allclose(got, expected / np.linalg.norm(expected), atol=1e-6)

    fake_openai.clear()  # a re-run embeds nothing
    summary = import_in_process(path, s, batch_size=4)
    assert (summary["imported"], summary["updated"], summary["unchanged"]) == (0, 0, 10)
    assert fake_openai.requests == []

    catalog[3]["description"] = "<p>Now with <i>longer</i> battery life</p>"  # new text: embedded again
    catalog[5]["price"] = 99.5  # same text: fields rewritten, no provider call
    del catalog[6]["stock"]
    write(path, catalog)
    before = stored(s)
    summary = import_in_process(path, s, batch_size=4)
    assert (summary["imported"], summary["updated"], summary["unchanged"]) == (1, 2, 7)
    assert fake_openai.inputs() == [["Product 3 audio thing. audio. Now with longer battery life"]]
    after = stored(s)
    assert after["p3"]["embedding"] != before["p3"]["embedding"] and after["p3"]["updated_at"] > before["p3"][
        "updated_at"]
    assert after["p5"]["price"] == 99.5 and after["p5"]["embedding"] == before["p5"]["embedding"]
    assert after["p6"]["stock"] is None
    assert {k: after[k] for k in ("p0", "p9")} == {k: before[k] for k in ("p0", "p9")}

    fake_openai.clear()  # other dimensions: every product is embedded again, in one request
    summary = import_in_process(path, env.settings(**{**e, "EMBEDDING_DIMENSIONS": "32"}))
    assert (summary["imported"], summary["dimensions"]) == (10, 32)
    assert [len(inputs) for inputs in fake_openai.inputs()] == [10]
    assert {d["dimensions"] for d in stored(s).values()} == {32}


def test_bad_lines_are_reported_with_their_number_and_skipped(env, tmp_path):
    s = env.settings()
    good = products(3)
    path = write(tmp_path / "catalog.jsonl", [
        good[0],
        '{"product_id": "x1", "name": ',
        good[1],
        {"product_id": "x2", "description": "no name"},
        "",
        {"product_id": "x3", "name": "Lamp", "price": "cheap"},
        {"product_id": "p0", "name": "duplicate"},
        good[2],
    ])
    done = run_cli("products", "import", str(path), env=env.subprocess_env())
    assert done.returncode == 1, done.stderr
    err = done.stderr.splitlines()
    assert err[0].startswith("line 2: invalid JSON (")
    assert err[1:] == ["line 4: name: required", "line 6: price: must be a non-negative number (got a string)",
                       "line 7: product_id 'p0' repeats line 1", "importing: 8 lines read"]  # progress: stderr
    assert "\x1b[" not in done.stdout  # not a terminal: plain lines, no progress bar
    assert done.stdout.splitlines() == [  # the summary, on one line however long the path
        f"{path}: 3 embedded (new or changed text), 0 price/stock-only updates (not re-embedded), 0 unchanged, "
        f"4 bad line(s) skipped (hash-v1, {DIMS}d)"]
    assert sorted(stored(s)) == ["p0", "p1", "p2"]
    assert stored(s)["p0"]["name"] == good[0]["name"]

    code, summary = import_json(path, env.subprocess_env())
    assert (code, summary["imported"], summary["unchanged"], summary["bad"]) == (1, 0, 3, 4)
    assert [b["line"] for b in summary["bad_lines"]] == [2, 4, 6, 7]


def test_terminal_progress_bar_and_missing_file(env, tmp_path):
    path = write(tmp_path / "catalog.jsonl", products(5))
    run = run_in_terminal("products", "import", str(path), "--batch-size", "2", env=env.subprocess_env())
    assert run.returncode == 0, run.output
    assert (f"5 embedded (new or changed text), 0 price/stock-only updates (not re-embedded), 0 unchanged, "
            f"0 bad line(s) skipped (hash-v1, {DIMS}d)") in one_line(run.output)

    done = run_cli("products", "import", str(tmp_path / "nope.jsonl"), env=env.subprocess_env())
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: catalog {tmp_path / 'nope.jsonl'}: No such file or directory (give a JSONL file, one product per "
        "line)"]


def test_a_line_the_provider_cannot_embed_is_refused_by_number_and_the_other_299_are_imported(env, fake_openai,
                                                                                              tmp_path):
    catalog: list[dict] = products(300)
    catalog[4] = {"product_id": "p4", "name": "_"}  # line 5: no words (hash), refused by the fake OpenAI below
    path = write(tmp_path / "catalog.jsonl", catalog)
    s = env.settings()
    done = run_cli("products", "import", str(path), env=env.subprocess_env())  # the offline hash provider
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == ["line 5: product_id 'p4' not embedded: cannot embed a text with no words",
                                        "importing: 256 lines read", "importing: 300 lines read"]
    assert done.stdout.splitlines()[-1].startswith(f"{path}: 299 embedded (new or changed text), 0 price/stock-only "
                                                   "updates (not re-embedded), 0 unchanged, 1 bad")
    assert len(stored(s)) == 299 and "p4" not in stored(s)
    code, again = import_json(path, env.subprocess_env())  # a re-run: the same 299, the same line refused
    assert (code, again["imported"], again["unchanged"], again["bad"]) == (1, 0, 299, 1)
    assert [b["line"] for b in again["bad_lines"]] == [5]

    fake_openai.clear()
    fake_openai.answer("_.", "400")  # a real provider refusing that input refuses the whole request holding it
    e = env.subprocess_env(EMBEDDING_PROVIDER="openai", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake_openai.base_url)
    for run in range(2):
        code, summary = import_json(path, e)
        assert code == 1 and summary["bad"] == 1
        assert (summary["imported"], summary["unchanged"]) == ((299, 0) if run == 0 else (0, 299))
        [line] = summary["bad_lines"]
        assert line["line"] == 5 and "(400)" in line["error"] and "p4" in line["error"]
    assert {d["model"] for d in stored(s).values()} == {"text-embedding-3-small"} and len(stored(s)) == 299
