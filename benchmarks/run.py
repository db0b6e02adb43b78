"""Run every benchmark and print one table (`make bench`). Each benchmark is also a script of its own.

    .venv/bin/python benchmarks/run.py [--only publish worker latency memory window scale layout workers] [--quick]

Needs RabbitMQ, Redis and the Mongo-wire server (`tools/services.sh`). Every figure is the median of repeated runs
(3, or 1 where a run is slow, as each row's note says) with its baseline measured in the same run and the ratio.
Sizes are scaled to the Mongo-wire test server (a few hundred writes/s at best): the notes say where. Results are
also written to .run/bench/*.json. Exit 0 when every benchmark ran, whether or not its target was met; 1 when a
benchmark failed to run (its row says why).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (
    bench_latency,
    bench_layout,
    bench_memory,
    bench_publish,
    bench_scale,
    bench_window,
    bench_worker,
    bench_workers,
)
from benchmarks.common import Row, log, machine, save, table

BENCHMARKS = {  # name: (run function, full sizes, --quick sizes)
    "publish": (bench_publish.run, {}, {"reps": 1, "events": 10_000, "naive_events": 300}),
    "worker": (bench_worker.run, {}, {"reps": 1}),
    "latency": (bench_latency.run, {}, {"seconds": 10, "naive_seconds": 5, "few_users": 0}),
    "memory": (bench_memory.run, {}, {"events": 20_000}),
    "window": (bench_window.run, {}, {"reps": 1}),
    "scale": (bench_scale.run, {}, {"reps": 1, "events": 5_000}),
    "layout": (bench_layout.run, {}, {"reps": 1}),
    "workers": (bench_workers.run, {}, {"users": 20, "per_user": 20}),
}

SCALED = """scaled for the Mongo-wire test server (mongoeco: ~150-450 profile writes/s on this box):
  worker many-users: 2,000 users x 5 events (1 write/event, as 10k users x 5; 50k writes would take minutes)
  naive baselines: 300 events per run, beside the profiles ours wrote (rates extrapolated)
  latency: --prefetch 5000 (batches must grow to what arrives while ~100 profile writes take ~0.5 s);
    baseline: the naive worker under the same load (its queue only grows: lower bounds)
  memory: 10 users x 10,000 events (few users, so 100k events need few writes)
  scale: 20 users x 400 events
  window: 20 bursty users x 10 events
  layout: 100 users x 50 and 500 users x 4 per layout (shop, compact), side by side; 200 profile rewrites in
    bulks of 25; profile sizes from 200 stored profiles
  workers: CHECKLIST.md's performance step as it is (100 users x 50, shop layout), 1 run per worker count"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 run each (a smoke test, not figures)")
    args = ap.parse_args()
    names = args.only or list(BENCHMARKS)
    info = machine()
    log(f"benchmarks: {', '.join(names)} on {info['nproc']} x {info['cpu']}, load {os.getloadavg()[0]:.2f}")
    rows: list[Row] = []
    durations: dict[str, float] = {}
    failed = []
    started = time.monotonic()
    for name in names:
        fn, full, quick = BENCHMARKS[name]
        t = time.monotonic()
        log(f"== {name}")
        try:
            rows += fn(**(quick if args.quick else full))
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            rows.append(Row(name, "ERROR", None, note=f"{type(exc).__name__}: {str(exc)[:300]}"))
        durations[name] = time.monotonic() - t
        log(f"== {name} took {durations[name]:.0f} s")
    total = time.monotonic() - started
    info["loadavg_1m_end"] = os.getloadavg()[0]
    path = save("all", rows, {"machine": info, "durations_s": durations, "quick": args.quick})
    print()
    print(table(rows, f"myshop benchmarks{' (--quick: smoke sizes, not figures)' if args.quick else ''}"))
    print()
    print(SCALED)
    print(f"\nmachine: {info['nproc']} CPU(s), {info['cpu']}, Python {info['python']}; load average "
          f"{info['loadavg_1m']:.2f} at start, {info['loadavg_1m_end']:.2f} at end (1 min)")
    print("took " + ", ".join(f"{n} {d:.0f} s" for n, d in durations.items()) + f"; total {total / 60:.1f} min")
    print(f"results: {path}")
    if failed:
        print(f"FAILED to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
