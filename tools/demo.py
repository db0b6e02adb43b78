"""`make demo`: the main job end to end on local services with the offline `hash` embeddings.

Declares the topology and indexes, imports the demo catalog (examples/catalog.jsonl), publishes a few
hundred events (random shoppers plus three with a story), runs `myshop consume` until they are all
handled, prints what the profiles now hold, and ends with each story shopper's recommendations.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Publisher, Topology
from myshop_ops.adapters.config import load_settings
from myshop_ops.adapters.embeddings import make_provider
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.tools.catalog import Product, import_catalog, read_catalog

ROOT = Path(__file__).resolve().parents[1]
# The demo's own settings, whatever the machine's settings file says: on a deployed box (/etc/myshop/myshop.env,
# MYSHOP_ENV_FILE) the demo must not publish to the deployment's queue, write its database or its Redis keys.
DEMO_SETTINGS = {
    "APP_ENV": "dev",
    "RABBITMQ_DSN": "amqp://guest:guest@127.0.0.1:5672/%2f",
    "RABBITMQ_QUEUE": "myshop_demo",
    "RABBITMQ_FAILED_QUEUE": "myshop_demo.failed",
    "MONGODB_URL": "mongodb://127.0.0.1:27017/?directConnection=true",
    "MONGODB_DB": "myshop_demo",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "REDIS_KEY_PREFIX": "myshop_demo:",
    "EMBEDDING_PROVIDER": "hash",
    "LOG_FORMAT": "console",
}


def demo_environment(environ: dict[str, str], settings_path: Path) -> dict[str, str]:
    """The environment the demo and its `myshop` commands run in: the demo's settings file ``settings_path``
    (DEMO_SETTINGS, written here) instead of any other, under the variables set in ``environ`` itself (a developer's
    or a test's explicit choice, e.g. another queue)."""
    settings_path.parent.mkdir(parents=True, exist_ok=True)
    settings_path.write_text("".join(f"{k}={v}\n" for k, v in DEMO_SETTINGS.items()))
    return {**environ, "MYSHOP_ENV_FILE": str(settings_path)}


CATALOG = ROOT / "examples" / "catalog.jsonl"
SEARCHES = ["wireless headphones", "running shoes", "espresso machine", "kids toys", "bluetooth speaker",
            "lawn mower", "sci-fi books", "cast iron pan"]
USERS, EVENTS_PER_USER = 30, 10
# Shoppers whose recommendations the demo ends with: what they did, oldest first.
STORIES = {
    "demo-audio-fan": [("search", "wireless headphones"), ("product_view", "AUD-1001"), ("product_view", "AUD-1009"),
                       ("search", "noise cancelling earbuds"), ("product_click", "AUD-1002"),
                       ("product_purchase", "AUD-1009")],
    "demo-runner": [("search", "running shoes"), ("product_view", "SPT-1001"), ("product_view", "SPT-1002"),
                    ("search", "trail running"), ("product_purchase", "SPT-1002"), ("product_purchase", "SPT-1004")],
    "demo-home-cook": [("search", "cast iron pan"), ("product_view", "KIT-1003"), ("search", "espresso machine"),
                       ("product_click", "KIT-1001"), ("product_purchase", "KIT-1003"), ("product_view", "KIT-1008")],
}
VERBS = {"search": "searched", "product_view": "viewed", "product_click": "clicked", "product_purchase": "bought"}

console = Console()


def myshop(*args: str) -> None:
    console.print(f"[bold cyan]$ myshop {' '.join(args)}[/]")
    done = subprocess.run([sys.executable, "-m", "myshop_ops", *args])
    if done.returncode != 0:
        sys.exit(done.returncode)


def main() -> None:
    os.environ.update(demo_environment(dict(os.environ), ROOT / ".run" / "demo.env"))
    s = load_settings()
    myshop("setup-transports")
    myshop("setup-indexes")
    store = Store(s.mongodb_url, s.mongodb_db)
    result = import_catalog(CATALOG, store, make_provider(s))
    console.print(f"imported {CATALOG.name}: {result.imported} embedded, {result.updated + result.unchanged} "
                  f"already stored, {result.bad} bad ({s.model}, {s.embedding_dimensions}d)")
    catalog = {p.product_id: p for _, p in read_catalog(CATALOG) if isinstance(p, Product)}

    rng = random.Random(7)
    now = datetime.now(UTC)
    events = []
    for u in range(USERS):
        for _ in range(EVENTS_PER_USER):
            kind = rng.choice(["search", "product_view", "product_click", "product_purchase"])
            ref = rng.choice(SEARCHES) if kind == "search" else rng.choice(list(catalog))
            events.append(make_event(f"demo-{u:03d}", kind, ref, now - timedelta(days=rng.uniform(0, 60))))
    for user, story in STORIES.items():
        events += [make_event(user, kind, ref, now - timedelta(days=len(story) - i, minutes=rng.uniform(0, 600)))
                   for i, (kind, ref) in enumerate(story)]
    topo = Topology.from_settings(s)
    conn = broker.connect(s.rabbitmq_dsn, name="myshop-demo")
    pub = Publisher(conn)
    for e in events:
        pub.publish(topo.exchange, topo.queue, serialise(e), message_id=e.message_id)
    conn.close()
    console.print(f"published {len(events)} events for {USERS + len(STORIES)} users to '{topo.queue}' "
                  "(publisher confirms)")

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

    for user, story in STORIES.items():
        console.rule(f"[bold]{user}[/]")
        for kind, ref in story:
            what = f"'{ref}'" if kind == "search" else f"{catalog[ref].name} ({ref}, {catalog[ref].category})"
            console.print(f"  {VERBS[kind]} {what}", highlight=False)
        myshop("recommend", user, "--limit", "5", "--exclude-purchased")


if __name__ == "__main__":
    main()
