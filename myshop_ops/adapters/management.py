"""RabbitMQ management HTTP API: unacked counts, rates, queue types and arguments, bindings, policies.

The AMQP protocol only tells ready messages and consumers; everything else an operator wants comes from here, and
policies can only be set here. RABBITMQ_MANAGEMENT_URL names it; unset, the first RABBITMQ_DSN host on port 15672
(15671 for amqps) with its credentials, but only when that host's AMQP port is the default one (5672, 5671 for amqps):
past a non-default port, any management port would be a guess. Before use, ``for_connection`` checks that the API
answers for the broker the AMQP connection reached (the vhost, and a queue just declared on that connection are
there); whether an object exists, and with which arguments, is asked on the AMQP connection itself.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pika.adapters.blocking_connection import BlockingConnection

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import dsn_urls
from myshop_ops.adapters.config import mask_url

log = logging.getLogger(__name__)


class ManagementError(Exception):
    """The management API could not answer (unreachable, refused, redirected, an unexpected reply)."""


class WrongBroker(ManagementError):
    """The management API answers for another broker than the one the AMQP connection reached."""


MAX_REPLY_BYTES = 32 * 1024 * 1024  # a reply past this is refused, not read whole


@dataclass(frozen=True, slots=True)
class QueueInfo:
    name: str
    ready: int
    unacked: int | None  # None: the reply held no count there (every number read from a reply is checked likewise)
    consumers: int
    durable: bool
    arguments: dict
    publish_rate: float | None  # messages/s over the broker's sampling window
    deliver_rate: float | None
    acked_total: int | None  # acks since the queue's statistics began (a broker restart resets them)
    type: str = "classic"
    policy: str | None = None  # the policy applied to the queue (None: none)
    leader: str | None = None  # quorum queues: the node of the leader (None: none now, or not a quorum queue)
    members: tuple[str, ...] = ()  # quorum queues: the nodes holding a replica
    online: tuple[str, ...] = ()  # the members running now


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is never followed: the request carries the Basic credentials, and another host must not get
    them. The 3xx reaches ``_request`` as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class Management:
    def __init__(self, url: str, vhost: str = "/", timeout: float = 5.0):
        parts = urlsplit(url)
        self.display = mask_url(url)
        self.vhost = vhost
        user_pass = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}"
        self._auth = "Basic " + base64.b64encode(user_pass.encode()).decode()
        host = parts.netloc.rpartition("@")[2]  # host[:port] as written: an IPv6 literal keeps its brackets
        self.base = urlunsplit((parts.scheme, host, "/api", "", ""))
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirect)

    def _request(self, method: str, path: str, payload: object = None) -> object:
        """The reply's JSON (None for a 404 or an empty reply); ManagementError (one line) for anything else."""
        headers = {"Authorization": self._auth}
        data = None
        if payload is not None:
            data, headers["Content-Type"] = json.dumps(payload).encode(), "application/json"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as reply:
                body = reply.read(MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError as exc:
            return _refusal(exc, self.display)
        except (OSError, http.client.HTTPException) as exc:
            raise ManagementError(f"RabbitMQ management API at {self.display} unreachable: {exc} "
                                  "(enable it: rabbitmq-plugins enable rabbitmq_management)") from None
        if len(body) > MAX_REPLY_BYTES:
            raise ManagementError(f"RabbitMQ management API at {self.display} answered more than "
                                  f"{MAX_REPLY_BYTES // 2**20} MB to {method} {path.split('?')[0]}")
        try:
            return json.loads(body) if body else None
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise ManagementError(f"RabbitMQ management API at {self.display} answered {method} "
                                  f"{path.split('?')[0]} with something that is not JSON") from None

    def _get(self, path: str, kind: type = dict) -> object:
        """A GET's reply when it is of ``kind`` (None when absent); ManagementError for a reply of another shape."""
        raw = self._request("GET", path)
        if raw is not None and not isinstance(raw, kind):
            raise ManagementError(f"RabbitMQ management API at {self.display} answered GET {path.split('?')[0]} with "
                                  f"{type(raw).__name__} where {kind.__name__} was expected")
        return raw

    def queue(self, name: str) -> QueueInfo | None:
        raw = self._get(f"/queues/{self._vhost}/{quote(name, safe='')}")
        return None if raw is None else _queue_info(name, raw)

    def bindings(self, queue: str) -> list[dict]:
        """The queue's bindings with a text source and routing key (other entries skipped)."""
        raw = self._get(f"/queues/{self._vhost}/{quote(queue, safe='')}/bindings", list) or []
        return _entries(raw, "binding", lambda b: isinstance(b.get("source"), str)
                        and isinstance(b.get("routing_key"), str))

    def consumers(self, queue: str) -> list[dict]:
        """Who consumes ``queue``: for each consumer, its connection's client-given name (``connection_name``,
        "" when unnamed, None while the connection is not in the management statistics yet), peer host and user
        (text; "?" when the reply does not tell). Empty when the queue does not exist."""
        raw = self._get(f"/queues/{self._vhost}/{quote(queue, safe='')}") or {}
        out = []
        for consumer in _entries(raw.get("consumer_details"), "consumer"):
            name = _text(_dict(consumer.get("channel_details")).get("connection_name"))
            conn = self._get(f"/connections/{quote(name, safe='')}") if name else None
            given = None if conn is None else _dict(conn.get("client_properties")).get("connection_name")
            out.append({"connection_name": None if conn is None else _text(given) or "",
                        "peer_host": _text(_dict(conn).get("peer_host")) or "?",
                        "user": _text(_dict(conn).get("user")) or "?"})
        return out

    def nodes(self) -> list[dict]:
        """The cluster's nodes: name, running, and the memory and disk alarms each raises (an entry without a
        text name is skipped; a flag that is not ``true`` is false)."""
        raw = self._get("/nodes?columns=name,running,mem_alarm,disk_free_alarm", list) or []
        return [{"name": n["name"], "running": n.get("running") is True, "mem_alarm": n.get("mem_alarm") is True,
                 "disk_free_alarm": n.get("disk_free_alarm") is True}
                for n in _entries(raw, "node", lambda n: _text(n.get("name")) is not None)]

    def overview(self) -> tuple[str | None, str | None]:
        """(cluster name, node answering) from /api/overview (None where the reply does not give a text)."""
        raw = self._get("/overview") or {}
        return _text(raw.get("cluster_name")) or None, _text(raw.get("node")) or None

    def vhost_exists(self) -> bool:
        return self._get(f"/vhosts/{self._vhost}") is not None

    def exchange(self, name: str) -> dict | None:
        return self._get(f"/exchanges/{self._vhost}/{quote(name, safe='')}")

    def policy(self, name: str) -> dict | None:
        return self._get(f"/policies/{self._vhost}/{quote(name, safe='')}")

    def policies(self) -> list[dict]:
        """The vhost's policies with a text name and pattern and an integer priority (other entries skipped)."""
        raw = self._get(f"/policies/{self._vhost}", list) or []
        return _entries(raw, "policy", lambda p: isinstance(p.get("name"), str) and isinstance(p.get("pattern"), str)
                        and _count(p.get("priority"), signed=True) is not None)

    def put_policy(self, name: str, pattern: str, apply_to: str, definition: dict, priority: int) -> None:
        self._request("PUT", f"/policies/{self._vhost}/{quote(name, safe='')}",
                      {"pattern": pattern, "apply-to": apply_to, "definition": definition, "priority": priority})

    def delete_policy(self, name: str) -> None:
        self._request("DELETE", f"/policies/{self._vhost}/{quote(name, safe='')}")

    @property
    def _vhost(self) -> str:
        return quote(self.vhost, safe="")


def _refusal(exc: urllib.error.HTTPError, display: str) -> None:
    """None for a 404; ManagementError for any other status (a redirect is named, never followed)."""
    exc.close()
    if exc.code == 404:
        return None
    if exc.code in (401, 403):
        raise ManagementError(f"RabbitMQ management API at {display} refused the credentials "
                              "(the user needs the monitoring tag, and policymaker for setup-transports; check "
                              "RABBITMQ_MANAGEMENT_URL)")
    if 300 <= exc.code < 400:
        where = mask_url(str(exc.headers.get("Location") or "?"))[:200]
        raise ManagementError(f"RabbitMQ management API at {display} answered {exc.code}, a redirect to {where}: "
                              "not followed (the credentials go to that URL only; set RABBITMQ_MANAGEMENT_URL to "
                              "the API's own address)")
    raise ManagementError(f"RabbitMQ management API at {display} answered {exc.code}")


def _entries(raw: object, what: str, fits=lambda _: True) -> list[dict]:
    """The objects of a reply's list that ``fits`` accepts; the others skipped with one warning."""
    items = raw if isinstance(raw, list) else []
    kept = [e for e in items if isinstance(e, dict) and fits(e)]
    if len(kept) < len(items):
        log.warning("management API reply: malformed entries skipped", extra={"what": what,
                                                                              "skipped": len(items) - len(kept)})
    return kept


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _count(value: object, signed: bool = False) -> int | None:
    """A count from a reply: an integer (not a boolean) in the 64-bit range, not negative unless ``signed``."""
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value if signed or value >= 0 else None
    return None


def _rate(value: object) -> float | None:
    """A rate from a reply: a finite number, not negative."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        rate = float(value)
    except OverflowError:  # an integer past a float's range
        return None
    return rate if math.isfinite(rate) and rate >= 0 else None


def _names(value: object) -> tuple[str, ...]:
    return tuple(n for n in value if isinstance(n, str)) if isinstance(value, list) else ()


def _queue_info(name: str, raw: dict) -> QueueInfo:
    """A queue's statistics from its reply, each field checked (a wrong type or range: unknown, or its default);
    the name is the one asked for."""
    stats = _dict(raw.get("message_stats"))

    def rate(key: str) -> float | None:
        if "message_stats" not in raw:
            return None
        details = _dict(stats.get(f"{key}_details"))
        return _rate(details.get("rate")) if details else 0.0

    return QueueInfo(
        name=name,
        ready=_count(raw.get("messages_ready")) or 0,
        unacked=_count(raw.get("messages_unacknowledged", 0)),  # absent until the first statistics sample
        consumers=_count(raw.get("consumers")) or 0,
        durable=raw.get("durable") is True,
        arguments=_dict(raw.get("arguments")),
        publish_rate=rate("publish"),
        deliver_rate=rate("deliver_get"),
        acked_total=_count(stats.get("ack")),
        type=_text(raw.get("type")) or "classic",
        policy=_text(raw.get("policy")) or None,
        leader=_text(raw.get("leader")) or None,
        members=_names(raw.get("members")),
        online=_names(raw.get("online")),
    )


def vhost_of(dsn: str) -> str:
    """The vhost of the first URL of a RABBITMQ_DSN ('/' when the path is empty)."""
    path = urlsplit(dsn_urls(dsn)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def management_url(management: str | None, dsn: str) -> str:
    """RABBITMQ_MANAGEMENT_URL, or the first RABBITMQ_DSN host on the management port with the DSN's credentials
    when that host's AMQP port is the default one; ManagementError (set RABBITMQ_MANAGEMENT_URL) past another port."""
    if management:
        return management
    parts = urlsplit(dsn_urls(dsn)[0])
    tls = parts.scheme == "amqps"
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port not in (None, 5671 if tls else 5672):
        raise ManagementError(f"RABBITMQ_MANAGEMENT_URL is unset and RABBITMQ_DSN's first host {host} listens on "
                              f"AMQP port {parts.netloc.rpartition(':')[2]}, not the default: its management API's "
                              "address would be a guess, none is derived (set RABBITMQ_MANAGEMENT_URL)")
    user = quote(unquote(parts.username or "guest"), safe="")
    password = quote(unquote(parts.password or "guest"), safe="")
    return f"{'https' if tls else 'http'}://{user}:{password}@{host}:{15671 if tls else 15672}"


def for_dsn(management: str | None, dsn: str) -> Management:
    """The management API of the broker a RABBITMQ_DSN names, in its vhost, unchecked (``for_connection`` checks)."""
    return Management(management_url(management, dsn), vhost_of(dsn))


def for_connection(management: str | None, dsn: str, connection: BlockingConnection) -> Management:
    """The management API (as ``for_dsn``) once it is shown to answer for the broker ``connection`` reached: the vhost
    is there, and so is a queue declared on ``connection`` a moment ago (the proof: nodes of one cluster report
    different cluster names unless one was set, and two brokers may report the same). Where the broker refuses that
    queue (no configure permission on amq.gen-*), the cluster names must agree. WrongBroker (one line: both brokers,
    the setting to fix) when not; ManagementError when it cannot answer."""
    api = for_dsn(management, dsn)
    ours = broker.cluster_name(connection)
    theirs, node = api.overview()
    derived = "" if management else " (derived from RABBITMQ_DSN: RABBITMQ_MANAGEMENT_URL is unset)"

    def wrong(what: str) -> WrongBroker:
        return WrongBroker(f"two different brokers: RABBITMQ_DSN reaches {broker.address(connection)} (cluster "
                           f"'{ours or '?'}'), the management API at {api.display}{derived} answers for node "
                           f"{node or '?'} (cluster '{theirs or '?'}') and {what} (set RABBITMQ_MANAGEMENT_URL to "
                           f"the management API of the broker at {broker.address(connection)})")

    if not api.vhost_exists():
        raise wrong(f"has no vhost '{api.vhost}'")
    with broker.probe_queue(connection) as probe:
        if probe is not None and api.queue(probe) is None:
            raise wrong(f"does not see queue '{probe}' just declared on the AMQP connection")
    if probe is None and (ours is None or ours != theirs):
        raise wrong("the cluster names differ (the AMQP user may not declare a probe queue amq.gen-*, so only "
                    "they could tell; rabbitmqctl set_cluster_name gives every node of a cluster the same)")
    return api
