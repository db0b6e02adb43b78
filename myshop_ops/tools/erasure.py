"""User erasure (GDPR): the user's profile, its processed-message keys in Redis, its failed messages (the failed
queue and failed_messages records). `myshop user delete` asks, calls ``erase_user`` and prints what it did."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.store import USERS, Store, message_ids
from myshop_ops.base.contract import event_key
from myshop_ops.tools.failed_queue import FailedBox


class NotErased(Exception):
    """Nothing was erased; ``str()`` is one line for the operator."""


class NothingToErase(NotErased):
    """The user has no profile and no failed message."""


class NotConfirmed(NotErased):
    """The operator answered no."""


@dataclass(frozen=True, slots=True)
class Erasure:
    """What ``erase_user`` removed."""

    user_id: str
    profile: dict | None  # the deleted profile's version and event_count; None: the user had none
    forgotten: int  # processed-message keys dropped in Redis
    redis_ok: bool  # False: Redis was down, those keys expire within IDEMPOTENCY_TTL instead
    failed_messages: int  # removed from the failed queue
    failed_records: int  # removed from failed_messages


def erase_user(settings: Settings, user_id: str, confirm: Callable[[str], bool] | None = None) -> Erasure:
    """Erase ``user_id`` after ``confirm(question)`` says yes (None: no question). Raises NothingToErase,
    NotConfirmed, NotErased (the profile was erased by someone else meanwhile), or a dependency's error."""
    store = Store.from_settings(settings)
    redis_state = RedisState.from_settings(settings)
    try:
        events = store.profile_event_count(user_id)
        records = store.count_failures(user_id)
        if events is None and not records:
            raise NothingToErase(f"user {user_id} has no profile in {settings.mongodb_db}.{USERS}: nothing to erase")
        question = (f"Erase user {user_id}'s profile ({events} events) and its processed-message keys in Redis?"
                    if events is not None else f"Erase user {user_id}'s {records} failed message(s)?")
        if confirm is not None and not confirm(question):
            raise NotConfirmed(f"user {user_id} not erased (answered no)")
        doc = None if events is None else store.delete_profile(user_id)
        if events is not None and doc is None:
            raise NotErased(f"user {user_id}'s profile was erased by someone else meanwhile")
        ids = message_ids(doc) if doc is not None else []
        errors_before = redis_state.errors
        redis_state.forget(event_key(m, user_id) for m in ids)
        redis_ok = redis_state.errors == errors_before
        conn = broker.connect(settings.rabbitmq_dsn, name="myshop-user-delete")
        try:
            failed_messages, failed_records = FailedBox(conn, store, Topology.from_settings(settings)).erase_user(
                user_id)
        finally:
            conn.close()
    finally:
        redis_state.close()
        store.close()
    profile = None if doc is None else {"version": doc.get("version"), "event_count": doc.get("event_count", 0)}
    return Erasure(user_id, profile, len(ids), redis_ok, failed_messages, failed_records)
