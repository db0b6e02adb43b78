"""A dependency's exception as one line an operator reads: what failed, where (its address, password masked), why
(the first clause of the library's message: no topology dump, no traceback) and what to do. Used by every
command's error line (cli.common.operator_errors), preflight's checks and the worker's log lines.

Recognised by the exception's module (pymongo, redis, pika, openai) so nothing here imports those libraries."""

from __future__ import annotations

import re
from dataclasses import dataclass

from myshop_ops.adapters.config import Settings, mask_text, mask_url

MAX_REASON = 200
# (service, Settings attribute of its address, what to do)
_SYSTEMS: dict[str, tuple[str, str, str]] = {
    "pymongo": ("MongoDB", "mongodb_url", "is mongod running and reachable from here? check MONGODB_URL, its "
                "password %-encoded"),
    "bson": ("MongoDB", "mongodb_url", "check MONGODB_URL"),
    "redis": ("Redis", "redis_url", "is redis-server running and reachable from here? check REDIS_URL"),
    "pika": ("RabbitMQ", "rabbitmq_dsn", "is RabbitMQ running and reachable from here? check RABBITMQ_DSN"),
    "openai": ("the embeddings provider", "openai_base_url", "check OPENAI_API_KEY, OPENAI_BASE_URL and the "
               "provider's status page"),
}
# where a library's message stops being about the cause: pymongo's timeouts and topology dump
_TAIL = re.compile(r",? *(\(configured timeouts|Timeout: |Topology Description:|<TopologyDescription)")


@dataclass(frozen=True, slots=True)
class Failure:
    what: str  # the service: MongoDB, Redis, RabbitMQ, the embeddings provider, a file
    where: str  # its address, password masked ("" when unknown)
    reason: str  # one line, at most MAX_REASON characters
    todo: str  # what to do

    @property
    def line(self) -> str:
        at = f" at {self.where}" if self.where else ""
        return f"{self.what}{at} failed: {self.reason} ({self.todo})"


def reason(exc: BaseException) -> str:
    """The exception's class and the first clause of its message, on one line, URLs masked."""
    text = " ".join(str(exc).split())
    text = _TAIL.split(text, maxsplit=1)[0].rstrip(" ,;:")
    text = mask_text(text)
    if len(text) > MAX_REASON:
        text = text[:MAX_REASON - 1] + "…"
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def system(exc: BaseException) -> str | None:
    """The library that raised ``exc`` (a key of _SYSTEMS), or None."""
    for cls in type(exc).__mro__:
        root = cls.__module__.split(".")[0]
        if root in _SYSTEMS:
            return root
    return None


def explain(exc: BaseException, s: Settings | None = None) -> Failure | None:
    """``exc`` as a Failure when it is a dependency's (pymongo, redis, pika, openai, OSError), else None."""
    lib = system(exc)
    if lib is not None:
        what, attr, todo = _SYSTEMS[lib]
        where = getattr(s, attr, None) if s is not None else None
        if lib == "openai" and s is not None and not where:
            where = "https://api.openai.com/v1"
        return Failure(what, mask_url(where) if where else "", reason(exc), todo)
    if isinstance(exc, OSError):
        where = str(exc.filename) if exc.filename is not None else ""
        return Failure("a file" if where else "the system", where, reason(exc),
                       "check the path and its permissions" if where else "check the host's resources")
    return None


def one_line(exc: BaseException, s: Settings | None = None) -> str:
    """``explain(exc, s).line``, or the exception's reason when it is not a dependency's."""
    failure = explain(exc, s)
    return failure.line if failure else reason(exc)
