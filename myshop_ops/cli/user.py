"""`myshop user show USER_ID` and `myshop user delete USER_ID` (erasure)."""

from __future__ import annotations

import sys
from datetime import datetime

import typer
from bson import DatetimeMS
from rich.table import Table

from myshop_ops.adapters.store import USERS, Store
from myshop_ops.base.contract import EVENT_TYPES
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_FAIL
from myshop_ops.base.layout import value_kind
from myshop_ops.cli.common import console, fail, operator_errors, print_json, settings, shown
from myshop_ops.cli.recommend import as_dict, render
from myshop_ops.tools.erasure import NotConfirmed, NotErased, erase_user
from myshop_ops.tools.recommend import Recommendations, Recommender, RecommendError

TOP = 5
_FIELDS = ("version", "event_count", "event_counts", "last_event_type", "last_event_id", "last_updated", "magnitude",
           "model", "dimensions", "created_at", "updated_at")


def show_user(
    user_id: str = typer.Argument(..., help="The user's id."),
    as_json: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Show a user's profile (version, event counts, last event, magnitude, vector space) and top 5 products."""
    s = settings()
    with operator_errors(s):
        store = Store.from_settings(s)
        try:
            recommender = Recommender(s, store)
            doc = recommender.profile(user_id)
            if doc is None:
                fail(f"user {user_id} has no profile in {s.mongodb_db}.{USERS} "
                     "(none of their events applied yet, or erased)")
            recs: Recommendations | None = None
            try:
                recs = recommender.for_profile(doc, limit=TOP)
                problem = None
            except RecommendError as exc:
                problem = str(exc)
        finally:
            store.close()
    profile = {k: doc.get(k) for k in _FIELDS}
    if "purchased_product_ids" in doc:
        bought = doc["purchased_product_ids"]
        profile["purchased_products"] = (len(bought) if isinstance(bought, list) else
                                         f"not an array ({value_kind(bought)})")
    if as_json:
        top = as_dict(recs)["recommendations"] if recs is not None else None
        print_json({"user_id": user_id, **profile, "recommendations": top, "recommendations_error": problem})
        return
    console.print(_profile_table(user_id, profile))
    if recs is not None:
        render(recs, title=f"top {len(recs.items)} recommendations ({recs.backend})")
    else:
        console.print(f"[yellow]recommendations unavailable:[/] {shown(problem)}", highlight=False)


def _profile_table(user_id: str, profile: dict) -> Table:
    """The profile's fields, one per row, with the event counts by type under the event count. Any stored value
    is shown, as what it is when it is not what myshop writes."""
    table = Table(title=f"user {shown(user_id)}", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # ids are copied from here: never cut them
    counts = profile.pop("event_counts")
    for key, value in profile.items():
        table.add_row(key.replace("_", " "), _cell(key, value))
        if key == "event_count" and isinstance(counts, dict):
            for event_type in EVENT_TYPES:
                table.add_row(f"  {event_type}", shown(counts.get(event_type, 0)))
        elif key == "event_count" and counts is not None:
            table.add_row("  by type", f"not a document ({value_kind(counts)})")
    return table


def _cell(key: str, value: object) -> str:
    """A stored field's value as table text."""
    if value is None:
        return "-"
    if key == "magnitude" and isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.6f}"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, DatetimeMS):
        return value_kind(value)
    return shown(value)


def delete_user(
    user_id: str = typer.Argument(..., help="The user's id."),
    force: bool = typer.Option(False, "--force", help="Do not ask for confirmation."),
) -> None:
    """Erase a user: profile document, processed-message keys in Redis, failed messages (queue and records); asks
    first unless --force."""
    if not force and not sys.stdin.isatty():
        fail(f"refusing to erase user {user_id} without a terminal: add --force", EXIT_CONFIG)
    s = settings()
    with operator_errors(s):
        try:
            done = erase_user(s, user_id, confirm=None if force else typer.confirm)
        except NotConfirmed as exc:
            fail(str(exc), EXIT_FAIL)
        except NotErased as exc:
            fail(str(exc))
    if done.profile is not None:
        console.print(f"erased user {shown(user_id)}: profile (version {done.profile['version']}, "
                      f"{done.profile['event_count']} events) deleted from {s.mongodb_db}.{USERS}", highlight=False)
        if done.redis_ok:
            console.print(f"forgot {done.forgotten} processed-message id(s) in Redis", highlight=False)
        else:
            console.print(f"[yellow]Redis unavailable:[/] {done.forgotten} processed-message id(s) not forgotten; "
                          f"they expire within IDEMPOTENCY_TTL ({s.idempotency_ttl} s)", highlight=False)
    if done.failed_messages or done.failed_records:
        console.print(f"erased user {shown(user_id)}'s failed messages: {done.failed_messages} from the failed "
                      f"queue, {done.failed_records} record(s) from failed_messages", highlight=False)
