"""Benchmark 8 — workers: CHECKLIST.md's performance step with 1, 2 and 3 `myshop consume` workers.

Workload: `myshop generate-test-events --users 100 --events-per-user 50 --yes --wait --json --record F` (5,000
mixed events published as one burst, the shop layout) while k workers consume (`--prefetch 200`, the supervisor's
default), so the figures are the ones an operator gets from the checklist. Reported per worker count: the drain
time (end of publishing to the last profile write) and the publish-to-profile P50/P95 that `--wait` measures;
from each worker's closing log line: version conflicts, trips through a delay queue (by error class), deliveries
kept for a later batch (their user claimed by another worker), and store operations per event: profile documents
read, written, and written in vain (a write that met a newer version: a conflict); and `myshop verify --events F`
(every profile against a recomputation). Baseline: 1 worker, same run. More workers must drain no slower than one
and send nothing to a delay queue for a version conflict.

    .venv/bin/python benchmarks/bench_workers.py [--reps 1] [--workers 1 2 3] [--users 100] [--per-user 50]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Proc, Row, bench_env, consume_args, log, median, report

NAME = "workers"
PREFETCH = 200
WAIT_TIMEOUT_S = 900
FIELDS = ("applied", "writes", "reads", "conflicts", "retried", "kept")


def closing_fields(stderr: str) -> dict[str, int]:
    """The counters of a worker's ``worker stopped`` log line (console format: key=value)."""
    lines = [ln for ln in stderr.splitlines() if "worker stopped" in ln]
    found = dict(re.findall(r"\b(\w+)=(\d+)\b", lines[-1])) if lines else {}
    return {k: int(found.get(k, 0)) for k in FIELDS}


def retry_classes(stderr: str) -> dict[str, int]:
    """Copies sent to a delay queue, by error class (the worker's ``message retried later`` log lines)."""
    out: dict[str, int] = {}
    for cls in re.findall(r"message retried later.*?\berror_class=(\w+)", stderr):
        out[cls] = out.get(cls, 0) + 1
    return out


def one(env, k: int, users: int, per_user: int, start_user: int) -> dict:
    env.purge()  # nothing of an earlier run (a retry copy coming back from a delay queue) joins this one
    env.reset_data()
    procs = [Proc(env, consume_args(prefetch=PREFETCH), name=f"workers{k}-{i}") for i in range(k)]
    try:
        for p in procs:
            p.wait_ready()
        record = env.tmp / f"workers{k}.jsonl"
        record.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "myshop_ops", "generate-test-events", "--users", str(users),
               "--events-per-user", str(per_user), "--start-user-id", str(start_user), "--yes", "--wait",
               "--wait-timeout", str(WAIT_TIMEOUT_S), "--json", "--record", str(record)]
        out = subprocess.run(cmd, env=env.subprocess_env(), capture_output=True, text=True,
                             timeout=WAIT_TIMEOUT_S + 120)
    finally:
        for p in procs:
            p.terminate()
        runs = [p.finish(timeout=120) for p in procs]
    if out.returncode != 0:
        raise RuntimeError(f"generate-test-events --wait with {k} workers: exit {out.returncode}\n"
                           f"{out.stdout[-1500:]}\n{out.stderr[-1500:]}")
    wait = json.loads(out.stdout)["wait"]
    check = subprocess.run([sys.executable, "-m", "myshop_ops", "verify", "--events", str(record), "--wait", "0",
                            "--json"], env=env.subprocess_env(), capture_output=True, text=True, timeout=600)
    verified = json.loads(check.stdout) if check.stdout.strip().startswith("{") else {}
    record.unlink(missing_ok=True)
    totals = {f: sum(closing_fields(r.stderr)[f] for r in runs) for f in FIELDS}
    classes: dict[str, int] = {}
    for r in runs:
        for cls, count in retry_classes(r.stderr).items():
            classes[cls] = classes.get(cls, 0) + count
    n = users * per_user
    cpu = sum(r.cpu_work_s or r.cpu_steady_s for r in runs)
    return {
        "drain": wait["drain_s"],
        "p50": wait["latency_ms"]["p50"] / 1000,
        "p95": wait["latency_ms"]["p95"] / 1000,
        "p99": wait["latency_ms"]["p99"] / 1000,
        "store_ops": (totals["reads"] + totals["writes"] + totals["conflicts"]) / n,
        "reads": totals["reads"] / n,
        "writes": totals["writes"] / n,
        "conflicts": totals["conflicts"],
        "retried": totals["retried"],
        "retried_by_class": classes,
        "conflict_retries": classes.get("VersionConflict", 0),
        "kept": totals["kept"],
        "cpu_us": cpu / n * 1e6,
        "applied": totals["applied"],
        "verify": "OK" if check.returncode == 0 and verified.get("ok") is True else (
            f"FAILED (exit {check.returncode}: lost {verified.get('events_lost')}, "
            f"duplicated {verified.get('events_duplicated')})"),
    }


def run(reps: int = 1, workers: tuple[int, ...] = (1, 2, 3), users: int = 100, per_user: int = 50) -> list[Row]:
    results: dict[int, list[dict]] = {k: [] for k in workers}
    with bench_env("wrk") as env:
        for rep in range(reps):
            for k in workers:  # interleaved: rep 1 of every count, then rep 2, ...
                r = one(env, k, users, per_user, 990_100_000 + 1000 * (rep * 10 + k))
                results[k].append(r)
                log(f"workers rep {rep + 1}: {k} worker(s): drain {r['drain']:.1f} s, P50 {r['p50']:.1f} s, "
                    f"P95 {r['p95']:.1f} s, {r['conflicts']} conflicts, {r['retried']} retried, {r['kept']} kept, "
                    f"{r['store_ops']:.3f} store ops/event (reads {r['reads']:.3f}, writes {r['writes']:.3f}), "
                    f"CPU {r['cpu_us']:.0f} µs/event, applied {r['applied']}, "
                    f"retried by class {r['retried_by_class']}, verify {r['verify']}")
    m = lambda k, key: median([r[key] for r in results[k]])  # noqa: E731
    base = workers[0]
    rows = []
    for k in workers:
        rows.append(Row(
            NAME, f"{k} worker(s): drain of {users} users x {per_user}", m(k, "drain"), m(base, "drain"),
            f"{base} worker", f"<= {base} worker's", met=m(k, "drain") <= m(base, "drain"), digits=1,
            unit="s", runs=[r["drain"] for r in results[k]],
            note=f"P50 {m(k, 'p50'):.1f} s, P95 {m(k, 'p95'):.1f} s, P99 {m(k, 'p99'):.1f} s (publish to profile); "
                 f"{m(k, 'conflicts'):.0f} version conflicts, {m(k, 'retried'):.0f} retried through a delay queue, "
                 f"{m(k, 'kept'):.0f} keeps (a delivery whose user another worker held, counted at each try); "
                 f"CPU {m(k, 'cpu_us'):.0f} µs/event; myshop verify: {[r['verify'] for r in results[k]]}"))
        rows.append(Row(
            NAME, f"{k} worker(s): store operations per event", m(k, "store_ops"), m(base, "store_ops"),
            f"{base} worker", digits=3, runs=[r["store_ops"] for r in results[k]],
            note=f"profile reads {m(k, 'reads'):.3f} + writes {m(k, 'writes'):.3f} + writes in vain "
                 f"(conflicts) per event"))
        rows.append(Row(
            NAME, f"{k} worker(s): delay-queue trips for a version conflict", m(k, "conflict_retries"), None, "",
            "0", met=m(k, "conflict_retries") == 0, digits=0, runs=[r["conflict_retries"] for r in results[k]],
            note=f"every delay-queue trip, by error class: {[r['retried_by_class'] for r in results[k]]}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--per-user", type=int, default=50)
    a = ap.parse_args()
    rows = run(a.reps, tuple(a.workers), a.users, a.per_user)
    report(NAME, rows, "Benchmark 8: workers")


if __name__ == "__main__":
    main()
