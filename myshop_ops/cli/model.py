"""`myshop model start|run|status|switch|rollback|finish`: the model migration steps (tools/migration.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from myshop_ops.adapters.config import PROVIDER_MODELS
from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.store import Store
from myshop_ops.base.exit_codes import EXIT_CONFIG, EXIT_FAIL
from myshop_ops.cli.common import console, err_console, fail, operator_errors, print_json, settings, shown
from myshop_ops.core.shadow import Space
from myshop_ops.tools import migration


def _step(step: Callable, *, embeds: bool = False, as_json: bool = False) -> None:
    """Run one step with the deployment's store (and Redis, for the phrase cache); print the migration after it."""
    s = settings(embeds=embeds)
    with operator_errors(s):
        store = Store.from_settings(s)
        try:
            doc = step(s, store)
        except migration.MigrationError as exc:
            fail(f"model migration: {exc}", EXIT_FAIL)
        finally:
            store.close()
    if as_json:
        print_json({k: v for k, v in doc.items() if k != "_id"})
    else:
        console.print(f"model migration {doc.get('state')}: {shown(str(doc.get('from', {}).get('model')))}/"
                      f"{doc.get('from', {}).get('dimensions')}d -> {shown(str(doc.get('to', {}).get('model')))}/"
                      f"{doc.get('to', {}).get('dimensions')}d", highlight=False)


def start(
    dimensions: int = typer.Option(..., "--dimensions", min=8, max=8192, help="The next model's vector size."),
    model: str = typer.Option(None, "--model", help="The next OpenAI model (default: the configured one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the migration document as JSON."),
) -> None:
    """Start moving the profiles to another model or size.

    From now on the workers also keep every profile they write rebuilt under it, in user_embeddings_next. Then:
    `myshop products import --next CATALOG`, `myshop model run`, `myshop model switch`. --json prints {"state",
    "from", "to", "position", "rebuilt", "unmapped", ...} (the migration document)."""
    def step(s, store):
        name = model if s.embedding_provider == "openai" and model else s.model
        if s.embedding_provider != "openai" and model and model != s.model:
            fail(f"--model {model}: EMBEDDING_PROVIDER={s.embedding_provider} has one model "
                 f"({PROVIDER_MODELS[s.embedding_provider]}); change --dimensions only", EXIT_CONFIG)
        return migration.start(s, store, Space(s.embedding_provider, name, dimensions))
    _step(step, as_json=as_json)


def run(as_json: bool = typer.Option(False, "--json", help="Print the migration document as JSON.")) -> None:
    """Rebuild every profile under the next model from its item map; resumable.

    Into user_embeddings_next; after a kill, run it again: it goes on from the last user it saved. Progress on
    stderr. --json prints {"state", "from", "to", "position", "rebuilt", "unmapped", ...} (the migration document)."""
    def step(s, store):
        redis = RedisState.from_settings(s)
        return migration.run(s, store, redis, progress=lambda p: err_console.print(
            f"rebuilt {p['rebuilt']} profile(s), {p['unmapped']} without an item map", highlight=False))
    _step(step, embeds=True, as_json=as_json)


def status(as_json: bool = typer.Option(False, "--json", help="JSON: {state, from, to, profiles, shadows, products, "
                                        "products_next, position, rebuilt, unmapped}.")) -> None:
    """Show the migration: state, models, profiles and products under each model, progress.

    --json prints {"state", "from", "to", "profiles", "shadows", "products", "products_next", "position",
    "rebuilt", "unmapped"}."""
    s = settings()
    with operator_errors(s):
        store = Store.from_settings(s)
        try:
            st = migration.status(s, store)
        except migration.MigrationError as exc:
            fail(f"model migration: {exc}", EXIT_FAIL)
        finally:
            store.close()
    if as_json:
        print_json(st.as_json())
        return
    console.print(f"model migration {st.state}: {shown(st.source)} -> {shown(st.target)}; {st.profiles} profiles, "
                  f"{st.shadows} under the other model; {st.products} products, {st.products_next} under the other "
                  f"model; rebuilt {st.rebuilt}, {st.unmapped} without an item map", highlight=False)


def switch(
    events: Path = typer.Option(None, "--events", help="Recorded events: the rebuilt profiles are verified against "
                                "them first (as `myshop verify`), and the switch refused on any difference."),
    grace: float = typer.Option(migration.SWITCH_GRACE_S, "--grace", min=0,
                                help="Seconds the workers' batches under way get to end before the renames."),
    as_json: bool = typer.Option(False, "--json", help="Print the migration document as JSON."),
) -> None:
    """Make the next model's profiles and products the live ones; resumable.

    Workers hold their batches, every rebuilt profile is brought up to date (and verified with --events), the
    collections are renamed (the old ones kept as *_prev, kept up to date), the workers go on with the new model.
    --json prints {"state", "from", "to", ...} (the migration document)."""
    def step(s, store):
        check = None if events is None else migration.events_check(events)
        return migration.switch(s, store, RedisState.from_settings(s), grace=grace, check=check)
    _step(step, embeds=True, as_json=as_json)


def rollback(
    grace: float = typer.Option(migration.SWITCH_GRACE_S, "--grace", min=0,
                                help="Seconds the workers' batches under way get to end before the renames."),
    as_json: bool = typer.Option(False, "--json", help="Print the migration document as JSON."),
) -> None:
    """Go back to the previous model's profiles and products until `finish`.

    They were kept up to date since the switch. --json prints {"state", "from", "to", ...} (the migration
    document)."""
    _step(lambda s, store: migration.rollback(s, store, RedisState.from_settings(s), grace=grace), embeds=True,
          as_json=as_json)


def finish(as_json: bool = typer.Option(False, "--json", help="Print the migration document as JSON.")) -> None:
    """Drop the previous model's profiles and products.

    Then set EMBEDDING_DIMENSIONS (and the model) to the new ones and restart the workers. --json prints
    {"state", "from", "to", ...} (the migration document)."""
    _step(lambda s, store: migration.finish(store), as_json=as_json)
