"""`myshop recommend`, `myshop user show|delete` and myshop_ops.tools.recommend on the real services."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import make_event
from myshop_ops.base.layout import encode_vector
from myshop_ops.core.limits import Limits
from myshop_ops.core.worker import Worker
from myshop_ops.tools.recommend import MatrixCache, Recommender, RecommendError
from tests.support.events import T0, publish
from tests.support.services import DIMS, ROOT, run_cli
from tests.support.terminal import run_in_terminal
from tests.support.workers import one_line

pytestmark = pytest.mark.integration


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def seed_random(settings, n: int, seed: int = 1) -> dict[str, np.ndarray]:
    """``n`` products with random unit vectors of the configured space (ids r000..)."""
    rng = np.random.default_rng(seed)
    vectors = {f"r{i:03d}": unit(rng.standard_normal(settings.embedding_dimensions)) for i in range(n)}
    upsert(settings, vectors)
    return vectors


def upsert(settings, vectors: dict[str, np.ndarray], model: str | None = None) -> None:
    store = Store(settings.mongodb_url, settings.mongodb_db)
    store.upsert_products([
        {"product_id": pid, "embedding": v, "model": model or settings.model, "dimensions": len(v),
         "name": f"Product {pid}", "category": "random"}
        for pid, v in vectors.items()
    ])
    store.close()


def put_profile(settings, user_id: str, vec: np.ndarray, model: str | None = None, **extra) -> None:
    store = Store(settings.mongodb_url, settings.mongodb_db)
    store.users.insert_one({
        "user_id": user_id, "embedding": encode_vector(vec), "magnitude": 2.5, "model": model or settings.model,
        "dimensions": extra.pop("dimensions", len(vec)), "version": 3, "event_count": 3, "event_counts": {"search": 3},
        "last_updated": T0, "updated_at": T0, "created_at": T0, **extra,
    })
    store.close()


def brute_force(products: dict[str, np.ndarray], query: np.ndarray, k: int, exclude=()) -> list[tuple[str, float]]:
    q = query.astype(np.float64) / np.linalg.norm(query)
    scores = {pid: float(v.astype(np.float64) @ q / np.linalg.norm(v)) for pid, v in products.items()
              if pid not in exclude}
    return sorted(scores.items(), key=lambda kv: -kv[1])[:k]


def recommend_json(env, user_id: str, *args: str) -> dict:
    done = run_cli("recommend", user_id, "--json", *args, env=env.subprocess_env())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_same(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [pid for pid, _ in got] == [pid for pid, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=0, atol=1e-5)


def consume(settings, n: int) -> Worker:
    worker = Worker(settings, prefetch=100, limits=Limits(messages=n, seconds=60))
    assert worker.run() == 0 and worker.totals.applied == n
    return worker


def test_exact_top_k_against_brute_force(env):
    s = env.settings()
    products = seed_random(s, 300)
    rng = np.random.default_rng(7)
    query = unit(rng.standard_normal(DIMS))
    # Products of another model or with unusable vectors are never candidates, however similar.
    upsert(s, {"foreign": query}, model="text-embedding-3-small")
    store = Store(s.mongodb_url, s.mongodb_db)
    php = unit(rng.standard_normal(DIMS))  # the PHP sync writes an array of numbers: read as well
    store.products.insert_one({"product_id": "php-1", "embedding": [float(x) for x in php], "model": s.model,
                               "dimensions": DIMS, "name": "PHP product", "updated_at": datetime.now(UTC)})
    store.products.insert_one({"product_id": "short", "embedding": encode_vector(query[:8]), "model": s.model,
                               "dimensions": DIMS, "updated_at": datetime.now(UTC)})
    products["php-1"] = php
    put_profile(s, "u1", query * 3)  # stored profiles are unit vectors; normalised anyway

    cache = MatrixCache()
    recommender = Recommender(s, store, cache)
    for k in (1, 10, 301, 500):
        got = recommender.recommend("u1", limit=k)
        assert_same([(r.product_id, r.score) for r in got.items], brute_force(products, query, k))
    assert cache.loads == 1 and len(cache.get(s.mongodb_url, store, s.model, DIMS)) == 301
    store.close()

    out = recommend_json(env, "u1", "--limit", "10")
    assert (out["backend"], out["fallback"], out["model"], out["dimensions"]) == ("numpy", False, s.model, DIMS)
    assert [r["rank"] for r in out["recommendations"]] == list(range(1, 11))
    assert_same([(r["product_id"], r["score"]) for r in out["recommendations"]], brute_force(products, query, 10))


def test_matrix_cache_reloads_when_product_embeddings_changes(env):
    s = env.settings()
    products = seed_random(s, 40)
    rng = np.random.default_rng(3)
    query = unit(rng.standard_normal(DIMS))
    put_profile(s, "u1", query)
    store = Store(s.mongodb_url, s.mongodb_db)
    cache = MatrixCache()
    recommender = Recommender(s, store, cache)

    def top() -> list[str]:
        return [r.product_id for r in recommender.recommend("u1", limit=3).items]

    first = top()
    matrix = cache.get(s.mongodb_url, store, s.model, DIMS)
    assert top() == first and cache.loads == 1 and cache.get(s.mongodb_url, store, s.model, DIMS) is matrix

    upsert(s, {"new": query})  # a new product: the count changes
    assert top() == ["new", *first[:2]] and cache.loads == 2
    upsert(s, {first[0]: -query})  # a rewritten vector: the newest updated_at changes
    assert top() == ["new", first[1], first[2]] and cache.loads == 3
    store.products.delete_one({"product_id": "new"})
    assert top() == [p for p, _ in brute_force({**products, first[0]: -query}, query, 3)] and cache.loads == 4
    assert top() and cache.loads == 4
    store.close()


def test_profile_of_another_vector_space_is_refused(env):
    s = env.settings()
    seed_random(s, 5)
    put_profile(s, "openai-user", unit(np.ones(DIMS)), model="text-embedding-3-small")
    put_profile(s, "short-user", unit(np.ones(32)))
    done = run_cli("recommend", "openai-user", env=env.subprocess_env())
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: user openai-user's profile is text-embedding-3-small/{DIMS}d but the configured vector space is "
        f"hash-v1/{DIMS}d: vectors of different models are never compared (set EMBEDDING_PROVIDER/"
        "OPENAI_EMBEDDING_MODEL/EMBEDDING_DIMENSIONS to the profile's, or rebuild the profiles)"]
    put_profile(s, "broken-user", unit(np.ones(8)), dimensions=DIMS)  # its vector contradicts its dimensions
    store = Store(s.mongodb_url, s.mongodb_db)
    recommender = Recommender(s, store, MatrixCache())
    with pytest.raises(RecommendError, match=rf"profile is hash-v1/32d but the configured vector space is hash-v1/"
                                             rf"{DIMS}d"):
        recommender.recommend("short-user")
    with pytest.raises(RecommendError, match=rf"^user broken-user's profile vector is unreadable, zero or not {DIMS} "
                                             r"finite numbers \(rebuild the profile\)$"):
        recommender.recommend("broken-user")
    store.close()


def test_no_profile_then_fallback_to_the_newest_products(env):
    s = env.settings()
    seed_random(s, 6)
    store = Store(s.mongodb_url, s.mongodb_db)
    for i in range(6):  # r005 newest ... r000 oldest
        store.products.update_one({"product_id": f"r{i:03d}"}, {"$set": {"updated_at": T0 + timedelta(hours=i)}})
    store.close()

    done = run_cli("recommend", "nobody", env=env.subprocess_env())
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: user nobody has no profile in {s.mongodb_db}.user_embeddings (none of their events applied yet, "
        "or the profile was erased; --fallback lists the newest products instead)"]

    out = recommend_json(env, "nobody", "--fallback", "--limit", "4")
    assert (out["backend"], out["fallback"]) == ("fallback", True)
    assert [(r["product_id"], r["score"]) for r in out["recommendations"]] == [
        ("r005", None), ("r004", None), ("r003", None), ("r002", None)]
    store = Store(s.mongodb_url, s.mongodb_db)
    with pytest.raises(RecommendError, match="no profile"):
        Recommender(s, store, MatrixCache()).recommend("nobody", fallback=False)
    store.close()


def test_exclude_purchased(env):
    s = env.settings()
    products = seed_random(s, 50)
    query = unit(np.random.default_rng(11).standard_normal(DIMS))
    bought = [pid for pid, _ in brute_force(products, query, 3)]
    put_profile(s, "buyer", query, purchased_product_ids=[*bought, "not-in-catalog"])
    put_profile(s, "unknown-purchases", query)

    store = Store(s.mongodb_url, s.mongodb_db)
    plain = Recommender(s, store, MatrixCache()).recommend("buyer", limit=5)
    store.close()
    assert [r.product_id for r in plain.items][:3] == bought and plain.excluded is None
    out = recommend_json(env, "buyer", "--limit", "5", "--exclude-purchased")
    assert out["excluded_purchased"] == 4
    assert_same([(r["product_id"], r["score"]) for r in out["recommendations"]],
                brute_force(products, query, 5, exclude=bought))

    done = run_cli("recommend", "unknown-purchases", "--exclude-purchased", env=env.subprocess_env())
    assert done.returncode == 0 and bought[0] in done.stdout
    assert "note: the profile has no purchased_product_ids: nothing was excluded" in one_line(done.stdout)


def test_atlas_backend_builds_vector_search_and_fails_clearly_without_it(env):
    s = env.settings()
    seed_random(s, 5)
    put_profile(s, "u1", unit(np.ones(DIMS)))
    done = run_cli("recommend", "u1", env=env.subprocess_env(RECOMMEND_BACKEND="atlas",
                                                             ATLAS_VECTOR_INDEX="products_vec"))
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: Atlas $vectorSearch on {s.mongodb_db}.product_embeddings (index "
                               "'products_vec') failed: ")
    assert lines[0].endswith("(create the index as in docs/RECOMMENDATIONS.md, or set RECOMMEND_BACKEND=numpy)")


def test_user_show_and_delete(env, topology, redis_client):
    s = env.settings()
    seed_random(s, 20)
    events = [make_event("u-del", "search", "wireless headphones", T0),
              make_event("u-del", "product_view", "r001", T0 + timedelta(hours=1)),
              make_event("u-del", "product_purchase", "r002", T0 + timedelta(hours=2)),
              make_event("u-keep", "product_click", "r003", T0)]
    publish(s, topology, events)
    consume(s, len(events))
    state = RedisState.from_settings(s)
    deleted_keys = [state.processed + e.key for e in events[:3]]
    assert redis_client.exists(*deleted_keys) == 3

    done = run_cli("user", "show", "u-del", "--json", env=env.subprocess_env())
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert {k: shown[k] for k in ("user_id", "version", "event_count", "event_counts", "last_event_type",
                                  "last_event_id", "model", "dimensions")} == {
        "user_id": "u-del", "version": shown["version"], "event_count": 3,
        "event_counts": {"search": 1, "product_view": 1, "product_purchase": 1},
        "last_event_type": "product_purchase", "last_event_id": events[2].message_id, "model": s.model,
        "dimensions": DIMS}
    assert shown["last_updated"].startswith("2026-11-01 14:00:00") and shown["magnitude"] > 0
    assert len(shown["recommendations"]) == 5 and shown["recommendations_error"] is None
    assert shown["recommendations"][0]["product_id"] == "r002"  # the purchase dominates the profile
    done = run_cli("user", "show", "u-del", env=env.subprocess_env())
    text = one_line(done.stdout)
    assert done.returncode == 0, done.stderr
    assert "│ event count │ 3 │ │ search │ 1 │ │ product_view │ 1 │ │ product_click │ 0 │" in " ".join(text.split())
    assert "top 5 recommendations (numpy)" in text and "r002" in text

    refused = run_cli("user", "delete", "u-del", env=env.subprocess_env(), input="")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: refusing to erase user u-del without a terminal: add --force"
    declined = run_in_terminal("user", "delete", "u-del", env=env.subprocess_env(), typed="n\n")
    assert declined.returncode == 1, declined.output
    assert ("Erase user u-del: profile (3 events), processed-message keys in Redis, and drop copies of their events "
            "still in flight?") in one_line(declined.output)
    assert "user u-del not erased (answered no)" in one_line(declined.output)
    store = Store(s.mongodb_url, s.mongodb_db)
    assert store.get_profile_doc("u-del") is not None
    # Any test session sharing this Redis wipes processed ids when a test starts: set them again right before.
    state.mark([e.key for e in events])
    state.close()
    assert redis_client.exists(*deleted_keys) == 3

    done = run_cli("user", "delete", "u-del", "--force", env=env.subprocess_env(), input="")
    assert done.returncode == 0, done.stderr
    assert one_line(done.stdout).startswith(
        f"erased user u-del: profile (version {shown['version']}, 3 events) deleted from {s.mongodb_db}.user_embeddings"
        " forgot 3 processed-message key(s) in Redis erasure recorded: copies of events that occurred up to ")
    assert store.get_profile_doc("u-del") is None and redis_client.exists(*deleted_keys) == 0
    assert store.get_profile_doc("u-keep") is not None
    store.close()
    again = run_cli("user", "delete", "u-del", "--force", env=env.subprocess_env(), input="")  # safe to run again
    assert again.returncode == 0, again.stderr
    assert one_line(again.stdout).startswith(f"erased user u-del: no profile in {s.mongodb_db}.user_embeddings forgot "
                                             "0 processed-message key(s) in Redis erasure recorded")


def test_audio_shopper_gets_audio_products_first(env, topology):
    """The issue's acceptance test: demo catalog, offline `hash` provider, real worker, `myshop recommend`."""
    s = env.settings()
    done = run_cli("products", "import", str(ROOT / "examples" / "catalog.jsonl"), "--json",
                   env=env.subprocess_env())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["imported"] >= 200
    now = datetime.now(UTC)
    story = [("search", "wireless headphones"), ("product_view", "AUD-1001"), ("product_view", "AUD-1009"),
             ("product_view", "KIT-1001"), ("search", "noise cancelling earbuds"), ("product_click", "AUD-1002"),
             ("product_purchase", "AUD-1009"), ("product_purchase", "AUD-1002")]
    events = [make_event("audio-fan", kind, ref, now - timedelta(days=len(story) - i))
              for i, (kind, ref) in enumerate(story)]
    publish(s, topology, events)
    consume(s, len(events))

    out = recommend_json(env, "audio-fan", "--limit", "10")
    categories = [r["category"] for r in out["recommendations"]]
    assert categories[:5] == ["audio"] * 5, out["recommendations"]
    assert categories.count("audio") >= 8

    store = Store(s.mongodb_url, s.mongodb_db)  # the worker keeps the purchased product ids
    assert sorted(store.get_profile_doc("audio-fan")["purchased_product_ids"]) == ["AUD-1002", "AUD-1009"]
    recs = Recommender(s, store, MatrixCache()).recommend("audio-fan", limit=5, exclude_purchased=True)
    store.close()
    ids = [r.product_id for r in recs.items]
    assert {"AUD-1009", "AUD-1002"}.isdisjoint(ids) and all(i.startswith("AUD-") for i in ids)
