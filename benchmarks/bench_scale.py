"""Benchmark 6 — scale: 1, 2 and 3 `myshop consume --prefetch 500 --metrics-port P` workers on the same prefilled queue.

Workload: 20 users x 400 mixed events = 8,000 events (few users, so the Mongo-wire test server's few hundred
writes/s do not hide the workers; all workers share the users, so optimistic-lock conflicts appear as they
would without routing by user). The measured window starts when the last worker attached (the first ones get a
head start while the others import) and ends when every event is settled, read from each worker's /metrics
(messenger_processed_messages_total) and /proc/<pid>/stat (CPU) every 0.2 s. Reported: events/s in total and per
worker, worker CPU µs per event, profile writes per event and version conflicts (from the workers' metrics).
Baseline: 1 worker, same run. WORKER_RETRY_DELAY=200 ms so a version conflict that exhausts its re-reads comes back
quickly.

    .venv/bin/python benchmarks/bench_scale.py [--reps 3] [--workers 1 2 3] [--users 20] [--events 8000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Proc,
    Row,
    bench_env,
    consume_args,
    log,
    median,
    metric_sum,
    report,
    scrape,
    settled,
)
from tests.support.services import free_port
from tests.support.workers import proc_cpu

NAME = "scale"


def one(env, k: int, users: int, events: int) -> dict:
    env.reset_data()
    msgs = env.synthesize(users, events // users).messages
    n = len(msgs)
    env.publish(msgs)
    env.wait_depth(n)
    ports = [free_port() for _ in range(k)]
    procs = [Proc(env, consume_args(prefetch=500, metrics_port=p), name=f"scale{k}-{i}") for i, p in enumerate(ports)]
    try:
        for p in procs:
            p.wait_ready()
        texts = [scrape(p) for p in ports]
        t0 = time.monotonic()
        cpu0 = [proc_cpu(p.pid) for p in procs]
        done0 = [settled(t) for t in texts]
        while True:
            texts = [scrape(p) for p in ports]
            cpu1 = [proc_cpu(p.pid) for p in procs]
            t1 = time.monotonic()
            done1 = [settled(t) for t in texts]
            if sum(done1) >= n:
                break
            if t1 - t0 > 600:
                raise RuntimeError(f"scale {k}: {sum(done1)} of {n} settled after 600 s")
            time.sleep(0.2)
    finally:
        for p in procs:
            p.terminate()
        runs = [p.finish(timeout=60) for p in procs]
    span = t1 - t0
    per = [(d1 - d0) for d0, d1 in zip(done0, done1, strict=True)]
    cpu = [(c1 - c0) for c0, c1 in zip(cpu0, cpu1, strict=True)]
    conflicts = sum(metric_sum(t, "myshop_version_conflicts_total") for t in texts)
    retried = sum(metric_sum(t, "myshop_retries_total") for t in texts)
    return {
        "rate": sum(per) / span,
        "per_worker": [x / span for x in per],
        "cpu_us": sum(cpu) / sum(per) * 1e6 if sum(per) else None,
        "cpu_us_each": [c / x * 1e6 if x else None for c, x in zip(cpu, per, strict=True)],
        "head_start": sum(done0),
        "writes_per_event": sum(r.writes for r in runs) / n,
        "conflicts": conflicts,
        "retried": retried,
    }


def run(reps: int = 3, workers: tuple[int, ...] = (1, 2, 3), users: int = 20, events: int = 8_000) -> list[Row]:
    results: dict[int, list[dict]] = {k: [] for k in workers}
    with bench_env("scl", WORKER_RETRY_DELAY="200") as env:
        for rep in range(reps):
            for k in workers:  # interleaved: rep 1 of every count, then rep 2, ...
                r = one(env, k, users, events)
                results[k].append(r)
                log(f"scale rep {rep + 1}: {k} worker(s): {r['rate']:,.0f} events/s "
                    f"(each {[round(x) for x in r['per_worker']]}), {r['cpu_us']:.0f} µs CPU/event, "
                    f"{r['writes_per_event']:.3f} writes/event, {r['conflicts']:.0f} conflicts, head start "
                    f"{r['head_start']:.0f}")
    m = lambda k, key: median([r[key] for r in results[k]])  # noqa: E731
    base = m(workers[0], "rate")
    rows = []
    for k in workers:
        each = [median([r["per_worker"][i] for r in results[k]]) for i in range(k)]
        rows.append(Row(
            NAME, f"{k} worker(s): events/s total", m(k, "rate"), base, f"{workers[0]} worker", digits=0,
            runs=[r["rate"] for r in results[k]],
            note=f"each {[round(x) for x in each]}/s; CPU {m(k, 'cpu_us'):.0f} µs/event; "
                 f"{m(k, 'writes_per_event'):.3f} writes/event; {m(k, 'conflicts'):.0f} version conflicts, "
                 f"{m(k, 'retried'):.0f} retried; runs {[round(r['rate']) for r in results[k]]}"))
        rows.append(Row(NAME, f"{k} worker(s): CPU µs/event", m(k, "cpu_us"), m(workers[0], "cpu_us"),
                        f"{workers[0]} worker", digits=0, runs=[r["cpu_us"] for r in results[k]]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--events", type=int, default=8_000)
    a = ap.parse_args()
    rows = run(a.reps, tuple(a.workers), a.users, a.events)
    report(NAME, rows, "Benchmark 6: scale")


if __name__ == "__main__":
    main()
