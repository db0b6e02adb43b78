"""One fault-injection scenario from start to oracle: real worker processes, a fault injected, the exact check after.

A :class:`Scenario` owns one run and ties the other parts together; its steps:

1. products seeded, a planned stream of bodies (N users x M mixed events, shuffled, some late, some published
   twice; malformed bodies in the bad-input scenario) — :func:`~.plan.plan_events`;
2. a :class:`~.feeder.Feeder` thread publishes it with publisher confirms (optionally at a steady rate, so
   consumption and faults overlap) and writes every valid body to ``events.jsonl`` exactly as published (a body
   re-sent after a lost connection is written again: it was published twice);
3. K ``myshop consume`` processes run under a :class:`~.supervisor.Supervisor` that restarts a worker whenever
   it dies (systemd ``Restart=always``) and tells the deaths we caused (kill -9, SIGTERM) from crashes;
4. the test injects its fault (random delays before each injection are fine, waits are conditions);
5. :meth:`Scenario.wait_drained`: the feeder is done, the main and retry queues are empty, the profiles hold
   the expected number of events and ``failed`` the expected number of messages, and — checked with
   ``rabbitmqctl``, the only live source — no worker holds unacked messages (:class:`~.probe.Probe`);
6. :meth:`Scenario.finish`: SIGTERM to every worker (each must exit 0), ``myshop verify --events FILE --json``
   (ok, nothing lost, nothing duplicated), the ids in the ``failed`` queue compared with the expected ones,
   and one JSON line appended to the report (``RELIABILITY_REPORT``, default ``.run/reliability.jsonl``).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from tests.reliability.harness.feeder import Feeder
from tests.reliability.harness.plan import SOAK, Plan, sized
from tests.reliability.harness.probe import Probe, failed_queue_messages, max_attempts
from tests.reliability.harness.supervisor import Supervisor
from tests.support.events import seed_products
from tests.support.services import ROOT, wait_for
from tests.support.workers import Workers, prepare, rabbitmqctl

RUN = f"{socket.gethostname()}-{os.getpid()}"  # tells report lines of concurrent runs apart


def report_path() -> Path:
    return Path(os.environ.get("RELIABILITY_REPORT") or ROOT / ".run" / "reliability.jsonl")


class Scenario:
    """Owns the run of one scenario: topology, plan, feeder, supervisor, drain, stop, oracle, report."""

    def __init__(self, name: str, env, workers: Workers, tmp: Path, *, vhost: str = "/", seed: int = 0,
                 ctl: Callable[..., str] = rabbitmqctl):
        self.name = name
        self.env = env
        self.workers = workers
        self.tmp = tmp
        self.vhost = vhost
        self.rng = random.Random(f"{name}-{seed}")
        self.events_path = tmp / "events.jsonl"
        self.bad_path = tmp / "bad.jsonl"
        self.faults = 0
        self.extra: dict = {}
        self.started = time.monotonic()
        self.settings = env.settings()
        self.topo = prepare(self.settings)
        self.tag = env["MONGODB_DB"]
        self.plan: Plan | None = None
        self.feeders: list[Feeder] = []
        self.supervisor: Supervisor | None = None
        self.probe = Probe(self.settings, self.topo, vhost, ctl)
        self._ids: list[str] | None = None
        self.failed_headers: dict[str, dict] = {}
        self.phases: dict[str, float] = {}
        self._mark = time.monotonic()

    def phase(self, name: str) -> None:
        """Record the seconds since the previous phase mark under ``name`` (in the report)."""
        now = time.monotonic()
        self.phases[name] = round(now - self._mark, 1)
        self._mark = now

    # -- setup --

    def seed_products(self, n: int = 24) -> list[str]:
        ids = [f"{self.tag}-p{i}" for i in range(n)]
        seed_products(self.settings, ids)
        return ids

    def publish(self, plan: Plan, rate: float | None = None) -> Feeder:
        """Start publishing ``plan`` (added to what the scenario published before) in a feeder thread."""
        if self.plan is None:
            self.plan = Plan([], 0, [])
        self.plan.bodies += plan.bodies
        self.plan.distinct += plan.distinct
        self.plan.users += plan.users
        self.plan.bad_ids |= plan.bad_ids
        feeder = Feeder(self.settings.rabbitmq_dsn, self.topo, plan, self.events_path, self.bad_path, rate)
        self.feeders.append(feeder)
        feeder.start()
        return feeder

    @property
    def feeder(self) -> Feeder:
        return self.feeders[-1]

    def feeding(self) -> bool:
        return any(not f.done.is_set() for f in self.feeders)

    def wait_published(self, timeout: float = 300) -> None:
        for f in self.feeders:
            assert f.done.wait(timeout), f"publishing not finished after {timeout}s"
            assert f.error is None, f"feeder failed: {f.error!r}"

    def start_workers(self, k: int, prefetch: int = 100, metrics_ports: Sequence[int] = (),
                      **env_overrides: str) -> Supervisor:
        args = ("--prefetch", str(prefetch), "--time-limit", str(sized(900, 7200)))
        self.supervisor = Supervisor(self.workers, self.env.subprocess_env(**env_overrides), args, k, metrics_ports)
        return self.supervisor

    # -- faults --

    def inject(self, n: int, action: Callable[[int], bool], gap: tuple[float, float],
               guard: Callable[[], bool] | None = None, timeout: float = 600) -> None:
        """``n`` injections of ``action(i)`` (returns False when it could not act now: tried again shortly),
        each after a random delay in ``gap`` seconds, waiting on ``guard()`` to allow it."""
        deadline = time.monotonic() + timeout
        done = 0
        while done < n:
            assert time.monotonic() < deadline, f"{done} of {n} faults injected in {timeout}s"
            time.sleep(self.rng.uniform(*gap))
            if guard is not None:
                wait_for(guard, timeout=max(1.0, deadline - time.monotonic()), interval=0.02, what="fault guard")
            if action(done):
                done += 1
                self.faults += 1

    def poison_guard(self) -> bool:
        assert self.plan is not None
        if self._ids is None:
            self._ids = sorted({b.message_id for b in self.plan.bodies if b.message_id})
        return max_attempts(self.env["REDIS_URL"], self.env["REDIS_KEY_PREFIX"], self._ids) < 2

    # -- the end --

    def expected_applied(self) -> int:
        assert self.plan is not None
        return self.plan.distinct

    def wait_drained(self, timeout: float = 300, settle: float = 15.0) -> None:
        """Until nothing is left to do: everything published, main and retry queues empty, the expected events
        in the profiles and the expected messages in `failed`, and no unacked message anywhere (rabbitmqctl).
        If the counts never match but the queues stay empty for ``settle`` seconds, it returns anyway and the
        oracle reports what is missing."""
        assert self.plan is not None and self.feeders and self.supervisor is not None
        self.wait_published(timeout)
        self.phase("published")
        deadline = time.monotonic() + timeout
        empty_since: float | None = None
        want_applied, want_failed = self.expected_applied(), len(self.plan.bad_ids)
        last: dict = {}
        trace = open(self.tmp / "drain.log", "a")  # noqa: SIM115 - closed below
        traced = 0.0
        while True:
            if time.monotonic() - traced >= 1.0:
                traced = time.monotonic()
                trace.write(f"{time.strftime('%H:%M:%S')} {json.dumps(last, default=str)}\n")
                trace.flush()
            assert time.monotonic() < deadline, (f"not drained after {timeout}s: {last}\n"
                                                 f"{self.supervisor.describe()}")
            ready, applied = self.probe.ready(), self.probe.applied()
            last = {"ready": ready, "applied": applied, "want_applied": want_applied, "want_failed": want_failed}
            if ready is None or applied is None:
                empty_since = None
                time.sleep(0.2)
                continue
            if self.probe.backlog(ready):
                empty_since = None
            elif empty_since is None:
                empty_since = time.monotonic()
            complete = applied == want_applied and ready[self.topo.failed_queue] == want_failed
            if empty_since is not None and (complete or time.monotonic() - empty_since > settle):
                counts = self.probe.unacked()
                last["rabbitmqctl"] = counts
                if all(r == 0 and u == 0 for r, u in counts.values()):
                    trace.close()
                    self.phase("drained")
                    if not complete:
                        print(f"\ndrained without the expected counts: {last}")
                    return
            time.sleep(0.2)

    def verify(self, **env_overrides: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "myshop_ops", "verify", "--events", str(self.events_path),
             "--json", "--max-problems", "10"],
            env=self.env.subprocess_env(**env_overrides), capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert "Traceback" not in done.stderr, done.stderr
        try:
            report = json.loads(done.stdout)
        except ValueError:
            raise AssertionError(f"verify rc={done.returncode}: {done.stdout}\n{done.stderr}") from None
        report["exit_code"] = done.returncode
        return report

    def finish(self, *, expect_restarts: int | None = None, verify_env: dict[str, str] | None = None,
               failed_at_least_once: bool = False) -> dict:
        """Stop the workers (SIGTERM, exit 0 each), run the oracle, check the failed queue, write the report.

        ``failed_at_least_once``: a failed copy may be in `failed` twice (each with its record), as when a broker node
        stops between a copy's confirm and the original's ack (docs/RELIABILITY.md §1.1: a duplicate copy, never a
        loss); every expected message must still be there, and nothing else."""
        assert self.plan is not None and self.supervisor is not None and self.feeders
        sup = self.supervisor
        codes = sup.stop()
        self.phase("stopped")
        bad_exits = {n: c for n, c in codes.items() if c != 0}
        assert not bad_exits, f"workers did not exit 0 on SIGTERM: {bad_exits}\n{sup.describe()}"
        assert not sup.crashes(), f"unexpected worker deaths: {sup.crashes()}\n{sup.describe()}"
        if expect_restarts is not None:
            assert sup.restarts == expect_restarts, f"{sup.restarts} restarts\n{sup.describe()}"
        ready = self.probe.ready()
        assert ready is not None and self.probe.backlog(ready) == 0, f"messages left after the stop: {ready}"
        failed = failed_queue_messages(self.settings, self.topo)
        failed_ids = [m for m, _ in failed]
        report = self.verify(**(verify_env or {}))
        self.phase("verified")
        applied = self.probe.applied()
        failed_records = self.probe.failed_records()
        self.probe.close()
        row = {
            "scenario": self.name,
            "soak": SOAK,
            "faults": self.faults,
            "published": sum(f.published for f in self.feeders),
            "distinct": self.plan.distinct,
            "applied": applied,
            "failed": len(failed_ids),
            "lost": report.get("events_lost"),
            "duplicated": report.get("events_duplicated"),
            "restarts": sup.restarts,
            "seconds": round(time.monotonic() - self.started, 1),
            "workers_started": len(sup.all),
            "resent": sum(f.resent for f in self.feeders),
            "failed_duplicates": len(failed_ids) - len(set(failed_ids)),
            "publish_nacks": sum(f.nacks for f in self.feeders),
            "longest_publish_s": round(max(f.longest_publish_s for f in self.feeders), 2),
            **{f"worker_{k}": v for k, v in sup.totals().items()},
            "phases": self.phases,
            **self.extra,
        }
        write_report(row)
        assert report["exit_code"] == 0 and report["ok"] is True, f"verify: {report}"
        assert report["events_lost"] == 0 and report["events_duplicated"] == 0, report
        assert report["events"] == self.plan.distinct, report
        assert applied == self.expected_applied(), (applied, self.expected_applied(), report)
        assert failed_at_least_once or len(failed_ids) == len(set(failed_ids)), "a message is in `failed` twice"
        unexpected, missing = set(failed_ids) - self.plan.bad_ids, self.plan.bad_ids - set(failed_ids)
        assert not unexpected and not missing, (
            f"failed queue: {len(failed_ids)} messages, expected {len(self.plan.bad_ids)}; unexpected "
            f"{sorted(unexpected)[:10]}, missing {sorted(missing)[:10]}")
        assert failed_records == len(failed_ids), f"{failed_records} failed_messages records, {len(failed_ids)} failed"
        self.failed_headers = dict(failed)
        return row


def write_report(row: dict) -> None:
    path = report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"at": datetime.now().astimezone().isoformat(timespec="seconds"), "run": RUN, **row})
    with open(path, "a") as f:
        f.write(line + "\n")
    print(f"\nRELIABILITY {line}")
