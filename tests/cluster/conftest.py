"""The cluster reliability suite (issue 16): a private 3-node RabbitMQ cluster (tools/cluster.sh:
rabbit-t1..t3@localhost on 5681-5683, management on 15681-15683), started once for the session and ALWAYS torn
down, whatever happens to the tests. The default node (rabbit@localhost, 5672) is never touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.harness.supervisor import halt_all
from tests.support.services import RELIABILITY, ROOT, redis_url
from tests.support.workers import Workers

SCRIPT = ROOT / "tools" / "cluster.sh"
BASE = Path(os.environ.get("RMQT_BASE", "/tmp/myshop-rmq-cluster"))
PORT = int(os.environ.get("RMQT_PORT", "5680"))  # node i on PORT+i; RMQT_PORT/RMQT_NAME/RMQT_BASE: a second cluster
NAME = os.environ.get("RMQT_NAME", "rabbit-t")
NODES = (1, 2, 3)
DSN = ",".join(f"amqp://guest:guest@127.0.0.1:{PORT + i}/%2f" for i in NODES)


def node_name(i: int) -> str:
    return f"{NAME}{i}@localhost"


def node_index(name: str) -> int:
    return int(name.split("@")[0].removeprefix(NAME))


class Cluster:
    """tools/cluster.sh from the tests: faults, node state and the main queue's members and leader."""

    dsn = DSN

    def run(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "RMQT_BASE": str(BASE)})
        assert done.returncode == 0, (f"tools/cluster.sh {' '.join(args)}: rc={done.returncode}\n"
                                      f"{done.stdout}\n{done.stderr}")
        return done.stdout

    def management_url(self, i: int = 1) -> str:
        return f"http://guest:guest@127.0.0.1:{PORT + 10000 + i}"

    def up_nodes(self) -> list[int]:
        return [i for i in NODES if f"t{i} up" in self.run("status")]

    def ctl(self, *args: str, node: int | None = None) -> str:
        """rabbitmqctl against ``node`` (default: the first one up)."""
        return self.run("ctl", str(node or self.up_nodes()[0]), *args)

    def queue_members(self, queue: str) -> dict:
        """{leader, members, online} of a quorum queue, from rabbitmqctl (the live source)."""
        rows = json.loads(self.ctl("-q", "list_queues", "name", "leader", "members", "online", "--formatter", "json")
                          or "[]")
        row = next((r for r in rows if r["name"] == queue), None)
        assert row is not None, f"queue {queue} not in the cluster: {rows}"
        return row

    def leader(self, queue: str) -> int:
        return node_index(self.queue_members(queue)["leader"])

    def wait_online(self, queue: str, n: int = 3, timeout: float = 90) -> dict:
        """Until ``n`` members of the queue are online (a restarted node is back as a follower)."""
        from tests.support.services import wait_for

        last: dict = {}

        def ok() -> bool:
            try:
                last.update(self.queue_members(queue))
            except AssertionError:
                return False
            return len(last.get("online") or []) >= n

        wait_for(ok, timeout=timeout, interval=0.5, what=f"{n} online members of {queue}: {last}")
        return last

    def kill(self, i: int) -> None:
        self.run("kill", str(i))

    def start(self, i: int) -> None:
        self.run("start", str(i))

    def stop(self, i: int) -> None:
        self.run("stop", str(i))

    def alarm(self, kind: str, i: int, on: bool) -> None:
        self.run("alarm", kind, str(i), "on" if on else "off")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    if BASE.exists():  # a run killed before its teardown: its nodes would hold the ports
        c.run("down")
    started = time.monotonic()
    try:
        c.run("up")
        print(f"\ncluster up in {time.monotonic() - started:.1f}s")
        yield c
    finally:
        halt_all()  # workers first: they would only reconnect to the dying nodes
        status = c.run("status")
        if "down" in status:  # a node died on its own (not stopped by a test): keep its logs for the post-mortem
            keep = ROOT / ".run" / "cluster-logs"
            shutil.rmtree(keep, ignore_errors=True)
            for i in NODES:
                shutil.copytree(BASE / f"t{i}" / "log", keep / f"t{i}", dirs_exist_ok=True)
            print(f"\ncluster teardown: {status.strip()}; node logs kept in {keep}")
        c.run("down")


@pytest.fixture
def cenv(env, cluster):
    """The test's environment on the cluster: every node in RABBITMQ_DSN, the policies through node 1's management
    API, the reliability suite's Redis database, quick retries."""
    env["RABBITMQ_DSN"] = cluster.dsn
    env["RABBITMQ_MANAGEMENT_URL"] = cluster.management_url(1)
    env["REDIS_URL"] = redis_url(RELIABILITY)
    env["WORKER_RETRY_DELAY"] = "200"
    env["WORKER_MAX_RETRIES"] = "5"
    env["LOG_LEVEL"] = "debug"
    return env


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    halt_all()
    w.cleanup()
