"""What operators see of a cluster, without one (issue 16): a quorum queue's members, the down ones, the
quorum-critical nodes; preflight's cluster checks (alarms, members, a one-URL DSN against a cluster) on the
management API's answers. Against a real cluster: tests/cluster/test_harness.py."""

from __future__ import annotations

from myshop_ops.adapters.config import load_settings
from myshop_ops.adapters.management import QueueInfo
from myshop_ops.tools import preflight
from myshop_ops.tools.stats import Members, QueueRow, judge_members

T = [f"rabbit@n{i}" for i in (1, 2, 3)]


def info(members=tuple(T), online=tuple(T), leader=T[0], type_="quorum") -> QueueInfo:
    return QueueInfo("q", 0, 0, 1, True, {}, None, None, None, type=type_, leader=leader, members=members,
                     online=online)


def test_members_down_and_quorum_critical():
    m = Members.of(info())
    assert m.majority == 2 and m.down == [] and m.critical == []
    assert "3/3 members online" in m.describe() and "no node quorum-critical" in m.describe()
    m = Members.of(info(online=(T[0], T[2]), leader=T[2]))
    assert m.down == [T[1]] and m.critical == [T[0], T[2]]
    assert f"down: {T[1]}" in m.describe() and "quorum-critical" in m.describe() and "leader rabbit@n3" in m.describe()
    m = Members.of(info(online=(T[0],), leader=None))
    assert m.critical == [T[0]] and "quorum lost" in m.describe() and "leader none" in m.describe()
    assert Members.of(info(type_="classic")) is None and Members.of(None) is None


def test_stats_row_levels_by_members():
    row = QueueRow("q", "main", 0, 1)
    judge_members(row, Members.of(info()))
    assert row.level == "ok" and row.members["quorum_critical"] == [] and row.notes
    row = QueueRow("q", "main", 0, 1)
    judge_members(row, Members.of(info(online=T[:2])))
    assert row.level == "warn" and row.members["down"] == [T[2]]
    row = QueueRow("q", "main", 0, 1)
    judge_members(row, Members.of(info(online=T[:1])))
    assert row.level == "critical"


class FakeApi:
    def __init__(self, nodes, queue):
        self._nodes, self._queue = nodes, queue

    def nodes(self):
        return self._nodes

    def queue(self, _name):
        return self._queue


def node(name, running=True, mem=False, disk=False):
    return {"name": name, "running": running, "mem_alarm": mem, "disk_free_alarm": disk}


def checks(monkeypatch, nodes, queue, **env):
    s = load_settings(env={"APP_ENV": "dev", "EMBEDDING_PROVIDER": "hash", **env}, env_file=None)
    return {c.name: c for c in preflight._cluster(s, FakeApi(nodes, queue))}


def test_preflight_cluster_checks(monkeypatch):
    three = [node(n) for n in T]
    got = checks(monkeypatch, three, info(), RABBITMQ_DSN="amqp://u:p@n1:5672/%2f,amqp://u:p@n2:5672/%2f")
    assert got["members"].status == "PASS" and got["failover"].status == "PASS" and "alarms" not in got
    got = checks(monkeypatch, [node(T[0], mem=True), node(T[1], disk=True), node(T[2])], info(online=T[:2]))
    assert got["alarms"].status == "FAIL" and "rabbit@n1 (memory), rabbit@n2 (disk)" in got["alarms"].detail
    assert got["members"].status == "WARN" and "down: rabbit@n3" in got["members"].detail
    got = checks(monkeypatch, three, info(online=T[:1], leader=None))
    assert got["members"].status == "FAIL" and "quorum lost" in got["members"].detail


def test_preflight_in_prod_warns_on_two_members_and_one_url(monkeypatch):
    prod = {"APP_ENV": "prod", "RABBITMQ_DSN": "amqp://u:p@n1:5672/%2f", "MONGODB_URL": "mongodb://m:27017",
            "REDIS_URL": "redis://r:6379/0", "EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test"}
    got = checks(monkeypatch, [node(n) for n in T], info(members=tuple(T[:2]), online=tuple(T[:2])), **prod)
    assert got["members"].status == "WARN" and "fewer than 3 members" in got["members"].detail
    assert got["failover"].status == "WARN" and "names 1 of the cluster's 3 nodes" in got["failover"].detail
    assert all("\n" not in c.detail for c in got.values())


def test_alarms_of_every_node():
    from myshop_ops.tools.stats import alarms

    api = FakeApi([node(T[0], mem=True), node(T[1], disk=True, mem=True), node(T[2])], None)
    assert alarms(api) == [{"node": T[0], "kind": "memory"}, {"node": T[1], "kind": "memory"},
                           {"node": T[1], "kind": "disk"}]
    assert alarms(FakeApi([node(n) for n in T], None)) == []


def test_worker_metrics_blocked_means_not_ready():
    from myshop_ops.adapters.metrics import Metrics

    m = Metrics()
    m.attached(True)
    assert m.readiness() == (True, {"consumer_attached": True, "mongodb": True, "publishing": True})
    m.publish_blocked(True)
    assert m.readiness()[0] is False and m.readiness()[1]["publishing"] is False
    assert m.registry.get_sample_value("myshop_publish_blocked") == 1
    assert m.registry.get_sample_value("myshop_worker_ready") == 0
    m.publish_blocked(False)
    assert m.readiness()[0] is True and m.registry.get_sample_value("myshop_publish_blocked") == 0


def test_exporter_members_and_alarms():
    from myshop_ops.adapters.metrics import QueueExporter
    from myshop_ops.tools.stats import Report

    row = QueueRow("q", "main", 0, 1)
    judge_members(row, Members.of(info(online=T[:2])))
    exporter = QueueExporter(interval=15)
    exporter.update(Report([row], True, alarms=[{"node": T[1], "kind": "disk"}]))
    get = exporter.registry.get_sample_value
    assert get("myshop_queue_members", {"queue": "q", "role": "main"}) == 3
    assert get("myshop_queue_members_online", {"queue": "q", "role": "main"}) == 2
    assert get("myshop_rabbitmq_alarm", {"node": T[1], "kind": "disk"}) == 1
    exporter.update(Report([row], True))
    assert get("myshop_rabbitmq_alarm", {"node": T[1], "kind": "disk"}) is None  # cleared, no series left
