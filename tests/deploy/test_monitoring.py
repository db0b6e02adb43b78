"""monitoring/: the Prometheus alert rules (promtool check + unit tests when promtool is installed, structure
always), the scrape config, and the Grafana dashboard; every metric they read is one the code exports."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from myshop_ops.adapters.metrics import Metrics, QueueExporter
from tests.deploy.common import ALLOWED_METRICS, ROOT, assert_cli_accepts, metric_names, run, which

MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
CASES = ROOT / "tests" / "deploy" / "alert_cases.yml"
PROMTOOL = which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install --no-install-recommends prometheus)")
SEVERITIES = ("critical", "warning", "info")

# alert -> (severity, fragments its expression must contain): what the deployment issue asks to be alerted on
REQUIRED_ALERTS = {
    "MyshopQueueBacklogCritical": ("critical", ["messenger_queue_depth", "> 5000"]),
    "MyshopLatencyHigh": ("warning", ["histogram_quantile(0.95", "myshop_queue_wait_seconds_bucket", "> 30"]),
    "MyshopFailedRatioHigh": ("warning", ['status="failed"', "messenger_processed_messages_total", "> 0.01"]),
    "MyshopWorkerRestarting": ("warning", ["changes(process_start_time_seconds", "[1h]", "> 5"]),
    "MyshopNoConsumers": ("critical", ["myshop_queue_consumers", "== 0", "messenger_queue_depth > 0"]),
    "MyshopProviderErrorsHigh": ("warning", ["myshop_provider_errors_total", "myshop_provider_requests_total",
                                             "> 0.05"]),
    "MyshopWorkerNotReady": ("warning", ["myshop_worker_ready", "== 0"]),
    "MyshopWorkerDown": ("warning", ["up{", "== 0"]),
    "MyshopExporterDown": ("critical", ["up{", "== 0"]),
    "MyshopQueueMembersDown": ("warning", ["myshop_queue_members_online", "< myshop_queue_members"]),
    "MyshopPublishersBlocked": ("critical", ["myshop_rabbitmq_alarm == 1", "myshop_publish_blocked"]),
}
COMMAND = re.compile(r"`myshop ([^`]+)`")


def test_metric_names_helper():
    expr = ('sum by (le, queue) (rate(myshop_queue_wait_seconds_bucket{job="myshop-worker", queue!~".+[.]retry"}'
            "[$__rate_interval])) / on (queue) group_left (x) messenger_queue_depth > 5e3 and bool up offset 5m "
            'or time() - process_start_time_seconds{instance=~"$instance"} unless max(myshop_batch_size_count) > Inf')
    assert metric_names(expr) == {"myshop_queue_wait_seconds_bucket", "messenger_queue_depth", "up",
                                  "process_start_time_seconds", "myshop_batch_size_count"}


# ----------------------------------------------------------------------------------------------- alerts

@pytest.fixture(scope="module")
def rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_rule_is_a_complete_alert(rules):
    names = [r.get("alert") for r in rules]
    assert all(names) and len(set(names)) == len(names), "every rule an alert, names unique"
    for rule in rules:
        assert rule.get("expr"), rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
        assert rule.get("annotations", {}).get("summary"), rule["alert"]
        assert COMMAND.search(rule["annotations"].get("description", "")), (
            f"{rule['alert']}: the description names no `myshop ...` command to run")


def test_required_alerts(rules):
    by_name = {r["alert"]: r for r in rules}
    for name, (severity, fragments) in REQUIRED_ALERTS.items():
        assert name in by_name, f"missing alert {name}"
        rule = by_name[name]
        assert rule["labels"]["severity"] == severity, name
        expr = " ".join(rule["expr"].split())
        for fragment in fragments:
            assert fragment in expr, f"{name}: {fragment!r} not in {expr!r}"
    assert by_name["MyshopQueueBacklogCritical"]["for"] == "5m"
    assert by_name["MyshopNoConsumers"]["for"] == "5m"


def test_alerts_read_only_contract_metrics(rules):
    for rule in rules:
        used = metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= ALLOWED_METRICS, f"{rule['alert']}: unknown metrics {sorted(used - ALLOWED_METRICS)}"


def _commands(rules) -> list[list[str]]:
    return [shlex.split(m) for r in rules for m in COMMAND.findall(r["annotations"].get("description", ""))]


def test_commands_in_descriptions_are_accepted_by_the_cli(rules):
    for args in _commands(rules):
        assert_cli_accepts(args)


def _command_paths() -> list[list[str]]:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    paths = {tuple(assert_cli_accepts(args)) for args in _commands(rules)}
    return sorted(list(p) for p in paths)


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_commands_in_descriptions_have_help(path):
    result = run([sys.executable, "-m", "myshop_ops", *path, "--help"], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not built yet" not in result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules():
    result = run([PROMTOOL, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_config():
    result = run([PROMTOOL, "check", "config", str(MONITORING / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests(tmp_path, rules):
    """tests/deploy/alert_cases.yml against the rules without their annotations (promtool would otherwise
    compare every rendered description): each alert fires on its case, the queue alerts skip retry/failed."""
    groups = yaml.safe_load(ALERTS.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(groups))
    cases = yaml.safe_load(CASES.read_text())
    cases["rule_files"] = ["alerts.yml"]
    (tmp_path / "cases.yml").write_text(yaml.safe_dump(cases))
    result = run([PROMTOOL, "test", "rules", "cases.yml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_case(rules):
    cases = yaml.safe_load(CASES.read_text())["tests"]
    tested = {t["alertname"] for case in cases for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert {r["alert"] for r in rules} <= tested


# ----------------------------------------------------------------------------------- code exports them

def exported_metrics() -> set[str]:
    names = set()
    for registry in (Metrics().registry, QueueExporter(interval=15).registry):
        for family in registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
            names |= {family.name + s for s in suffixes}
    return names


def test_contract_metrics_are_exported_by_the_code():
    missing = ALLOWED_METRICS - exported_metrics() - {"up"}
    assert not missing, f"no worker or exporter metric named {sorted(missing)}"


# ------------------------------------------------------------------------------------------- dashboard

@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    result = []
    for panel in dashboard["panels"]:
        result.append(panel)
        result += panel.get("panels", [])  # a collapsed row keeps its panels inside
    return [p for p in result if p["type"] != "row"]


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def test_dashboard_is_importable(dashboard):
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"] + panels(dashboard)]
    assert len(set(ids)) == len({id(p) for p in dashboard["panels"] + panels(dashboard)}), "panel ids unique"
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]


def test_dashboard_has_the_operator_panels(dashboard):
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels(dashboard)}
    required = {
        "Queue depth": "messenger_queue_depth",
        "Throughput by status": "messenger_processed_messages_total",
        "P95 latency": "myshop_queue_wait_seconds_bucket",
        "Error rate": 'status="failed"',
        "Workers ready": "myshop_worker_ready",
        "Restarts in the last hour": "process_start_time_seconds",
        "Provider latency": "myshop_provider_request_seconds_bucket",
        "Provider requests and errors": "myshop_provider_errors_total",
        "Main queue members online": "myshop_queue_members_online",
        "Publishers blocked by an alarm": "myshop_rabbitmq_alarm",
    }
    for title, fragment in required.items():
        assert title in by_title, f"no panel {title!r}"
        assert fragment in by_title[title], f"{title}: {fragment} not queried"


def test_dashboard_reads_only_contract_metrics(dashboard):
    for expr in exprs(dashboard):
        used = metric_names(expr)
        assert used, expr
        assert used <= ALLOWED_METRICS, f"unknown metrics {sorted(used - ALLOWED_METRICS)} in {expr}"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.search(r"label_values\((.*),\s*\w+\)", variable["definition"]).group(1)
            assert metric_names(inner) <= ALLOWED_METRICS, variable["name"]


@needs_promtool
def test_dashboard_queries_parse(tmp_path, dashboard):
    """Each panel query as a recording rule (Grafana variables filled in), checked by promtool's PromQL parser."""
    grafana = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*", "$queue": ".*"}
    rules = []
    for i, expr in enumerate(exprs(dashboard)):
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
