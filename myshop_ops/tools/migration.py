"""`myshop model`: move a live deployment to another embeddings model (CHECKLIST.md, "Changing the embeddings model").

One migration document (Store.migration) holds the state; every step reads it, does what is left, and writes it, so a
step killed at any point is run again to finish it:

* ``start``: the next model's space recorded, its shadow collections (``*_next``) indexed; state ``running``. From now
  on the workers rebuild the shadow of each profile they write (core/shadow.py).
* ``products import --next FILE``: the catalog embedded under the next model into ``product_embeddings_next``.
* ``run``: every profile's shadow rebuilt from its item map, user by user, the position kept in the document.
* ``switch``: state ``switching`` (workers hold their batches), a grace period for batches already under way, every
  shadow brought up to date (orphans of erased users removed) and checked, then per collection, products first: live
  copied to ``*_prev``, ``*_next`` renamed over live (``dropTarget``: a reader finds the old collection or the new
  one, never none); state ``switched``: the workers fold with the next model and keep ``*_prev`` up to date.
* ``rollback`` (while switched): the same in the other direction, back to ``running``.
* ``finish`` (while switched): ``*_prev`` dropped, the document says ``finished``: set the settings to the new model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.embeddings import PhraseEmbedder, make_provider
from myshop_ops.adapters.store import NEXT, PREV, PRODUCTS, USERS, Store
from myshop_ops.base.contract import MAX_BODY_BYTES
from myshop_ops.base.faults import killed_after
from myshop_ops.base.printable import printable
from myshop_ops.core.ports import EventState
from myshop_ops.core.shadow import ShadowResult, Space, plan, sync_shadows
from myshop_ops.tools.lines import bounded_lines, open_regular
from myshop_ops.tools.verify import verify

CHUNK = 200  # profiles per shadow rebuild and per saved position
# fault injection for the tests: the step of `myshop model run|switch|rollback` after which the process kills itself
# (SIGKILL), as an operator's kill -9 or a lost machine would; unset in production
KILL_AFTER = "MYSHOP_MODEL_KILL_AFTER"
SWITCH_GRACE_S = 15.0  # a batch that began before ``switching`` writes within WRITE_BUDGET_S (10 s): then it is done
RETRY_AFTER_MAX_S = 120.0  # a longer wait asked by the provider stops the run (the SDK's own bound)


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
        killed_after(KILL_AFTER, "rebuilt")
        position = ids[-1]
        rebuilt += len(ids) - len(result.unmapped)
        unmapped += len(result.unmapped)
        store.update_migration({"position": position, "rebuilt": rebuilt, "unmapped": unmapped,
                                "updated_at": datetime.now(UTC)})
        killed_after(KILL_AFTER, "saved")
        if progress is not None:
            progress({"position": position, "rebuilt": rebuilt, "unmapped": unmapped})
    store.update_migration({"position": position, "done_at": datetime.now(UTC)})
    return store.migration()


def _sync_retrying(store: Store, shadow: Store, space: Space, phrases, ids: list[str], layout: str,
                   attempts: int = 6) -> ShadowResult:
    """sync_shadows, again while some phrases cannot be embedded (the provider's rate limit or an outage), after a
    growing pause or the provider's Retry-After if longer; MigrationError when they still cannot after ``attempts``,
    or at once when the provider asks for a wait beyond RETRY_AFTER_MAX_S."""
    delay = 1.0
    for attempt in range(attempts):
        result = sync_shadows(store, shadow, space, phrases, ids, layout)
        if not result.failed:
            return result
        ids = list(result.failed)
        asked = result.retry_after or 0.0
        if asked > RETRY_AFTER_MAX_S:
            raise MigrationError(f"{len(ids)} profile(s) could not be rebuilt: the embeddings provider asks to wait "
                                 f"{asked:.0f} s (rate limited): run `myshop model run` again after that")
        if attempt < attempts - 1:
            time.sleep(max(delay, asked))
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


@dataclass(frozen=True, slots=True)
class Difference:
    """Rebuilt profiles the switch's check found not equal to their recomputation: ``users`` (their shadows are
    removed, to be rebuilt), ``why`` the one line saying which and how (empty ``users``: nothing could be checked)."""

    users: list[str]
    why: str


def switch(s: Settings, store: Store, redis, *, grace: float = SWITCH_GRACE_S,
           check: Callable[[Settings, Store], Difference | None] | None = None) -> dict:
    """Make the next model's profiles and products the live ones (see the module docstring). ``check`` (the shadow
    verified against recorded events) runs before the live collections change; a difference puts the migration back
    to ``running``, with the differing shadows removed (the next switch's catch-up rebuilds them)."""
    doc, _source, target = _running(store, ("running", "switching"))
    return _flip(s, store, redis, doc, grace, check, direction="switch", other=target, keep=PREV,
                 take=NEXT, after="switched")


def rollback(s: Settings, store: Store, redis, *, grace: float = SWITCH_GRACE_S) -> dict:
    """Back to the previous model's profiles and products, kept up to date since the switch."""
    doc = store.migration()
    if doc is not None and doc.get("state") == "finished":
        raise MigrationError("no way back: `myshop model finish` dropped the previous model's profiles and products; "
                             "to return to that model, migrate to it (`myshop model start`)")
    doc, source, _target = _running(store, ("switched", "switching"))
    if doc["state"] == "switching" and doc.get("direction") != "rollback":
        raise MigrationError("a switch is under way: run `myshop model switch` again to finish it first")
    return _flip(s, store, redis, doc, grace, None, direction="rollback", other=source, keep=NEXT,
                 take=PREV, after="running")


def _flip(s: Settings, store: Store, redis, doc: dict, grace: float, check, *, direction: str, other: Space,
          keep: str, take: str, after: str) -> dict:
    """Hold the workers, bring the shadows of ``take`` up to date (and check them), then per collection: the live
    one copied to ``keep``, the one of ``take`` renamed over it (one atomic step for a reader). Each step is recorded
    in ``steps`` or seen in the collections, so a run killed anywhere is finished by the next."""
    if doc["state"] == "switching" and doc.get("direction", "switch") != direction:
        raise MigrationError(f"a {doc.get('direction')} is under way: run it again to finish it first")
    if doc["state"] != "switching":
        before, doc = doc["state"], {**doc, "state": "switching", "direction": direction, "steps": []}
        if not store.put_migration(doc, before):
            raise MigrationError("the migration changed meanwhile: run `myshop model status`")
        time.sleep(grace)  # batches that began before the hold write within it
        killed_after(KILL_AFTER, "held")
    steps = list(doc.get("steps") or [])
    if "caught up" not in steps:  # the products of ``take`` are still there: nothing was renamed yet
        shadow = store.view(take)
        _catch_up(s, store, shadow, other, redis)
        found = check(other.settings(s), shadow) if check is not None else None
        if found:
            shadow.delete_profiles(found.users)
            store.put_migration({**doc, "state": "running", "direction": None, "steps": []}, "switching")
            raise MigrationError(f"not switched: {found.why}")
        steps = _step_done(store, steps, "caught up")
    for base in (PRODUCTS, USERS):
        if base + take not in store.collections():
            continue  # renamed already
        if f"copied {base}" not in steps:
            store.copy_collection(base, base + keep)
            steps = _step_done(store, steps, f"copied {base}")
        store.rename(base + take, base, drop_target=True)
        killed_after(KILL_AFTER, f"renamed {base}")
    new = {**doc, "state": after, "direction": None, "steps": [], f"{direction}ed_at": datetime.now(UTC)}
    store.put_migration(new, "switching")
    return store.migration()


def _step_done(store: Store, steps: list[str], step: str) -> list[str]:
    """Record ``step`` of a switch or rollback as done (a re-run after a kill skips it)."""
    steps = [*steps, step]
    store.update_migration({"steps": steps})
    killed_after(KILL_AFTER, step)
    return steps


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


def events_check(events: Path) -> Callable[[Settings, Store], Difference | None]:
    """The switch's check: the rebuilt profiles verified (as `myshop verify`) against the events recorded in
    ``events``, with the next model's settings."""
    def check(s: Settings, shadow: Store) -> Difference | None:
        with open_regular(events) as handle:
            lines = (line for _, line, _ in bounded_lines(handle, MAX_BODY_BYTES))
            report = verify(s, lines, shadow, PhraseEmbedder(make_provider(s), None, ttl=s.cache_ttl))
        if report.ok:
            return None
        if not report.problems:
            return Difference([], f"the rebuilt profiles could not be verified against {events.name}: "
                              f"{report.nothing_checked or 'verify stopped midway'}; run the switch again")
        first = report.problems[0]
        more = report.users - report.count("ok") - 1
        return Difference([u.user_id for u in report.problems], (
            f"the rebuilt profile of user {printable(first.user_id)!r} is {first.status} against the recorded events' "
            f"recomputation under the new model ({printable(first.reason or '')[:200]})"
            f"{f' (and {more} more)' if more > 0 else ''}; it was removed from {USERS}{NEXT}: run "
            "`myshop model switch` again to rebuild it from its item map (if it differs again, `myshop verify "
            "--events` on the live profile of that user first)"))
    return check


def finish(store: Store) -> dict:
    """Drop the previous model's collections; the document stays (state ``finished``) until the settings name the
    new model and a new migration replaces it."""
    doc, _source, _target = _running(store, ("switched",))
    for base in (USERS, PRODUCTS):
        store.drop(base + PREV)
    store.put_migration({**doc, "state": "finished", "finished_at": datetime.now(UTC)}, "switched")
    return store.migration()
