"""Publishing test events and computing the profiles they must produce."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import numpy as np

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Publisher, Topology
from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.embeddings import HashProvider, normalise_phrase
from myshop_ops.adapters.store import Store
from myshop_ops.base import profile
from myshop_ops.base.contract import Event, make_event, serialise
from myshop_ops.base.layout import read_profile

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def stored_profile(settings: Settings, doc: dict) -> profile.Profile:
    """A profile document as the math state, asserting it has the configured layout's shape (layout.py)."""
    if settings.store_layout == "shop":
        assert "embedding" not in doc and doc["dimension_count"] == len(doc["vector"]) == settings.embedding_dimensions
        assert all(type(x) is float for x in doc["vector"])  # BSON doubles: what the shop's PHP reader takes
    else:
        assert "vector" not in doc and doc["embedding"].subtype == 9
    read = read_profile(doc, settings.model, settings.embedding_dimensions)
    assert not read.adopted and doc["myshop_version"] == doc["version"]
    return read.profile


def publish(settings: Settings, topo: Topology, bodies: Iterable[bytes | Event], message_ids: bool = True) -> int:
    """Publish events (or raw bodies) to the main exchange with confirms."""
    conn = broker.connect(settings.rabbitmq_dsn)
    pub = Publisher(conn)
    n = 0
    for b in bodies:
        if isinstance(b, Event):
            body, mid = serialise(b), b.message_id
        else:
            body, mid = b, None
        pub.publish(topo.exchange, topo.queue, body, message_id=mid if message_ids else None)
        n += 1
    conn.close()
    return n


def seed_products(settings: Settings, product_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """Store hash vectors for products (text = 'product <id>') and return them."""
    hp = HashProvider(settings.embedding_dimensions, settings.model)
    vectors = {pid: hp.embed_one(f"product {pid} item") for pid in product_ids}
    store = Store(settings.mongodb_url, settings.mongodb_db)
    store.upsert_products(
        [
            {"product_id": pid, "embedding": v, "model": settings.model, "dimensions": settings.embedding_dimensions,
             "name": f"Product {pid}", "category": "test"}
            for pid, v in vectors.items()
        ]
    )
    store.close()
    return vectors


def mixed_events(users: list[str], products: list[str], per_user: int, start: datetime = T0) -> list[Event]:
    """A deterministic mix of all four event types, times spread over days (some out of order)."""
    types = ("search", "product_view", "product_click", "product_purchase")
    out = []
    for u_i, user in enumerate(users):
        for k in range(per_user):
            et = types[(u_i + k) % 4]
            when = start + timedelta(hours=7 * ((k * 5) % per_user), minutes=u_i, seconds=k)  # unique, unordered
            ref = f"wireless headphones {k % 3}" if et == "search" else products[(u_i * 3 + k) % len(products)]
            out.append(make_event(user, et, ref, when))
    return out


def expected_profiles(settings: Settings, events: Iterable[Event], products: dict[str, np.ndarray]) -> dict:
    """Each user's profile by folding its (deduplicated) events at once with the SPEC math."""
    hp = HashProvider(settings.embedding_dimensions, settings.model)
    by_user: dict[str, dict[str, Event]] = defaultdict(dict)
    for e in events:
        by_user[e.user_id][e.message_id] = e
    out = {}
    for user, evs in by_user.items():
        evs_l = [e for e in evs.values() if e.product_id is None or e.product_id in products]
        if not evs_l:
            continue
        vecs = np.stack([
            hp.embed_one(normalise_phrase(e.search_phrase)) if e.search_phrase else products[e.product_id]
            for e in evs_l
        ])
        out[user] = profile.fold(
            None,
            np.array([profile.to_days(e.occurred_at) for e in evs_l]),
            np.array([settings.weights[e.event_type] for e in evs_l]),
            vecs,
            lam=settings.decay_lambda,
            model=settings.model,
        )
    return out
