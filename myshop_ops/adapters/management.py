"""RabbitMQ management HTTP API: unacked counts, rates, queue types and arguments, bindings, policies.

The AMQP protocol only tells ready messages and consumers; everything else an operator wants comes from here, and
policies can only be set here. RABBITMQ_MANAGEMENT_URL names it; `setup-transports` and `preflight` fall back to
the first RABBITMQ_DSN host on port 15672 (15671 for amqps) with its credentials.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from myshop_ops.adapters.broker import dsn_urls
from myshop_ops.adapters.config import mask_url


class ManagementError(Exception):
    """The management API could not answer (unreachable, refused, unexpected reply)."""


@dataclass(frozen=True, slots=True)
class QueueInfo:
    name: str
    ready: int
    unacked: int
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


class Management:
    def __init__(self, url: str, vhost: str = "/", timeout: float = 5.0):
        parts = urlsplit(url)
        self.display = mask_url(url)
        self.vhost = vhost
        user_pass = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}"
        self._auth = "Basic " + base64.b64encode(user_pass.encode()).decode()
        self.base = urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""), "/api", "",
                                ""))
        self.timeout = timeout

    def _request(self, method: str, path: str, payload: object = None) -> object:
        headers = {"Authorization": self._auth}
        data = None
        if payload is not None:
            data, headers["Content-Type"] = json.dumps(payload).encode(), "application/json"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                body = reply.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            if exc.code in (401, 403):
                raise ManagementError(f"RabbitMQ management API at {self.display} refused the credentials "
                                      "(the user needs the monitoring tag, and policymaker for setup-transports; check "
                                      "RABBITMQ_MANAGEMENT_URL)") from None
            raise ManagementError(f"RabbitMQ management API at {self.display} answered {exc.code}") from None
        except OSError as exc:
            raise ManagementError(f"RabbitMQ management API at {self.display} unreachable: {exc} "
                                  "(enable it: rabbitmq-plugins enable rabbitmq_management)") from None
        return json.loads(body) if body else None

    def _get(self, path: str) -> object:
        return self._request("GET", path)

    def queue(self, name: str) -> QueueInfo | None:
        raw = self._get(f"/queues/{self._vhost}/{quote(name, safe='')}")
        return None if raw is None else _queue_info(raw)

    def bindings(self, queue: str) -> list[dict]:
        return self._get(f"/queues/{self._vhost}/{quote(queue, safe='')}/bindings") or []

    def consumers(self, queue: str) -> list[dict]:
        """Who consumes ``queue``: for each consumer, its connection's client-given name (``connection_name``,
        "" when unnamed, None while the connection is not in the management statistics yet), peer host and user.
        Empty when the queue does not exist."""
        raw = self._get(f"/queues/{self._vhost}/{quote(queue, safe='')}") or {}
        out = []
        for consumer in raw.get("consumer_details") or ():
            name = (consumer.get("channel_details") or {}).get("connection_name")
            conn = (self._get(f"/connections/{quote(name, safe='')}") if name else None) or {}
            given = (conn.get("client_properties") or {}).get("connection_name") or "" if conn else None
            out.append({"connection_name": None if given is None else str(given),
                        "peer_host": conn.get("peer_host", "?"), "user": conn.get("user", "?")})
        return out

    def nodes(self) -> list[dict]:
        """The cluster's nodes: name, running, and the memory and disk alarms each raises."""
        return [{"name": n.get("name", "?"), "running": bool(n.get("running")),
                 "mem_alarm": bool(n.get("mem_alarm")), "disk_free_alarm": bool(n.get("disk_free_alarm"))}
                for n in self._get("/nodes?columns=name,running,mem_alarm,disk_free_alarm") or ()]

    def exchange(self, name: str) -> dict | None:
        return self._get(f"/exchanges/{self._vhost}/{quote(name, safe='')}")

    def policy(self, name: str) -> dict | None:
        return self._get(f"/policies/{self._vhost}/{quote(name, safe='')}")

    def policies(self) -> list[dict]:
        return self._get(f"/policies/{self._vhost}") or []

    def put_policy(self, name: str, pattern: str, apply_to: str, definition: dict, priority: int) -> None:
        self._request("PUT", f"/policies/{self._vhost}/{quote(name, safe='')}",
                      {"pattern": pattern, "apply-to": apply_to, "definition": definition, "priority": priority})

    def delete_policy(self, name: str) -> None:
        self._request("DELETE", f"/policies/{self._vhost}/{quote(name, safe='')}")

    @property
    def _vhost(self) -> str:
        return quote(self.vhost, safe="")


def _queue_info(raw: dict) -> QueueInfo:
    stats = raw.get("message_stats") or {}

    def rate(key: str) -> float | None:
        details = stats.get(f"{key}_details")
        return float(details["rate"]) if details else (0.0 if "message_stats" in raw else None)

    return QueueInfo(
        name=raw["name"],
        ready=int(raw.get("messages_ready") or 0),
        unacked=int(raw.get("messages_unacknowledged") or 0),
        consumers=int(raw.get("consumers") or 0),
        durable=bool(raw.get("durable")),
        arguments=dict(raw.get("arguments") or {}),
        publish_rate=rate("publish"),
        deliver_rate=rate("deliver_get"),
        acked_total=stats.get("ack"),
        type=str(raw.get("type") or "classic"),
        policy=raw.get("policy") or None,
        leader=raw.get("leader") or None,
        members=tuple(raw.get("members") or ()),
        online=tuple(raw.get("online") or ()),
    )


def vhost_of(dsn: str) -> str:
    """The vhost of the first URL of a RABBITMQ_DSN ('/' when the path is empty)."""
    path = urlsplit(dsn_urls(dsn)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def management_url(management: str | None, dsn: str) -> str:
    """RABBITMQ_MANAGEMENT_URL, or the first RABBITMQ_DSN host on the management port with the DSN's credentials."""
    if management:
        return management
    parts = urlsplit(dsn_urls(dsn)[0])
    tls = parts.scheme == "amqps"
    user = quote(unquote(parts.username or "guest"), safe="")
    password = quote(unquote(parts.password or "guest"), safe="")
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{'https' if tls else 'http'}://{user}:{password}@{host}:{15671 if tls else 15672}"


def for_dsn(management: str | None, dsn: str) -> Management:
    """The management API of the broker a RABBITMQ_DSN names, in its vhost."""
    return Management(management_url(management, dsn), vhost_of(dsn))
