"""`stats` and `preflight` over any reply of the RabbitMQ management API (a local HTTP stand-in plays it): any JSON
shape, non-JSON, errors, a redirect to another host. They never crash, never send the credentials elsewhere, and
show the API's text literally."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from myshop_ops.adapters import broker
from myshop_ops.adapters.management import Management, ManagementError, for_connection, management_url
from myshop_ops.cli import preflight as preflight_cli
from myshop_ops.cli import stats as stats_cli
from myshop_ops.tools import preflight, stats
from tests.support.fake_management import FakeManagement
from tests.support.services import RABBIT, run_cli

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]

SECRET = "s3cret-pw"


@pytest.fixture
def api() -> Iterator[FakeManagement]:
    with FakeManagement() as server:
        yield server


@pytest.fixture
def elsewhere() -> Iterator[FakeManagement]:
    """Another host (by name: localhost, not 127.0.0.1) a redirect may point to."""
    with FakeManagement() as server:
        yield server


def other_url(server: FakeManagement) -> str:
    return f"http://localhost:{server.port}/api/nodes"


def credentials_sent(server: FakeManagement) -> list[dict]:
    return [r for r in server.requests if r["authorization"]]


def default_cluster_name() -> str:
    """What the default node gives as its cluster name (a stand-in answering as it passes for_connection)."""
    conn = broker.connect(RABBIT)
    try:
        return broker.cluster_name(conn) or "?"
    finally:
        conn.close()


# ---- the exact cases ------------------------------------------------------------------------------------------

def test_a_redirect_to_another_host_is_not_followed_and_gets_no_credentials(env, topology, api, elsewhere):
    """The management client followed a redirect to another host and sent it the Basic credentials. Now a redirect
    is a one-line ManagementError naming where it pointed; `stats` warns in one line and shows the AMQP counts."""
    api.default = ("redirect", other_url(elsewhere))
    with pytest.raises(ManagementError, match=r"redirect to http://localhost:.*not followed"):
        Management(api.url("admin", SECRET)).nodes()
    sub = env.subprocess_env(RABBITMQ_MANAGEMENT_URL=api.url("admin", SECRET))
    shown = run_cli("stats", env=sub)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "not followed" in shown.stderr and len(shown.stderr.strip().splitlines()) == 1, shown.stderr
    assert f"{topology.queue} ready=0" in shown.stdout and SECRET not in shown.stdout + shown.stderr
    assert api.requests and elsewhere.requests == [] and credentials_sent(elsewhere) == []


def test_stats_and_preflight_take_an_empty_object_for_every_reply(env, topology, api):
    """A management API answering `{}` to everything made `stats` and `preflight` crash with KeyError: 'name'. (It
    answers as the default node would where `for_connection` asks which broker it is.)"""
    api.answer_as(default_cluster_name())
    api.default = (200, {})
    sub = env.subprocess_env(RABBITMQ_MANAGEMENT_URL=api.url())
    for args in (["stats"], ["stats", "--json"], ["preflight", "--offline"], ["preflight", "--offline", "--json"]):
        done = run_cli(*args, env=sub)
        assert done.returncode in (0, 1) and "Traceback" not in done.stderr, (args, done.stdout, done.stderr)
    report = json.loads(run_cli("stats", "--json", env=sub).stdout)
    assert next(q for q in report["queues"] if q["role"] == "main")["name"] == topology.queue
    api.default = (200, {"messages_unacknowledged": "many", "consumers": -1, "members": "rabbit@a"})
    report = json.loads(run_cli("stats", "--json", env=sub).stdout)
    assert next(q for q in report["queues"] if q["role"] == "main")["unacked"] is None  # unknown, not a number


def test_preflight_shows_a_consumer_connection_named_like_markup(env, topology, api):
    """A consumer of the main queue whose connection is named `[/x]` crashed `preflight` with rich's MarkupError:
    shown literally."""
    api.answer_as(default_cluster_name())
    api.replies[f"/api/queues/%2F/{topology.queue}"] = (200, {
        "name": topology.queue, "consumer_details": [{"channel_details": {"connection_name": "c1"}}]})
    api.replies["/api/connections/c1"] = (200, {"client_properties": {"connection_name": "[/x]"},
                                                "peer_host": "10.0.0.9", "user": "[bold]shop"})
    done = run_cli("preflight", "--offline", env=env.subprocess_env(RABBITMQ_MANAGEMENT_URL=api.url(), COLUMNS="300"))
    assert "Traceback" not in done.stderr, done.stderr
    assert "[/x] from 10.0.0.9 ([bold]shop)" in " ".join(done.stdout.split()), done.stdout


def test_the_management_url_keeps_the_brackets_of_an_ipv6_literal():
    assert Management("http://user:pass@[::1]:15672").base == "http://[::1]:15672/api"
    assert management_url(None, "amqp://u:p@[::1]:5672/%2f") == "http://u:p@[::1]:15672"
    with FakeManagement(host="::1") as server:
        server.replies["/api/nodes"] = (200, [{"name": "rabbit@v6", "running": True}])
        assert Management(server.url()).nodes()[0]["name"] == "rabbit@v6"


# ---- properties: any reply ------------------------------------------------------------------------------------

KEYS = ["name", "messages_ready", "messages_unacknowledged", "consumers", "durable", "arguments", "message_stats",
        "publish_details", "deliver_get_details", "rate", "ack", "type", "policy", "leader", "members", "online",
        "consumer_details", "channel_details", "connection_name", "client_properties", "peer_host", "user",
        "running", "mem_alarm", "disk_free_alarm", "source", "routing_key", "pattern", "priority", "apply-to",
        "definition", "x-queue-type"]
leaves = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63) | st.floats()
          | st.text(max_size=12) | st.sampled_from(["[/x]", "quorum", "rabbit@a", "\x1b[2J", "[bold]"]))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=6),
                           max_leaves=20)


def replies(other: str):
    return st.one_of(json_values.map(lambda v: (200, v)), st.lists(json_values, max_size=4).map(lambda v: (200, v)),
                     st.binary(max_size=30).map(lambda b: (200, b)),
                     st.sampled_from([(500, {}), (404, {}), (401, {}), ("redirect", other)]))


_EXAMPLES = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_EXAMPLES
@given(st.data())
def test_property_stats_and_preflight_take_any_management_reply(env, topology, api, elsewhere, capsys, data):
    """Whatever the management API answers on each path: stats collects a report (or names one ManagementError)
    and renders it, the preflight checks that ask it yield checks and print them; the other host never gets the
    credentials."""
    reply = replies(other_url(elsewhere))
    api.replies = {path: data.draw(reply, label=path) for path in (
        "/api/queues/", f"/api/queues/%2F/{topology.queue}/bindings", "/api/nodes", "/api/connections/",
        "/api/policies/", "/api/exchanges/", "/api/overview", "/api/vhosts/")}
    s = env.settings(RABBITMQ_MANAGEMENT_URL=api.url("admin", SECRET))
    conn = broker.connect(s.rabbitmq_dsn)
    try:
        try:  # whether it is this broker: an answer, or one line
            for_connection(s.rabbitmq_management_url, s.rabbitmq_dsn, conn)
        except ManagementError as exc:
            assert len(str(exc).splitlines()) == 1 and SECRET not in str(exc)
        api_ = Management(s.rabbitmq_management_url)
        try:
            report = stats.collect(conn, topology, None, api_)
        except ManagementError as exc:
            assert len(str(exc).splitlines()) == 1 and SECRET not in str(exc)
        else:
            stats_cli.console.print(stats_cli.render(report))
            assert stats_cli.render_plain(report) and json.dumps(report.as_json())
        checks = [*preflight._other_consumers(s, api_), *preflight._cluster(s, api_),
                  *preflight._topology(conn, api_, topology)]
    finally:
        conn.close()
    assert all(isinstance(c, preflight.Check) and SECRET not in c.detail for c in checks)
    preflight_cli.show_checks(checks)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert credentials_sent(elsewhere) == []
