"""Benchmark 1 — publishing: the `generate-test-events` path (WindowedPublisher, window 1000, 50k events) vs a naive
publish-and-wait-per-message loop (pika BlockingConnection + confirm_delivery, a few thousand events, rate
extrapolated). Both publish the same synthetic bodies (myshop_ops.tools.generate.synthesize) persistent and mandatory
to the main exchange of a fresh quorum queue, which is purged between runs.

Targets: >= 10k events/s and >= 10x the naive loop.

    .venv/bin/python benchmarks/bench_publish.py [--reps 3] [--events 50000] [--naive-events 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pika

from benchmarks.common import RABBIT, Row, bench_env, log, median, report
from myshop_ops.adapters.broker import PERSISTENT

NAME = "publish"


def naive_publish(env, messages) -> tuple[float, float]:
    """(events/s, client CPU µs per event) of BlockingConnection + confirm_delivery, waiting for each confirm."""
    conn = pika.BlockingConnection(pika.URLParameters(RABBIT))
    ch = conn.channel()
    ch.confirm_delivery()
    topo = env.topology
    cpu0, t0 = time.process_time(), time.perf_counter()
    for body, mid in messages:
        ch.basic_publish(topo.exchange, topo.queue, body,
                         pika.BasicProperties(content_type="application/json", delivery_mode=PERSISTENT,
                                              message_id=mid), mandatory=True)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    conn.close()
    return len(messages) / elapsed, cpu / len(messages) * 1e6


def run(reps: int = 3, events: int = 50_000, naive_events: int = 1000) -> list[Row]:
    ours, ours_cpu, naive, naive_cpu = [], [], [], []
    with bench_env("pub") as env:
        users = 1000
        msgs = env.synthesize(users, events // users).messages
        for rep in range(reps):
            cpu0 = time.process_time()
            res = env.publish(msgs, window=1000)
            ours_cpu.append((time.process_time() - cpu0) / res.published * 1e6)
            ours.append(res.rate)
            log(f"publish rep {rep + 1}: windowed {res.rate:,.0f}/s ({res.published:,} events)")
            env.wait_depth(len(msgs))
            env.purge()
            rate, cpu = naive_publish(env, msgs[:naive_events])
            naive.append(rate)
            naive_cpu.append(cpu)
            log(f"publish rep {rep + 1}: naive {rate:,.0f}/s ({naive_events:,} events)")
            env.purge()
    o, n = median(ours), median(naive)
    return [
        Row(NAME, "events/s", o, n, "naive: wait for each confirm", ">= 10,000/s and >= 10x",
            met=bool(o and n and o >= 10_000 and o / n >= 10), runs=ours,
            note=f"windowed: {events:,} events per run, window 1000 (generate-test-events path); naive: "
                 f"{naive_events:,} events per run, rate extrapolated; runs ours {[round(x) for x in ours]}, "
                 f"naive {[round(x) for x in naive]}"),
        Row(NAME, "publisher CPU µs/event", median(ours_cpu), median(naive_cpu), "naive", digits=1, runs=ours_cpu,
            note="time.process_time() of the publishing process / events (lower is better)"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--naive-events", type=int, default=1000)
    a = ap.parse_args()
    rows = run(a.reps, a.events, a.naive_events)
    report(NAME, rows, "Benchmark 1: publish")


if __name__ == "__main__":
    main()
