"""Benchmark — `myshop verify` on large records files: wall time and peak RSS (os.wait4's ru_maxrss) of one
`myshop verify --events FILE --wait 0 --json` for each size, on a file generated in a temporary directory.

The events are product views, clicks and purchases of USERS users over PRODUCTS products (seeded, 1536-d) and a
few searches; nothing is consumed, so every user is reported lost (the full path runs all the same: reading,
deduplication, failed_messages, product vectors, phrases, the fold and the profile reads). Its own Mongo-wire
server, Redis database BENCH_REDIS_DB, RabbitMQ for the in-flight count (a queue that does not exist: 0).

Target: peak RSS flat in the file's size (the scratch database's bounded cache, CHUNK events in Python), a report
at the end whatever the size (no broker connection held while it computes).

    .venv/bin/python benchmarks/bench_verify.py [--lines 300000 1000000] [--users 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from myshop_ops.adapters.embeddings import HashProvider  # noqa: E402
from myshop_ops.adapters.store import Store  # noqa: E402
from myshop_ops.base.contract import make_event, serialise  # noqa: E402
from tests.support.events import T0  # noqa: E402
from tests.support.services import RABBIT, MongoWire  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS_URL", f"redis://127.0.0.1:6379/{os.environ.get('BENCH_REDIS_DB', '15')}")
PRODUCTS = 300
DIMS = 1536
TYPES = ("product_view", "product_click", "product_purchase", "product_view", "search")


def write_events(path: Path, lines: int, users: int) -> None:
    with path.open("wb") as fh:
        for i in range(lines):
            et = TYPES[i % len(TYPES)]
            ref = f"phrase {i % 50}" if et == "search" else f"p{(i * 7) % PRODUCTS}"
            fh.write(serialise(make_event(f"user-{i % users}", et, ref, T0 + timedelta(seconds=i))) + b"\n")


def run_verify(env: dict, path: Path) -> tuple[float, float, dict]:
    """(seconds, peak RSS in MB, the JSON report) of one verify subprocess."""
    t = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "myshop_ops", "verify", "--events", str(path), "--wait", "0",
                                 "--json", "--max-problems", "0"], env=env, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - t
        out.seek(0)
        err.seek(0)
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, 1):
            raise RuntimeError(f"verify exited {code}: {err.read().decode()[-2000:]}")
        return seconds, usage.ru_maxrss / 1024, json.loads(out.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, nargs="+", default=[300_000, 1_000_000])
    ap.add_argument("--users", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        server = MongoWire(Path(tmp) / "mongo.log")
        server.start()
        try:
            tag = "benchv" + uuid.uuid4().hex[:8]
            env = {**os.environ, "APP_ENV": "test", "RABBITMQ_DSN": RABBIT, "RABBITMQ_QUEUE": f"{tag}.events",
                   "RABBITMQ_FAILED_QUEUE": f"{tag}.failed", "MONGODB_URL": server.url, "MONGODB_DB": tag,
                   "REDIS_URL": REDIS, "REDIS_KEY_PREFIX": f"{tag}:", "EMBEDDING_PROVIDER": "hash",
                   "EMBEDDING_DIMENSIONS": str(DIMS), "MYSHOP_ALLOW_ROOT": "1", "PYTHONPATH": str(ROOT)}
            hp = HashProvider(DIMS, "hash-v1")
            store = Store(server.url, tag)
            store.upsert_products([{"product_id": f"p{i}", "embedding": hp.embed_one(f"product {i}"),
                                    "model": "hash-v1", "dimensions": DIMS} for i in range(PRODUCTS)])
            store.close()
            for lines in args.lines:
                path = Path(tmp) / f"events-{lines}.jsonl"
                write_events(path, lines, args.users)
                seconds, rss, report = run_verify(env, path)
                print(f"verify {lines:>9,} lines ({path.stat().st_size / 2**20:,.0f} MB, {report['users']:,} users, "
                      f"complete {report['complete']}): {seconds:,.0f} s, peak RSS {rss:,.0f} MB", flush=True)
                path.unlink()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
