"""`make demo`: the main job end to end on local services with the offline `hash` embeddings.

Declares the topology and indexes, stores demo product vectors, publishes a few hundred events,
runs `myshop consume` until they are all handled, and prints what the profiles now hold.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta

os.environ.setdefault("EMBEDDING_PROVIDER", "hash")
os.environ.setdefault("LOG_FORMAT", "console")
os.environ.setdefault("MONGODB_DB", "myshop_demo")
os.environ.setdefault("RABBITMQ_QUEUE", "user_embedding_updates")

from rich.console import Console
from rich.table import Table

from myshop_ops import broker
from myshop_ops.broker import Publisher, Topology
from myshop_ops.config import load_settings
from myshop_ops.contract import make_event, serialise
from myshop_ops.embeddings import HashProvider
from myshop_ops.store import Store

PRODUCTS = {
    "audio-001": "Wireless noise cancelling headphones",
    "audio-002": "Bluetooth portable speaker waterproof",
    "audio-003": "In-ear wireless earbuds with charging case",
    "shoes-001": "Trail running shoes for men",
    "shoes-002": "Lightweight road running shoes for women",
    "kitchen-001": "Stainless steel espresso machine",
    "kitchen-002": "Cast iron skillet 28 cm",
    "books-001": "Science fiction novel paperback",
    "toys-001": "Wooden building blocks for toddlers",
    "garden-001": "Cordless electric lawn mower",
}
SEARCHES = ["wireless headphones", "running shoes", "espresso machine", "kids toys", "bluetooth speaker",
            "lawn mower", "sci-fi books", "cast iron pan"]
USERS, EVENTS_PER_USER = 30, 10

console = Console()


def myshop(*args: str) -> None:
    console.print(f"[bold cyan]$ myshop {' '.join(args)}[/]")
    done = subprocess.run([sys.executable, "-m", "myshop_ops", *args])
    if done.returncode != 0:
        sys.exit(done.returncode)


def main() -> None:
    s = load_settings()
    myshop("setup-transports")
    myshop("setup-indexes")
    store = Store(s.mongodb_url, s.mongodb_db)
    hp = HashProvider(s.embedding_dimensions, s.model)
    store.upsert_products([
        {"product_id": pid, "embedding": hp.embed_one(name), "model": s.model, "dimensions": s.embedding_dimensions,
         "name": name, "category": pid.split("-")[0]}
        for pid, name in PRODUCTS.items()
    ])
    console.print(f"stored {len(PRODUCTS)} demo product vectors ({s.model}, {s.embedding_dimensions}d)")

    rng = random.Random(7)
    now = datetime.now(UTC)
    events = []
    for u in range(USERS):
        for _ in range(EVENTS_PER_USER):
            kind = rng.choice(["search", "product_view", "product_click", "product_purchase"])
            ref = rng.choice(SEARCHES) if kind == "search" else rng.choice(list(PRODUCTS))
            events.append(make_event(f"demo-{u:03d}", kind, ref, now - timedelta(days=rng.uniform(0, 60))))
    topo = Topology.from_settings(s)
    conn = broker.connect(s.rabbitmq_dsn, name="myshop-demo")
    pub = Publisher(conn)
    for e in events:
        pub.publish(topo.exchange, topo.queue, serialise(e), message_id=e.message_id)
    conn.close()
    console.print(f"published {len(events)} events for {USERS} users to '{topo.queue}' (publisher confirms)")

    myshop("consume", "--limit", str(len(events)), "--time-limit", "120")

    users = store.users
    types = ("search", "product_view", "product_click", "product_purchase")
    table = Table("user", "version", "events", "search", "view", "click", "purchase", "last updated", "magnitude",
                  title=f"user_embeddings in {s.mongodb_db}: {users.count_documents({})} profiles")
    for doc in users.find({}, {"embedding": 0, "recent_message_ids": 0}).sort("user_id", 1).limit(8):
        counts = [str(doc["event_counts"].get(t, 0)) for t in types]
        table.add_row(doc["user_id"], str(doc["version"]), str(doc["event_count"]), *counts,
                      doc["last_updated"].strftime("%Y-%m-%d"), f"{doc['magnitude']:.3f}")
    console.print(table)
    store.close()


if __name__ == "__main__":
    main()
