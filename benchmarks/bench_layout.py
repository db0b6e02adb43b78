"""Benchmark 7 — the profile layouts (STORE_LAYOUT, myshop_ops/base/layout.py): `shop` (the default: the unit profile as
an array of 1,536 doubles the shop's PHP reader takes) against `compact` (one BSON float32 vector).

Per layout, at 1,536 dimensions:
  bytes per profile document  BSON size of 200 stored profiles (median), after a drain (ids ring full or not)
  bytes per profile write     BSON size of one version-filtered update as sent (filter + update: the vector, both
                              id rings at their size then, counts, times), median over the rewrites below
  write time                  Store.write_profiles of 200 version-filtered updates, 25 per bulk_write, wall time
                              per profile (the Mongo-wire server's share included), and the client's share alone:
                              building and BSON-encoding each update (what transfers to a real MongoDB)
  worker CPU per event        `myshop consume --limit N --prefetch 500` draining 100 users x 50 events (few
                              writes) and 500 users x 4 (one write per event): work CPU (consuming -> stopped) of
                              the worker process (the client: the Mongo-wire server's own CPU is not in it)

    .venv/bin/python benchmarks/bench_layout.py [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bson
import numpy as np

from benchmarks.bench_worker import one
from benchmarks.common import DIMS, Row, bench_env, log, median, report, retry_store
from myshop_ops.adapters.store import ProfileWrite, Store, written
from myshop_ops.base.layout import LAYOUTS
from myshop_ops.base.profile import Profile

NAME = "layout"
SCENARIOS = ((100, 50), (500, 4))  # (users, events per user)
TARGETS = {(100, 50): 150, (500, 4): 210}  # shop layout, worker CPU µs/event: the compact layout's figures before
WRITES, CHUNK = 200, 25  # profiles rewritten per run, per bulk_write
SIZE_SAMPLE = 200  # stored profiles whose size is measured (small replies: the test server is single-threaded)


def writes_for(store: Store, layout: str, model: str) -> tuple[float, float, float]:
    """(wall ms per profile of bulk_writes of CHUNK updates, client µs per profile to build and encode them, median
    BSON bytes of one update as sent: filter and update document)."""
    users = [d["user_id"] for d in store.users.find({}, {"user_id": 1}).limit(WRITES)]
    rng = np.random.default_rng(7)
    wall, client, sizes = [], [], []
    for i in range(0, len(users), CHUNK):
        def chunk(ids=users[i:i + CHUNK]) -> tuple[float, float, list[int]]:
            loaded, _ = store.load_profiles(ids, model, DIMS)  # again after a stalled attempt: versions moved
            writes = []
            for user_id, base in loaded.items():
                vec = rng.standard_normal(DIMS).astype(np.float32)
                p = Profile(vec / np.linalg.norm(vec), 3.0, base.profile.last_updated + 0.001, model, DIMS)
                writes.append(ProfileWrite(user_id, p, base, [rng.bytes(32).hex()], {"search": 1}, "search", "x" * 64))
            t = time.perf_counter()
            ops = [Store._op(w, written(w, b"12345678"), datetime.now(UTC), layout) for w in writes]
            encoded = [bson.encode({"q": op._filter, "u": op._doc}) for op in ops]
            built = time.perf_counter() - t
            t = time.perf_counter()
            result = store.write_profiles(writes, layout)
            if len(result.applied) != len(writes):
                raise RuntimeError("a write conflicted: nothing else writes these profiles")
            return (time.perf_counter() - t) / len(writes) * 1e3, built / len(writes) * 1e6, [len(e) for e in encoded]
        w, c, b = retry_store(chunk, "profile writes")
        wall.append(w)
        client.append(c)
        sizes += b
    return float(np.median(wall)), float(np.median(client)), float(np.median(sizes))


def run(reps: int = 3) -> list[Row]:
    figures: dict[str, dict[str, list[float]]] = {}
    for layout in LAYOUTS:
        f = figures[layout] = {"bytes": [], "write_bytes": [], "wall_ms": [], "client_us": []}
        f.update({f"cpu {u}x{n}": [] for u, n in SCENARIOS})
        f.update({f"wpe {u}x{n}": [] for u, n in SCENARIOS})
        with bench_env("lay", STORE_LAYOUT=layout) as env:
            for rep in range(reps):
                for users, per_user in SCENARIOS:
                    o = one(env, users, per_user, naive=False, rep=rep)
                    f[f"cpu {users}x{per_user}"].append(o["cpu_work_us"])
                    f[f"wpe {users}x{per_user}"].append(o["writes_per_event"])
                    log(f"layout {layout} {users}x{per_user} rep {rep + 1}: work {o['cpu_work_us']:.0f} µs/event, "
                        f"{o['writes_per_event']:.2f} writes/event, {o['retried']} retried")
                store = Store(env.settings.mongodb_url, env.settings.mongodb_db)
                try:
                    sizes = retry_store(lambda s=store: [len(bson.encode(d)) for d in s.users.find(
                        {}, {"_id": 0}, batch_size=25).limit(SIZE_SAMPLE)], "profile sizes")
                    f["bytes"].append(float(np.median(sizes)))
                    wall_ms, client_us, write_bytes = writes_for(store, layout, env.settings.model)
                finally:
                    store.close()
                f["wall_ms"].append(wall_ms)
                f["client_us"].append(client_us)
                f["write_bytes"].append(write_bytes)
                log(f"layout {layout} rep {rep + 1}: {f['bytes'][-1]:,.0f} B/profile, {write_bytes:,.0f} B/write, "
                    f"write {wall_ms:.2f} ms/profile (client {client_us:.0f} µs)")
    shop, compact = figures["shop"], figures["compact"]
    m = median
    rows = [
        Row("layout shop vs compact", "bytes per profile document", m(shop["bytes"]), m(compact["bytes"]), "compact",
            runs=shop["bytes"], note=f"{DIMS} dims; medians over the stored profiles"),
        Row("layout shop vs compact", "bytes per profile write (update as sent, id rings included)",
            m(shop["write_bytes"]), m(compact["write_bytes"]), "compact", runs=shop["write_bytes"]),
        Row("layout shop vs compact", "profile write, ms/profile (bulks of 25, store included)", m(shop["wall_ms"]),
            m(compact["wall_ms"]), "compact", digits=2, runs=shop["wall_ms"]),
        Row("layout shop vs compact", "profile write, client µs/profile (build + BSON encode)", m(shop["client_us"]),
            m(compact["client_us"]), "compact", runs=shop["client_us"]),
    ]
    for users, per_user in SCENARIOS:
        key, wpe = f"cpu {users}x{per_user}", f"wpe {users}x{per_user}"
        target, value = TARGETS[(users, per_user)], m(shop[key])
        rows.append(Row("layout shop vs compact", f"worker CPU µs/event, work, {users}x{per_user}", value,
                        m(compact[key]), "compact", f"<= {target} µs", None if value is None else value <= target,
                        runs=shop[key],
                        note=f"profile writes/event: shop {m(shop[wpe]):.2f}, compact {m(compact[wpe]):.2f}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    rows = run(ap.parse_args().reps)
    report(NAME, rows, "Benchmark 7: profile layouts")


if __name__ == "__main__":
    main()
