"""Benchmark 4 — memory: RSS of one `myshop consume --limit N --prefetch 500` worker draining N = 100k prefilled
events, VmRSS sampled from /proc/<pid>/status every second.

Few users (10 x 10,000 events) so a batch of 500 groups ~50 events per user: the Mongo-wire test server (a few
hundred writes/s) would take minutes for 100k events with many users. Baseline (same run): the worker's RSS
when it attached (logged "consuming"), before the first batch.

Target: flat (growth after warm-up, 25% of the run -> end, under 10%) and under 150 MB.

    .venv/bin/python benchmarks/bench_memory.py [--events 100000] [--users 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Proc, Row, bench_env, check_run, consume_args, log, report

NAME = "memory"


def run(events: int = 100_000, users: int = 10) -> list[Row]:
    with bench_env("mem") as env:
        t = time.monotonic()
        msgs = env.synthesize(users, events // users).messages
        n = len(msgs)
        env.publish(msgs)
        env.wait_depth(n, timeout=120)
        del msgs
        log(f"memory: {n:,} events prefilled in {time.monotonic() - t:.0f} s")
        proc = Proc(env, consume_args(limit=n, prefetch=500), name="mem-worker", sample_rss=True).wait_ready()
        wrun = proc.finish(timeout=1200)
        check_run(wrun, n, "memory worker")
    rss = wrun.rss
    if not rss:
        raise RuntimeError("no RSS samples")
    start, peak, end = rss[0][1], max(m for _, m in rss), rss[-1][1]
    quarter = next((m for s, m in rss if s >= 0.25 * rss[-1][0]), start)
    growth = (end - quarter) / quarter
    log(f"memory: RSS start {start:.1f} MB, max {peak:.1f} MB, end {end:.1f} MB over {len(rss)} samples, "
        f"{n / wrun.wall_s:,.0f} events/s")
    note = (f"{n:,} events, {users} users, prefetch 500, {len(rss)} samples (1/s) over {wrun.wall_s:.0f} s; RSS at 25% "
            f"of the run {quarter:.1f} MB -> end {end:.1f} MB ({growth * 100:+.1f}%); 1 run (slow)")
    flat = growth < 0.10
    return [
        Row(NAME, "RSS start (attached)", start, None, digits=1, unit="MB", note=note),
        Row(NAME, "RSS max", peak, start, "RSS at start", "< 150 MB", met=peak < 150, digits=1, unit="MB"),
        Row(NAME, "RSS end", end, start, "RSS at start", "flat (< +10% after warm-up)", met=flat, digits=1,
            unit="MB"),
        Row(NAME, "events/s", n / wrun.wall_s, None, digits=0,
            note=f"{wrun.writes:,} profile writes ({wrun.writes / n:.4f}/event)"),
        Row(NAME, "worker CPU µs/event (wait4, 100k events)", wrun.cpu_total_s / n * 1e6, None, "", "<= 150",
            met=wrun.cpu_total_s / n * 1e6 <= 150, digits=0,
            note=f"start-up {wrun.cpu_start_s:.2f} s and shutdown CPU included, amortised over {n:,} events; "
                 f"work alone (consuming -> stopped): {(wrun.cpu_work_s or 0) / n * 1e6:.0f} µs/event"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=10)
    a = ap.parse_args()
    rows = run(a.events, a.users)
    report(NAME, rows, "Benchmark 4: memory")


if __name__ == "__main__":
    main()
