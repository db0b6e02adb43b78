"""`myshop recommend USER_ID`."""

from __future__ import annotations

import typer
from rich.table import Table

from myshop_ops.adapters.store import Store
from myshop_ops.base.exit_codes import EXIT_CONFIG
from myshop_ops.cli.common import console, fail, operator_errors, print_json, settings, shown
from myshop_ops.tools.migration import active_settings
from myshop_ops.tools.recommend import BackendError, Recommendations, Recommender, RecommendError


def recommend(
    user_id: str = typer.Argument(..., help="The user's id."),
    limit: int = typer.Option(10, "--limit", min=1, max=1000, help="Products to list."),
    exclude_purchased: bool = typer.Option(False, "--exclude-purchased",
                                           help="Leave out the profile's purchased_product_ids."),
    fallback: bool = typer.Option(False, "--fallback", help="List the newest products when the user has no profile."),
    as_json: bool = typer.Option(False, "--json", help="JSON output (see above)."),
) -> None:
    """Recommend products for a user: cosine similarity of product vectors with the user's profile vector.

    --json prints {"user_id", "backend", "fallback", "model", "dimensions", "excluded_purchased" (null when the
    profile has no purchased_product_ids), "recommendations": [{"rank", "product_id", "name", "category",
    "score" (null in a fallback)}]}.
    """
    s = settings()
    with operator_errors(s):
        store = Store.from_settings(s)
        try:
            recs = Recommender(active_settings(s, store), store).recommend(
                user_id, limit=limit, exclude_purchased=exclude_purchased, fallback=fallback)
        except BackendError as exc:
            fail(str(exc), EXIT_CONFIG)
        except RecommendError as exc:
            fail(str(exc))
        finally:
            store.close()
    if as_json:
        print_json(as_dict(recs))
        return
    render(recs)
    if exclude_purchased and recs.excluded is None and not recs.fallback:
        console.print("[yellow]note:[/] the profile has no purchased_product_ids: nothing was excluded",
                      highlight=False)


def as_dict(recs: Recommendations) -> dict:
    return {
        "user_id": recs.user_id,
        "backend": recs.backend,
        "fallback": recs.fallback,
        "model": recs.model,
        "dimensions": recs.dimensions,
        "excluded_purchased": recs.excluded,
        "recommendations": [
            {"rank": i, "product_id": r.product_id, "name": r.name, "category": r.category, "score": r.score}
            for i, r in enumerate(recs.items, start=1)
        ],
    }


def render(recs: Recommendations, title: str | None = None) -> None:
    """A table of recommendations (also used by `user show`)."""
    if title is None:
        title = (f"fallback for user {shown(recs.user_id)} (no profile): the newest products" if recs.fallback else
                 f"top {len(recs.items)} for user {shown(recs.user_id)} ({recs.backend}, {shown(recs.model)}/"
                 f"{recs.dimensions}d)")
    table = Table("#", "product", "name", "category", "score", title=title)
    for i, r in enumerate(recs.items, start=1):
        table.add_row(str(i), shown(r.product_id), shown(r.name or "-"), shown(r.category or "-"),
                      "-" if r.score is None else f"{r.score:.4f}")
    console.print(table)
