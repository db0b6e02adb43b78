"""The naive per-message worker the benchmarks compare `myshop consume` with (a baseline, not a product).

Same broker, queue, Redis, store, provider, contract and profile math as the real worker, but one message at a
time: prefetch 1; parse; one Redis GET (seen?) ; the product's vector by one ``find_one`` or the search phrase
embedded by the same hash provider; ``find_one`` of the profile, the event folded in, one ``update_one``
(upsert); one Redis SET; one ack. Configured by the same environment variables as `myshop consume`.

Prints "consuming" on stderr once attached, "worker stopped" once disconnected and one JSON line on stdout:
{"processed", "applied", "duplicate", "skipped", "failed", "writes", "wait_ms": [p50, p95, p99] | null}
(``wait_ms``: publish-to-ack of the messages carrying ``x-published-at``; ``--waits`` adds every one as
``waits_ms``). Stops after ``--limit`` messages, on SIGTERM/SIGINT, or after ``--idle`` seconds without a message.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pika
import redis
from pymongo import MongoClient

from myshop_ops.adapters.broker import published_at
from myshop_ops.adapters.config import load_settings
from myshop_ops.adapters.embeddings import HashProvider, normalise_phrase
from myshop_ops.adapters.store import PRODUCTS, USERS
from myshop_ops.base.contract import InvalidMessage, parse
from myshop_ops.base.layout import decode_vector, encode_vector
from myshop_ops.base.profile import Profile, apply_event, from_days, to_days


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--idle", type=float, default=None, help="stop after this many seconds without a message")
    ap.add_argument("--waits", action="store_true", help="also print every publish-to-ack wait (ms) as waits_ms")
    args = ap.parse_args()
    s = load_settings()
    stop = {"flag": False}

    def on_signal(_sig, _frame) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    r = redis.Redis.from_url(s.redis_url)
    mongo = MongoClient(s.mongodb_url, tz_aware=True)
    db = mongo[s.mongodb_db]
    users, products = db[USERS], db[PRODUCTS]
    provider = HashProvider(s.embedding_dimensions, s.model)
    conn = pika.BlockingConnection(pika.URLParameters(s.rabbitmq_dsn))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1)
    counts = {"processed": 0, "applied": 0, "duplicate": 0, "skipped": 0, "failed": 0, "writes": 0}
    waits: list[float] = []
    print("consuming", file=sys.stderr, flush=True)
    last = time.monotonic()
    for method, props, body in ch.consume(s.queue, inactivity_timeout=0.2):
        if stop["flag"] or (args.limit is not None and counts["processed"] >= args.limit):
            break
        if method is None:
            if args.idle is not None and time.monotonic() - last > args.idle:
                break
            continue
        last = time.monotonic()
        counts[handle(body, r, users, products, provider, s)] += 1
        ch.basic_ack(method.delivery_tag)
        counts["processed"] += 1
        if (t := published_at(props)) is not None:
            waits.append(time.time() - t)
        if args.limit is not None and counts["processed"] >= args.limit:
            break
    ch.cancel()
    conn.close()
    print("worker stopped", file=sys.stderr, flush=True)
    counts["writes"] = counts["applied"]
    waits.sort()
    pick = lambda p: round(waits[min(len(waits) - 1, int(p / 100 * len(waits)))] * 1000, 1)  # noqa: E731
    counts["wait_ms"] = [pick(50), pick(95), pick(99)] if waits else None
    if args.waits:
        counts["waits_ms"] = [round(w * 1000, 1) for w in waits]
    print(json.dumps(counts), flush=True)
    return 0


def handle(body: bytes, r: redis.Redis, users, products, provider: HashProvider, s) -> str:
    try:
        event = parse(body)
    except InvalidMessage:
        return "failed"
    key = s.redis_prefix + "processed:" + event.key
    if r.get(key) is not None:
        return "duplicate"
    if event.search_phrase is not None:
        vector = provider.embed_one(normalise_phrase(event.search_phrase))
    else:
        doc = products.find_one({"product_id": event.product_id}, {"embedding": 1, "_id": 0})
        if doc is None:
            return "skipped"
        vector = decode_vector(doc["embedding"])
    current = users.find_one({"user_id": event.user_id}, {"embedding": 1, "magnitude": 1, "last_updated": 1, "_id": 0})
    prof = None if current is None else Profile(
        embedding=decode_vector(current["embedding"]), magnitude=float(current["magnitude"]),
        last_updated=to_days(current["last_updated"]), model=s.model, dimensions=s.embedding_dimensions)
    new = apply_event(prof, to_days(event.occurred_at), s.weights[event.event_type], vector, lam=s.decay_lambda,
                      model=s.model)
    users.update_one(
        {"user_id": event.user_id},
        {"$set": {"embedding": encode_vector(new.embedding), "magnitude": new.magnitude, "model": s.model,
                  "dimensions": s.embedding_dimensions, "last_updated": from_days(new.last_updated),
                  "updated_at": datetime.now(UTC), "last_event_type": event.event_type,
                  "last_event_id": event.message_id},
         "$inc": {"version": 1, "event_count": 1, f"event_counts.{event.event_type}": 1}},
        upsert=True,
    )
    r.set(key, b"1", ex=s.idempotency_ttl)
    return "applied"


if __name__ == "__main__":
    sys.exit(main())
