"""`myshop user show USER_ID` and `myshop user delete USER_ID` (erasure)."""

from __future__ import annotations

import sys
from datetime import datetime

import typer
from bson import DatetimeMS
from rich.table import Table

from myshop_ops.adapters.store import USERS, Store
from myshop_ops.base.contract import EVENT_TYPES, FUTURE_TOLERANCE
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_FAIL
from myshop_ops.base.layout import value_kind
from myshop_ops.cli.common import console, fail, operator_errors, print_json, settings, shown
from myshop_ops.cli.recommend import as_dict, render
from myshop_ops.tools.erasure import Erasure, NotConfirmed, erase_user
from myshop_ops.tools.recommend import Recommendations, Recommender, RecommendError

TOP = 5
_FIELDS = ("version", "event_count", "event_counts", "last_event_type", "last_event_id", "last_updated", "magnitude",
           "model", "dimensions", "created_at", "updated_at")


def show_user(
    user_id: str = typer.Argument(..., help="The user's id."),
    as_json: bool = typer.Option(False, "--json", help="JSON output (see above)."),
) -> None:
    """Show a user's profile and their top 5 products.

    The profile's version, event counts, last event, magnitude and vector space (model, dimensions).

    --json prints {"user_id", "version", "event_count", "event_counts": {TYPE: n}, "last_event_type",
    "last_event_id", "last_updated", "magnitude", "model", "dimensions", "created_at", "updated_at",
    "purchased_products" (when the profile has purchases), "recommendations": null | [{"rank", "product_id",
    "name", "category", "score"}], "recommendations_error": null | why}: stored values as they are (null when
    absent). Exit 1 when the user has no profile.
    """
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
    """Erase a user: records the erasure (copies of their earlier events still in flight are then dropped), deletes
    the profile document, the processed-message keys in Redis, the failed messages (queue and records); asks first
    unless --force. Safe to run again."""
    if not force and not sys.stdin.isatty():
        fail(f"refusing to erase user {user_id} without a terminal: add --force", EXIT_CONFIG)
    s = settings()
    with operator_errors(s):
        try:
            done = erase_user(s, user_id, confirm=None if force else typer.confirm)
        except NotConfirmed as exc:
            fail(str(exc), EXIT_FAIL)
    for line in erasure_lines(done, s.mongodb_db, s.idempotency_ttl):
        console.print(line, highlight=False)


def erasure_lines(done: Erasure, db: str, idempotency_ttl: int) -> list[str]:
    """What `user delete` did, one line per step (rich markup, outside text through ``shown``)."""
    who = shown(done.user_id)
    counts = {k: "?" if v is None else v for k, v in (done.profile or {}).items()}
    lines = [f"erased user {who}: profile (version {counts['version']}, {counts['event_count']} events) "
             f"deleted from {db}.{USERS}" if done.profile is not None else
             f"erased user {who}: no profile in {db}.{USERS}"]
    if done.forgotten is None:
        lines.append(f"[yellow]Redis unavailable:[/] processed-message keys not forgotten; they expire within "
                     f"IDEMPOTENCY_TTL ({idempotency_ttl} s), or run `myshop user delete` again")
    else:
        lines.append(f"forgot {done.forgotten} processed-message key(s) in Redis")
    if done.failed_messages or done.failed_records:
        lines.append(f"erased user {who}'s failed messages: {done.failed_messages} from the failed queue, "
                     f"{done.failed_records} record(s) from failed_messages")
    until = done.kept_until.isoformat(timespec="seconds") if done.kept_until else "removed"
    lines.append(f"erasure recorded: copies of events that occurred up to "
                 f"{(done.erased_at + FUTURE_TOLERANCE).isoformat(timespec='seconds')} are dropped; the record (a "
                 f"hash of the user id and the erasure time) is kept until {until}")
    return lines
