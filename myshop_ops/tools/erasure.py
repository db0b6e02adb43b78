"""User erasure (GDPR). `myshop user delete` asks, calls ``erase_user`` and prints what it did, in this order:

1. an erasure record (``user_erasures``: a hash of the user id and the erasure time) is written, before anything is
   deleted: from then on the worker acks without effect every event of the user that occurred no later than the
   erasure plus the contract's future tolerance (a copy from a retry queue, `failed retry`, `unrouted republish`,
   a redelivery), and a profile it created meanwhile is deleted again;
2. the profile document;
3. every processed-message key of the user in Redis (found by SCAN);
4. the user's failed messages (the failed queue and their failed_messages records).

Every step runs whether or not the user has a profile: copies of the events of a user without one may be in flight.
Running it again is safe (the later erasure time is kept) and finishes what a failed run left."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from myshop_ops.adapters import broker
from myshop_ops.adapters.broker import Topology
from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.store import USERS, Store
from myshop_ops.tools.failed_queue import FailedBox


class NotConfirmed(Exception):
    """The operator answered no: nothing was erased; ``str()`` is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Erasure:
    """What ``erase_user`` did."""

    user_id: str
    erased_at: datetime  # recorded: events that occurred up to this plus contract.FUTURE_TOLERANCE are dropped
    kept_until: datetime | None  # when the erasure record expires (None: kept until removed)
    profile: dict[str, int | None] | None  # the deleted profile's version and event_count (None: not a count stored);
    # None: the user had none
    forgotten: int | None  # processed-message keys dropped in Redis; None: Redis failed (they expire within the TTL)
    failed_messages: int  # removed from the failed queue
    failed_records: int  # removed from failed_messages


def stored_count(value: object) -> int | None:
    """A count read from a profile document; None when it is not one (any BSON type may be stored there)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def question(settings: Settings, user_id: str, events: object, records: int) -> str:
    """What the operator is asked before ``user_id`` is erased (``events``: the profile's count as stored; None: no
    profile)."""
    failed = f", {records} failed message record(s)" if records else ""
    if events is not None:
        count = stored_count(events)
        return (f"Erase user {user_id}: profile ({'?' if count is None else count} events){failed}, processed-message "
                "keys in Redis, and drop copies of their events still in flight?")
    return (f"User {user_id} has no profile in {settings.mongodb_db}.{USERS}{failed}. Erase anyway (processed-message "
            "keys in Redis, failed messages, and drop copies of their events still in flight)?")


def erase_user(settings: Settings, user_id: str, confirm: Callable[[str], bool] | None = None) -> Erasure:
    """Erase ``user_id`` after ``confirm(question)`` says yes (None: no question). Raises NotConfirmed or a
    dependency's error (then run it again: each step is idempotent)."""
    store = Store.from_settings(settings)
    redis_state = RedisState.from_settings(settings)
    try:
        events = store.profile_event_count(user_id)
        if confirm is not None and not confirm(question(settings, user_id, events, store.count_failures(user_id))):
            raise NotConfirmed(f"user {user_id} not erased (answered no)")
        erased_at = store.record_erasure(user_id, datetime.now(UTC))  # first: the worker honours it from now on
        doc = store.delete_profile(user_id)
        forgotten = redis_state.forget_user(user_id)  # after the delete: a batch applied before it marked its keys
        conn = broker.connect(settings.rabbitmq_dsn, name="myshop-user-delete")
        try:
            failed_messages, failed_records = FailedBox(conn, store, Topology.from_settings(settings)).erase_user(
                user_id)
        finally:
            conn.close()
    finally:
        redis_state.close()
        store.close()
    kept_until = erased_at + store.failed_retention if store.failed_retention else None
    profile = None if doc is None else {"version": stored_count(doc.get("version")),
                                        "event_count": stored_count(doc.get("event_count", 0))}
    return Erasure(user_id, erased_at, kept_until, profile, forgotten, failed_messages, failed_records)
