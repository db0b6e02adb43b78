"""The shop's data with the shop's own PHP MongoDB code (tests/shop/shop_mongo.php on Debian's php-mongodb driver):
its catalog and profiles used as they are, profiles it can read, and its profiles adopted by the stated rule (and
verified exactly from the prior their adoption record holds)."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import timedelta

import numpy as np
import pytest

from myshop_ops.adapters.embeddings import HashProvider, normalise_phrase
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.base.layout import decode_vector, read_profile
from myshop_ops.base.profile import Profile, fold, to_days
from myshop_ops.core.limits import Limits
from myshop_ops.core.worker import Worker
from myshop_ops.tools.recommend import MatrixCache, Recommender
from tests.support.events import T0, publish, stored_profile
from tests.support.services import ROOT, run_cli
from tests.support.workers import prepare

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("php") is None, reason="php-cli missing (make test installs it from Debian)"),
]

SHOP_DIMS = "1536"  # the shop's UserEmbedding refuses any other length
SCRIPT = ROOT / "tests" / "shop" / "shop_mongo.php"


def php(settings, *args: str) -> dict:
    """Run the shop's MongoDB code; its JSON answer."""
    done = subprocess.run(["php", str(SCRIPT), settings.mongodb_url, settings.mongodb_db, *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"shop_mongo.php {args[0]}: {done.stderr}"
    return json.loads(done.stdout)


def product_body(event, as_int: bool) -> bytes:
    """The event as the shop's Symfony serializer sends it: camelCase, the product id as an int."""
    data = json.loads(serialise(event))
    if as_int:
        data["productId"] = int(data.pop("product_id"))
    return json.dumps(data).encode()


def test_the_shop_reads_adopted_and_new_profiles_and_ranks_as_myshop_does(env, tmp_path):
    env["EMBEDDING_DIMENSIONS"] = SHOP_DIMS
    s = env.settings()
    hp = HashProvider(s.embedding_dimensions, s.model)
    php(s, "ensure-indexes")  # the shop ran first: idx_user_id {user_id: 1} unique, idx_last_updated
    done = run_cli("setup-indexes", "--json", env=env.subprocess_env())
    assert done.returncode == 0, done.stderr
    states = {(r["collection"], r["index"]): r["state"] for r in json.loads(done.stdout)["indexes"]}
    assert states[("user_embeddings", "user_id_unique")] == "existing as idx_user_id"
    assert states[("user_embeddings", "last_updated")] == "existing as idx_last_updated"
    store = Store(s.mongodb_url, s.mongodb_db)
    users_indexes = store.users.index_information()
    assert "user_id_unique" not in users_indexes and "last_updated" not in users_indexes  # no second index
    assert store.missing_indexes() == []

    # the shop's catalog, written by its sync: string ids, arrays, no model or dimensions
    ids = [str(i) for i in range(40, 56)]
    catalog = {pid: hp.embed_one(f"product {pid} item") for pid in ids}
    (tmp_path / "products.json").write_text(json.dumps([
        {"product_id": pid, "embedding": [float(x) for x in v], "name": f"Product {pid}", "description": "",
         "category": "shop"} for pid, v in catalog.items()]))
    assert php(s, "write-products", str(tmp_path / "products.json")) == {"saved": len(ids)}

    # profiles the shop's PHP workers wrote: unit vectors, second-precision last_updated, no magnitude or counts
    adopted = [f"shop-{i}" for i in range(4)]
    priors = {u: hp.embed_one(f"{u} history") for u in adopted}
    prior_t = {u: T0 - timedelta(days=3 + i, seconds=17) for i, u in enumerate(adopted)}
    (tmp_path / "profiles.json").write_text(json.dumps([
        {"user_id": u, "vector": [float(x) for x in priors[u]], "last_updated": int(prior_t[u].timestamp()),
         "version": version} for u in adopted for version in (1, 2)]))  # inserted, then updated by version
    assert php(s, "write-profiles", str(tmp_path / "profiles.json")) == {"written": 8}

    fresh = [f"new-{i}" for i in range(4)]
    events = []
    for i, user in enumerate(adopted + fresh):
        for k in range(5):
            when = T0 + timedelta(hours=5 * k + i, minutes=k)
            if k == 2:
                events.append((make_event(user, "search", f"gift for {user}", when), None))
            else:
                pid = ids[(3 * i + k) % len(ids)]
                events.append((make_event(user, ("product_view", "product_click", "product_purchase")[k % 3], pid,
                                          when), k % 2 == 0))
    events.append((make_event(adopted[0], "product_view", ids[0], prior_t[adopted[0]] - timedelta(days=1)), True))
    bodies = [product_body(e, as_int) if as_int is not None else serialise(e) for e, as_int in events]
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(bodies) + b"\n")
    topo = prepare(s)
    publish(s, topo, bodies)
    worker = Worker(s, prefetch=200, limits=Limits(messages=len(bodies), seconds=60))
    assert worker.run() == 0
    assert (worker.totals.applied, worker.totals.failed) == (len(bodies), 0)  # untagged vectors, int ids: used

    # every profile as the rule says: the shop's unit vector is one event of weight 1 at its last_updated
    docs = {d["user_id"]: d for d in store.users.find({}, {"_id": 0})}
    for user in adopted + fresh:
        evs = [e for e, _ in events if e.user_id == user]
        vecs = np.stack([hp.embed_one(normalise_phrase(e.search_phrase)) if e.search_phrase else catalog[e.product_id]
                         for e in evs])
        prior = None
        if user in adopted:
            shop_t = prior_t[user].replace(microsecond=0)
            unit = (priors[user] / float(np.linalg.norm(priors[user].astype(np.float64)))).astype(np.float32)
            prior = Profile(unit, 1.0, to_days(shop_t), s.model, s.embedding_dimensions)
            record = docs[user]["adopted"]  # the prior itself, bit-exact: verify recomputes from it
            assert (record["version"], record["last_updated"], record["event_count"], record["event_counts"],
                    record["magnitude"]) == (2, shop_t, 0, {}, 1.0)
            assert np.array_equal(decode_vector(record["vector"]), prior.embedding)
        expected = fold(prior, np.array([to_days(e.occurred_at) for e in evs]),
                        np.array([s.weights[e.event_type] for e in evs]), vecs, lam=s.decay_lambda, model=s.model)
        got = stored_profile(s, docs[user])
        assert np.max(np.abs(got.embedding - expected.embedding)) < 1e-6, user
        assert got.magnitude == pytest.approx(expected.magnitude, rel=1e-6), user
        assert docs[user]["event_count"] == len(evs) and docs[user]["version"] == (3 if user in adopted else 1)

    # the shop's reader takes every profile; its ranking equals `myshop recommend`
    read = php(s, "read-profiles", *adopted, *fresh)
    for user, profile in read.items():
        assert "error" not in profile, (user, profile)
        assert np.array_equal(np.array(profile["vector"], np.float32), stored_profile(s, docs[user]).embedding)
    ranked = php(s, "rank", "5", *adopted, *fresh)
    for user in adopted + fresh:
        done = run_cli("recommend", user, "--limit", "5", "--json", env=env.subprocess_env())
        assert done.returncode == 0, done.stderr
        ours = [(r["product_id"], r["score"]) for r in json.loads(done.stdout)["recommendations"]]
        assert [p for p, _ in ranked[user]] == [p for p, _ in ours], user
        np.testing.assert_allclose([sc for _, sc in ranked[user]], [sc for _, sc in ours], atol=1e-6)

    # verify checks every user exactly: an adopted one as fold(the prior its adoption record holds, the events)
    done = run_cli("verify", "--events", str(tmp_path / "events.jsonl"), "--json", env=env.subprocess_env())
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], report
    assert (report["users"], report["users_ok"], report["users_unverifiable"], report["users_adopted"]) == (8, 8, 0, 4)

    # the shop's PHP worker writes again after us (a rollback): the next event adopts its vector anew
    user = adopted[1]
    before = read_profile(docs[user], s.model, s.embedding_dimensions)
    shop_vector = hp.embed_one("rolled back")
    shop_when = T0 + timedelta(days=2)
    (tmp_path / "again.json").write_text(json.dumps([{"user_id": user, "vector": [float(x) for x in shop_vector],
                                                      "last_updated": int(shop_when.timestamp()),
                                                      "version": before.version + 1}]))
    assert php(s, "write-profiles", str(tmp_path / "again.json")) == {"written": 1}
    done = run_cli("verify", "--events", str(tmp_path / "events.jsonl"), "--json", env=env.subprocess_env())
    problem = {p["user_id"]: p for p in json.loads(done.stdout)["problems"]}[user]
    assert done.returncode == 1 and problem["status"] == "unverifiable" and "after myshop's last write" in problem[
        "reason"]
    late = make_event(user, "product_purchase", ids[5], shop_when + timedelta(hours=1))
    publish(s, topo, [late])
    worker = Worker(s, prefetch=10, limits=Limits(messages=1, seconds=60))
    assert worker.run() == 0 and worker.totals.applied == 1
    expected = fold(Profile(shop_vector, 1.0, to_days(shop_when), s.model, s.embedding_dimensions),
                    np.array([to_days(late.occurred_at)]), np.array([s.weights["product_purchase"]]),
                    catalog[ids[5]][None, :], lam=s.decay_lambda, model=s.model)
    doc = store.users.find_one({"user_id": user}, {"_id": 0})
    got = stored_profile(s, doc)
    assert np.max(np.abs(got.embedding - expected.embedding)) < 1e-6
    assert got.magnitude == pytest.approx(expected.magnitude, rel=1e-6)
    assert doc["adopted"]["version"] == before.version + 1 and doc["adopted"]["event_count"] == 5
    assert "error" not in php(s, "read-profiles", user)[user]
    # adopted anew: verify recomputes it from the new prior and the events since (a file of those alone)
    (tmp_path / "late.jsonl").write_bytes(serialise(late) + b"\n")
    done = run_cli("verify", "--events", str(tmp_path / "late.jsonl"), "--json", env=env.subprocess_env())
    report = json.loads(done.stdout)
    assert done.returncode == 0 and (report["users_ok"], report["users_adopted"]) == (1, 1), report
    store.close()


def test_a_product_the_shop_re_embeds_is_seen_by_a_running_recommender(env, tmp_path):
    """The shop's sync writes updated_at as an ISO string, myshop as a date: a process that cached the product
    matrix reloads it after the shop's write (a sort over both types put every date first: the shop's update was
    never seen)."""
    env["EMBEDDING_DIMENSIONS"] = SHOP_DIMS
    s = env.settings()
    hp = HashProvider(s.embedding_dimensions, s.model)
    store = Store(s.mongodb_url, s.mongodb_db)
    store.upsert_products([{"product_id": f"m{i}", "embedding": hp.embed_one(f"myshop {i}"), "model": s.model,
                            "dimensions": s.embedding_dimensions, "name": f"M{i}"} for i in range(5)])

    def shop_writes(vector, at: str) -> None:
        (tmp_path / "p.json").write_text(json.dumps([{"product_id": "s1", "embedding": [float(x) for x in vector],
                                                      "name": "S1", "description": "", "category": "shop",
                                                      "updated_at": at}]))
        assert php(s, "write-products", str(tmp_path / "p.json")) == {"saved": 1}

    taste = hp.embed_one("the user's taste")
    shop_writes(-taste, "2026-02-10T14:30:00+00:00")
    (tmp_path / "u.json").write_text(json.dumps([{"user_id": "shopper", "vector": [float(x) for x in taste],
                                                  "last_updated": int(T0.timestamp()), "version": 1}]))
    assert php(s, "write-profiles", str(tmp_path / "u.json")) == {"written": 1}
    recommender = Recommender(s, store, cache=MatrixCache())
    assert recommender.recommend("shopper", limit=6).items[-1].product_id == "s1"  # opposite: ranked last
    shop_writes(taste, "2026-02-10T14:31:05+00:00")  # the shop re-embedded it a minute later
    top = recommender.recommend("shopper", limit=1).items[0]
    assert (top.product_id, round(top.score, 4)) == ("s1", 1.0)
    assert recommender.cache.loads == 2
    store.close()


def test_the_newest_products_fallback_orders_the_shops_and_myshops_products_by_time(env, tmp_path):
    """A user without a profile gets the newest products: the shop's (updated_at an ISO string) and myshop's (a
    date) in the order of their times, not every date first."""
    env["EMBEDDING_DIMENSIONS"] = SHOP_DIMS
    s = env.settings()
    hp = HashProvider(s.embedding_dimensions, s.model)
    store = Store(s.mongodb_url, s.mongodb_db)
    store.upsert_products([{"product_id": "mine", "embedding": hp.embed_one("mine"), "model": s.model,
                            "dimensions": s.embedding_dimensions, "name": "Mine"}])  # updated_at: now, a date
    (tmp_path / "p.json").write_text(json.dumps([
        {"product_id": pid, "embedding": [float(x) for x in hp.embed_one(pid)], "name": pid, "description": "",
         "category": "shop", "updated_at": at}
        for pid, at in (("shop-new", "2099-01-01T00:00:00+00:00"), ("shop-old", "2020-01-01T00:00:00+01:00"))]))
    assert php(s, "write-products", str(tmp_path / "p.json")) == {"saved": 2}
    fallback = Recommender(s, store, cache=MatrixCache()).recommend("nobody", limit=3, fallback=True)
    assert [i.product_id for i in fallback.items] == ["shop-new", "mine", "shop-old"]
    store.close()
