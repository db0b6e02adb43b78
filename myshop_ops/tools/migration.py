"""`myshop model`: move a live deployment to another embeddings model (CHECKLIST.md, "Changing the embeddings model").

One migration document (Store.migration) holds the state; every step reads it, does what is left, and writes it, so a
step killed at any point is run again to finish it:

* ``start``: the next model's space recorded, its shadow collections (``*_next``) indexed; state ``running``. From now
  on the workers rebuild the shadow of each profile they write (core/shadow.py).
* ``products import --next FILE``: the catalog embedded under the next model into ``product_embeddings_next``.
* ``run``: every profile's shadow rebuilt from its item map, user by user, the position kept in the document.
* ``switch``: state ``switching`` (workers hold their batches), a grace period for batches already under way, every
  shadow brought up to date (orphans of erased users removed), then the renames: live -> ``*_prev``, ``*_next`` ->
  live, products first; state ``switched``: the workers fold with the next model and keep ``*_prev`` up to date.
* ``rollback`` (while switched): the same in the other direction, back to ``running``.
* ``finish`` (while switched): ``*_prev`` dropped, the document says ``finished``: set the settings to the new model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.embeddings import PhraseEmbedder, make_provider
from myshop_ops.adapters.store import NEXT, PREV, PRODUCTS, USERS, Store
from myshop_ops.core.ports import EventState
from myshop_ops.core.shadow import ShadowResult, Space, plan, sync_shadows

CHUNK = 200  # profiles per shadow rebuild and per saved position
SWITCH_GRACE_S = 15.0  # a batch that began before ``switching`` writes within WRITE_BUDGET_S (10 s): then it is done


class MigrationError(Exception):
    """A step that cannot run now; ``str()`` is the one line for the operator (what, and what to do)."""


def active_settings(s: Settings, store: Store) -> Settings:
    """The settings with the model the live profiles are of now (the migration's, while one is switched or
    finished), for the commands that read them (recommend, verify)."""
    return plan(store.migration(), Space.of(s)).primary.settings(s)


@dataclass
class Status:
    state: str
    source: str
    target: str
    profiles: int
    shadows: int
    products: int
    products_next: int
    position: str | None
    rebuilt: int
    unmapped: int
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"state": self.state, "from": self.source, "to": self.target, "profiles": self.profiles,
                "shadows": self.shadows, "products": self.products, "products_next": self.products_next,
                "position": self.position, "rebuilt": self.rebuilt, "unmapped": self.unmapped}


def start(s: Settings, store: Store, target: Space) -> dict:
    """Record the migration to ``target`` (idempotent for the same target) and index its shadow collections."""
    source = Space.of(s)
    if target == source:
        raise MigrationError(f"the profiles are of {source} already: give another model or size")
    doc = store.migration()
    if doc is not None and doc.get("state") != "finished":
        if Space.from_doc(doc.get("to")) != target:
            raise MigrationError(f"a migration to {_space_text(doc.get('to'))} is under way ({doc.get('state')}): "
                                 "`myshop model rollback` and drop it, or go on with it")
        return doc
    if doc is not None:
        store.delete_migration()
    store.index_shadows(NEXT)
    new = {"state": "running", "from": source.as_doc(), "to": target.as_doc(), "started_at": datetime.now(UTC),
           "position": None, "rebuilt": 0, "unmapped": 0}
    if not store.put_migration(new, None):
        raise MigrationError("another `myshop model start` ran at the same time: run `myshop model status`")
    return store.migration()


def _space_text(value: object) -> str:
    space = Space.from_doc(value)
    return str(space) if space else "an unreadable space"


def _running(store: Store, states: tuple[str, ...]) -> tuple[dict, Space, Space]:
    doc = store.migration()
    if doc is None:
        raise MigrationError("no model migration: start one with `myshop model start --dimensions N [--model M]`")
    source, target = Space.from_doc(doc.get("from")), Space.from_doc(doc.get("to"))
    if source is None or target is None:
        raise MigrationError(f"the migration document in {store.db_name}.embedding_migrations is unreadable: "
                             "remove it and start again")
    if doc.get("state") not in states:
        raise MigrationError(f"the migration is {doc.get('state')}; this step needs it {' or '.join(states)}")
    return doc, source, target


def next_products(s: Settings, store: Store) -> tuple[Settings, Store]:
    """(the settings of the migration's next model, the store on its products) for ``products import --next``."""
    _doc, _source, target = _running(store, ("running",))
    return target.settings(s), store.view(NEXT)


def embedder(s: Settings, space: Space, redis: EventState | None) -> PhraseEmbedder:
    """The phrase embedder of ``space`` (its provider with ``s``'s credentials), through the shared cache."""
    return PhraseEmbedder(make_provider(space.settings(s)), redis, ttl=s.cache_ttl)


def run(s: Settings, store: Store, redis, progress: Callable[[dict], None] | None = None) -> dict:
    """Rebuild every profile's shadow from its item map, CHUNK users at a time in user id order, the position
    saved after each chunk (a killed run goes on from there). Returns the migration document."""
    doc, _source, target = _running(store, ("running",))
    phrases = embedder(s, target, redis)
    shadow = store.view(NEXT)
    position, rebuilt, unmapped = doc.get("position"), doc.get("rebuilt", 0), doc.get("unmapped", 0)
    while chunk := store.profile_versions(position, CHUNK):
        ids = [d["user_id"] for d in chunk]
        result = _sync_retrying(store, shadow, target, phrases, ids, s.store_layout)
        position = ids[-1]
        rebuilt += len(ids) - len(result.unmapped)
        unmapped += len(result.unmapped)
        store.update_migration({"position": position, "rebuilt": rebuilt, "unmapped": unmapped,
                                "updated_at": datetime.now(UTC)})
        if progress is not None:
            progress({"position": position, "rebuilt": rebuilt, "unmapped": unmapped})
    store.update_migration({"position": position, "done_at": datetime.now(UTC)})
    return store.migration()


def _sync_retrying(store: Store, shadow: Store, space: Space, phrases, ids: list[str], layout: str,
                   attempts: int = 6) -> ShadowResult:
    """sync_shadows, again after a growing pause while some phrases cannot be embedded (the provider's rate limit or
    an outage); MigrationError when they still cannot after ``attempts``."""
    delay = 1.0
    for _ in range(attempts):
        result = sync_shadows(store, shadow, space, phrases, ids, layout)
        if not result.failed:
            return result
        ids = list(result.failed)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
    raise MigrationError(f"{len(result.failed)} profile(s) could not be rebuilt: {next(iter(result.failed.values()))}"
                         " (the provider is down or rate limited: run `myshop model run` again later)")


def status(s: Settings, store: Store) -> Status:
    doc = store.migration()
    if doc is None:
        raise MigrationError("no model migration: start one with `myshop model start --dimensions N [--model M]`")
    state = doc.get("state")
    shadow = store.view(PREV if state == "switched" else NEXT)
    return Status(state=str(state), source=_space_text(doc.get("from")), target=_space_text(doc.get("to")),
                  profiles=store.count_profiles(), shadows=shadow.count_profiles(), products=store.count_products(),
                  products_next=shadow.count_products(), position=doc.get("position"),
                  rebuilt=doc.get("rebuilt", 0), unmapped=doc.get("unmapped", 0))


def switch(s: Settings, store: Store, redis, *, grace: float = SWITCH_GRACE_S,
           check: Callable[[Settings, Store], str | None] | None = None) -> dict:
    """Make the next model's profiles and products the live ones (see the module docstring). ``check`` (the shadow
    verified against recorded events: None when OK, else why not) runs before the renames; a refusal puts the
    migration back to ``running``."""
    doc, _source, target = _running(store, ("running", "switching"))
    return _flip(s, store, redis, doc, grace, check, direction="switch", other=target, keep=PREV,
                 take=NEXT, after="switched")


def rollback(s: Settings, store: Store, redis, *, grace: float = SWITCH_GRACE_S) -> dict:
    """Back to the previous model's profiles and products, kept up to date since the switch."""
    doc, source, _target = _running(store, ("switched", "switching"))
    if doc["state"] == "switching" and doc.get("direction") != "rollback":
        raise MigrationError("a switch is under way: run `myshop model switch` again to finish it first")
    return _flip(s, store, redis, doc, grace, None, direction="rollback", other=source, keep=NEXT,
                 take=PREV, after="running")


def _flip(s: Settings, store: Store, redis, doc: dict, grace: float, check, *, direction: str, other: Space,
          keep: str, take: str, after: str) -> dict:
    if doc["state"] == "switching" and doc.get("direction", "switch") != direction:
        raise MigrationError(f"a {doc.get('direction')} is under way: run it again to finish it first")
    if doc["state"] != "switching":
        if not store.put_migration({**doc, "state": "switching", "direction": direction}, doc["state"]):
            raise MigrationError("the migration changed meanwhile: run `myshop model status`")
        time.sleep(grace)  # batches that began before the hold write within it
    if USERS + take in store.collections():  # not renamed yet: bring every shadow up to date, then check
        shadow = store.view(take)
        _catch_up(s, store, shadow, other, redis)
        why = check(other.settings(s), shadow) if check is not None else None
        if why:
            store.put_migration({**doc, "state": "running", "direction": None}, "switching")
            raise MigrationError(f"not switched: {why}")
    for base in (PRODUCTS, USERS):  # each rename once: a re-run after a kill goes on where it stopped
        names = store.collections()
        if base + keep not in names and base in names:
            store.rename(base, base + keep)
        if base + take in store.collections() and base not in store.collections():
            store.rename(base + take, base)
    new = {**doc, "state": after, "direction": None, f"{direction}ed_at": datetime.now(UTC)}
    store.put_migration(new, "switching")
    return store.migration()


def _catch_up(s: Settings, store: Store, shadow: Store, space: Space, redis) -> None:
    """Every shadow as its profile is now: those of another version or document rebuilt, those of erased users
    removed."""
    shadow.put_shadows([], shadow.orphans(store))
    phrases = embedder(s, space, redis)
    position = None
    while chunk := store.profile_versions(position, CHUNK):
        position = chunk[-1]["user_id"]
        have = shadow.shadow_versions([d["user_id"] for d in chunk])
        stale = [d["user_id"] for d in chunk if have.get(d["user_id"]) != (d["_id"], d.get("version"))]
        if stale:
            _sync_retrying(store, shadow, space, phrases, stale, s.store_layout)


def finish(store: Store) -> dict:
    """Drop the previous model's collections; the document stays (state ``finished``) until the settings name the
    new model and a new migration replaces it."""
    doc, _source, _target = _running(store, ("switched",))
    for base in (USERS, PRODUCTS):
        store.drop(base + PREV)
    store.put_migration({**doc, "state": "finished", "finished_at": datetime.now(UTC)}, "switched")
    return store.migration()
