"""One micro-batch of deliveries through the pipeline: parse, dedup, vectors, fold, conditional write.

No broker code here: the worker hands in raw bodies and gets back, for each delivery, whether
its effect is done (ack), must be retried later (transient) or can never succeed (failed).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import numpy as np
from pymongo.errors import PyMongoError

from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.embeddings import EmbeddingError, normalise_phrase
from myshop_ops.adapters.store import ProfileWrite, StoredProfile, WriteResult
from myshop_ops.base.basis import fold_basis, phrase_key, product_key
from myshop_ops.base.contract import FUTURE_TOLERANCE, Event, InvalidMessage, parse
from myshop_ops.base.lru import Recent
from myshop_ops.base.profile import VectorSpaceMismatch, fold, to_days
from myshop_ops.core.ports import EventState, Phrases, ProfileStore
from myshop_ops.core.shadow import Plan, Space, plan, sync_shadows

log = logging.getLogger(__name__)

# Version conflicts (another worker wrote the profile between our read and our write) are resolved in the batch:
# re-read, re-fold, write again, with a growing random pause that takes the workers out of step, for up to
# WRITE_BUDGET_S; only a profile that keeps changing longer than that goes through a delay queue.
WRITE_BUDGET_S = 10.0
CONFLICT_PAUSE_S = (0.005, 0.25)  # first pause at most 5 ms, doubling, at most 250 ms
PROFILE_CACHE = 1000  # profiles kept as last written (~16 KB each at 1,536 d)
PRODUCT_CACHE, PRODUCT_TTL = 2000, 60.0  # product vectors kept (~6 KB each at 1,536 d), for at most 60 s
HOLD_MAX_S, HOLD_POLL_S = 60.0, 0.25  # a batch waits this long at most for a model switch to end, then retries


class Status(StrEnum):
    """A delivery's outcome in the batch (equal to its name as text: metrics labels, log fields, counts)."""

    PENDING = "pending"  # not decided yet (only inside ``Pipeline.process``)
    APPLIED = "applied"  # its effect is in the profile: ack
    DUPLICATE = "duplicate"  # its effect was already there: ack
    SKIPPED = "skipped"  # nothing to apply (its product has no vector): ack
    ERASED = "erased"  # an event of an erased user from before the erasure: ack, nothing applied or marked
    RETRY = "retry"  # transient: a copy to the next delay queue, then ack
    FAILED = "failed"  # can never succeed: a copy to the failed queue and a failed_messages record, then ack


class ProductMissing(Exception):
    """The event's product has no vector in product_embeddings: acked and counted, profile untouched."""


class StoreUnavailable(Exception):
    """MongoDB failed during the batch (transient)."""


class VersionConflict(Exception):
    """The profile kept changing under this worker for WRITE_BUDGET_S of re-reads (transient)."""


class ModelSwitching(Exception):
    """A model switch held the batch longer than HOLD_MAX_S (transient: the retry folds with the model switched to)."""


class ErasedMeanwhile(Exception):
    """The user was erased while this batch created their profile: the new document was deleted again (transient:
    the retry meets the erasure record)."""


@dataclass(slots=True)
class Item:
    """One delivery's journey through the batch."""

    body: bytes
    event: Event | None = None
    vector: np.ndarray | None = None
    status: Status = Status.PENDING
    error: Exception | None = None
    second_copy: bool = False  # a duplicate of another delivery of this batch: its fate is that delivery's


@dataclass(slots=True)
class BatchResult:
    items: list[Item]
    counts: Counter = field(default_factory=Counter)
    writes: int = 0
    reads: int = 0  # profiles read from the store
    conflicts: int = 0

    def by_status(self, status: Status) -> list[Item]:
        return [i for i in self.items if i.status == status]


class Pipeline:
    """Composes the store, Redis and the phrase embedder; ``process`` never raises for a batch."""

    def __init__(self, settings: Settings, store: ProfileStore, redis: EventState, phrases: Phrases,
                 embedder: Callable[[Space], Phrases] | None = None):
        """``embedder``: the phrase embedder of another model's space (during a model migration)."""
        self.settings = settings
        self.store = store
        self.redis = redis
        self.phrases = phrases
        self.model = settings.model
        self.dimensions = settings.embedding_dimensions
        self.space = self.configured = Space.of(settings)
        self._embedder = embedder
        self._embedders: dict[Space, Phrases] = {self.space: phrases}
        self.shadow_products: Recent[str, np.ndarray] = Recent(PRODUCT_CACHE, ttl=PRODUCT_TTL)
        # The profiles this worker wrote last, exactly as written: no read before their next write. That write is
        # still filtered on version and _id, so a profile changed meanwhile (another worker, erased and created
        # again) misses and is read again. Correct while every change to a profile increments its version.
        self.profiles: Recent[str, StoredProfile] = Recent(PROFILE_CACHE)
        # Usable product vectors, for PRODUCT_TTL seconds: a product re-embedded by the sync is used within that.
        self.products: Recent[str, np.ndarray] = Recent(PRODUCT_CACHE, ttl=PRODUCT_TTL)

    def forget(self, user_ids: Iterable[str]) -> None:
        """Drop the cached profiles of ``user_ids``: another worker may have written them since (its claim says so),
        so their next write reads them first instead of missing on the version."""
        self.profiles.drop(user_ids)

    def remember(self, profiles: dict[str, StoredProfile]) -> None:
        """Cache ``profiles`` as this worker's own last writes: handed over by the worker that wrote them (its claim
        says nobody wrote them since; the write's version filter checks it anyway)."""
        self.profiles.put(profiles)

    def cached(self, user_ids: Iterable[str]) -> dict[str, StoredProfile]:
        """The cached profiles of ``user_ids`` (as this worker last wrote them)."""
        return self.profiles.take(user_ids)[0]

    def process(self, bodies: Sequence[bytes]) -> BatchResult:
        items = [Item(body=b) for b in bodies]
        result = BatchResult(items=items)
        live = self._parse(items)
        live = self._drop_known(live)
        now = self._plan(live)
        self._attach_vectors(live)
        self._apply(result, [i for i in live if i.status == Status.PENDING])
        if now is not None and now.shadow_space is not None:
            self._shadows(now, [i.event.user_id for i in items if i.status == Status.APPLIED])
        # Mark only ids whose effect is known to be stored: a second copy in this batch is acked as a duplicate,
        # but if its first copy goes to a retry queue the id must stay unmarked or the retry would be dropped.
        done = [i.event.key for i in items
                if i.event and (i.status == Status.APPLIED or (i.status == Status.DUPLICATE and not i.second_copy))]
        self.redis.mark(done)
        result.counts.update(i.status for i in items)
        return result

    def _plan(self, live: list[Item]) -> Plan | None:
        """Which model to fold with, and which shadow to keep, as the migration document says now; a switch under way
        holds the batch (HOLD_MAX_S at most, then its events retry). None (every event retries): MongoDB failed."""
        deadline = time.monotonic() + HOLD_MAX_S
        try:
            while (now := plan(self.store.migration(), self.configured)).hold and time.monotonic() < deadline:
                time.sleep(HOLD_POLL_S)
        except PyMongoError as exc:
            self._mark(live, Status.RETRY, StoreUnavailable(f"reading the model migration: {exc}"))
            return None
        if now.hold:
            self._mark(live, Status.RETRY, ModelSwitching(f"a model switch held the batch for {HOLD_MAX_S:g} s"))
            return None
        if now.primary != self.space:  # switched (or rolled back): what is cached is of the other model
            self.space, self.model, self.dimensions = now.primary, now.primary.model, now.primary.dimensions
            self.phrases = self._phrases_of(now.primary)
            self.profiles.clear()
            self.products.clear()
        return now

    def _phrases_of(self, space: Space) -> Phrases:
        if space not in self._embedders:
            if self._embedder is None:
                raise RuntimeError("a model migration needs the pipeline's embedder of other models")
            self._embedders[space] = self._embedder(space)
        return self._embedders[space]

    def _shadows(self, now: Plan, user_ids: list[str]) -> None:
        """Rebuild the written profiles' shadows under the migration's other model; a failure leaves them behind,
        and the switch brings them up to date (core/shadow.py)."""
        if not user_ids:
            return
        try:
            result = sync_shadows(self.store, self.store.view(now.suffix), now.shadow_space,
                                  self._phrases_of(now.shadow_space), user_ids, self.settings.store_layout,
                                  self.shadow_products)
        except PyMongoError as exc:
            log.warning("shadow profiles not written (the switch catches up)", extra={"error": str(exc)[:200]})
            return
        if result.failed:
            log.warning("shadow profiles not written (the switch catches up)",
                        extra={"users": len(result.failed), "error": next(iter(result.failed.values()))[:200]})

    def _parse(self, items: list[Item]) -> list[Item]:
        live, seen = [], set()
        now = datetime.now(UTC)  # one clock read bounds the batch's future times
        for item in items:
            try:
                item.event = parse(item.body, now=now)
            except InvalidMessage as exc:
                item.status, item.error = Status.FAILED, exc
                continue
            if item.event.key in seen:  # the same id for another user is another event
                item.status, item.second_copy = Status.DUPLICATE, True
                continue
            seen.add(item.event.key)
            live.append(item)
        return live

    def _drop_known(self, live: list[Item]) -> list[Item]:
        known = self.redis.seen([i.event.key for i in live])
        for item in live:
            if item.event.key in known:
                item.status = Status.DUPLICATE
        return [i for i in live if i.status == Status.PENDING]

    def _attach_vectors(self, live: list[Item]) -> None:
        products = [i for i in live if i.event.product_id is not None]
        searches = [i for i in live if i.event.search_phrase is not None]
        if products:
            self._attach_product_vectors(products)
        if searches:
            self._attach_phrase_vectors(searches)

    def _attach_product_vectors(self, items: list[Item]) -> None:
        """Product events get their product's vector (cached, else read); unknown products skip, foreign ones fail."""
        vectors, unknown = self.products.take({i.event.product_id for i in items})
        try:
            found, foreign = self.store.product_vectors(unknown, self.model, self.dimensions)
        except PyMongoError as exc:
            self._mark(items, Status.RETRY, StoreUnavailable(f"reading product vectors: {exc}"))
            return
        self.products.put(found)
        vectors.update(found)
        for item in items:
            pid = item.event.product_id
            if pid in vectors:
                item.vector = vectors[pid]
            elif pid in foreign:
                self._mark([item], Status.FAILED, VectorSpaceMismatch(f"product {pid} has {foreign[pid]}"))
            else:
                self._mark([item], Status.SKIPPED, ProductMissing(f"product {pid} has no vector"))
                log.warning("product not found, event skipped", extra=_fields(item.event))

    def _attach_phrase_vectors(self, items: list[Item]) -> None:
        """Search events get their phrase's embedding; a phrase without one retries or fails, as its error says, only
        the events that need that phrase."""
        found = self.phrases.embed([i.event.search_phrase for i in items])
        for item in items:
            got = found[item.event.search_phrase]
            if isinstance(got, EmbeddingError):
                self._mark([item], Status.RETRY if got.transient else Status.FAILED, got)
            else:
                item.vector = got

    @staticmethod
    def _mark(items: list[Item], status: Status, error: Exception | None) -> None:
        for item in items:
            item.status, item.error = status, error

    def _apply(self, result: BatchResult, items: list[Item]) -> None:
        """Fold and write each user's events; conflicted users are re-read and written again within the budget."""
        pending: dict[str, list[Item]] = defaultdict(list)
        for item in items:
            pending[item.event.user_id].append(item)
        deadline = time.monotonic() + WRITE_BUDGET_S
        for attempt in itertools.count():
            if not pending:
                return
            if attempt and not self._pause_after_conflict(attempt, deadline):
                break
            pending = self._write_round(result, pending)
        for group in pending.values():
            self._mark(group, Status.RETRY, VersionConflict(
                f"the profile kept changing under this worker for {WRITE_BUDGET_S:g} s of re-reads"))

    def _write_round(self, result: BatchResult, pending: dict[str, list[Item]]) -> dict[str, list[Item]]:
        """One read-fold-write round; returns the users whose write met a newer version (to re-read)."""
        stored = self._current_profiles(result, pending)
        erased = None if stored is None else self._erasure_times(pending, stored)
        if stored is None or erased is None:
            return {}
        writes: list[ProfileWrite] = []
        groups: dict[str, list[Item]] = {}
        for user_id, group in pending.items():
            current = stored.get(user_id)
            if current is not None:
                for item in group:
                    if current.seen(item.event.message_id):
                        item.status = Status.DUPLICATE
                group = [i for i in group if i.status == Status.PENDING]
            group = self._drop_erased(group, erased.get(user_id))
            write = self._fold(user_id, group, current, erased.get(user_id)) if group else None
            if write is not None:
                writes.append(write)
                groups[user_id] = group
        try:
            outcome = self.store.write_profiles(writes, self.settings.store_layout)
        except PyMongoError as exc:
            self.profiles.drop(groups)  # landed or not: read them again
            self._mark([i for g in groups.values() for i in g], Status.RETRY, StoreUnavailable(str(exc)))
            return {}
        self.profiles.put(outcome.stored)
        self.profiles.drop(outcome.conflicted)
        raced = self._erased_meanwhile([u for u in outcome.applied if u not in stored], erased, outcome)
        result.writes += len(outcome.applied) - len(raced)
        result.conflicts += len(outcome.conflicted)
        for user_id in outcome.applied:
            if user_id in raced:
                self._mark(groups[user_id], Status.RETRY, ErasedMeanwhile(
                    "the user was erased while this batch created their profile: the new profile was deleted"))
            else:
                self._mark(groups[user_id], Status.APPLIED, None)
        return {u: groups[u] for u in outcome.conflicted}

    def _erasure_times(self, pending: dict[str, list[Item]], stored: dict[str, StoredProfile]
                       ) -> dict[str, datetime] | None:
        """The erasure time of each pending user that was erased: carried by its profile (created after the erasure),
        else read from the erasure records for the users without a profile (one ``$in``). An unreadable record fails
        its user's events; None (every event marked for retry) when MongoDB fails."""
        erased = {u: p.erased_at for u, p in stored.items() if p.erased_at is not None}
        new = [u for u in pending if u not in stored]
        if not new:
            return erased
        try:
            found, unreadable = self.store.erasure_times(new)
        except PyMongoError as exc:
            self._mark([i for group in pending.values() for i in group], Status.RETRY, StoreUnavailable(str(exc)))
            return None
        for user_id, problem in unreadable.items():
            self._mark(pending.pop(user_id), Status.FAILED, problem)
        erased.update(found)
        return erased

    def _drop_erased(self, group: list[Item], erased_at: datetime | None) -> list[Item]:
        """The events of ``group`` that may still apply: after the user's erasure (if any) by more than the contract's
        future tolerance, since an event published before the erasure may carry a time up to that far ahead. The
        others are acked without effect (status ERASED), and logged without the user's data."""
        if erased_at is None:
            return group
        cutoff = erased_at + FUTURE_TOLERANCE
        old = [i for i in group if i.event.occurred_at <= cutoff]
        if old:
            self._mark(old, Status.ERASED, None)
            log.info("events from before an erasure dropped", extra={"events": len(old)})
        return [i for i in group if i.status == Status.PENDING]

    def _erased_meanwhile(self, created: list[str], erased: dict[str, datetime], outcome: WriteResult) -> set[str]:
        """Of the users whose profile this round created, those erased since their erasure records were read
        (``erased``): the record is written before the profile is deleted, so one written since means the erasure's
        delete may have run before this insert. Their new document is deleted again, whatever its version."""
        if not created:
            return set()
        try:
            found, unreadable = self.store.erasure_times(created)
            raced = {u for u, at in found.items() if at != erased.get(u)} | unreadable.keys()
            for user_id in raced:
                self.store.delete_profile_doc(user_id, outcome.stored[user_id].doc_id)
        except PyMongoError as exc:  # the new profile stays; a `user delete` run meanwhile may have to run again
            log.warning("could not check new profiles against erasures", extra={"error": str(exc)[:200]})
            return set()
        self.profiles.drop(raced)
        return raced

    def _current_profiles(self, result: BatchResult, pending: dict[str, list[Item]]
                          ) -> dict[str, StoredProfile] | None:
        """The pending users' stored profiles (cached as last written, else read); an unreadable one fails its
        events and leaves ``pending``; None (every event marked for retry) when MongoDB fails."""
        stored, unknown = self.profiles.take(pending)  # profiles this worker wrote last need no read
        try:
            read, unreadable = self.store.load_profiles(unknown, self.model, self.dimensions)
        except PyMongoError as exc:
            self._mark([i for group in pending.values() for i in group], Status.RETRY, StoreUnavailable(str(exc)))
            return None
        result.reads += len(unknown)
        stored.update(read)
        for user_id, problem in unreadable.items():  # a document no fold can start from: its events fail
            self._mark(pending.pop(user_id), Status.FAILED, problem)
        return stored

    def _fold(self, user_id: str, group: list[Item], current: StoredProfile | None,
              erased_at: datetime | None = None) -> ProfileWrite | None:
        """The write that folds ``group`` into ``current`` (``erased_at``: the user's erasure, kept in a document the
        write creates); None (the group failed) when they cannot be folded."""
        events = [i.event for i in group]
        times = np.array([to_days(e.occurred_at) for e in events])
        weights = np.array([self.settings.weights[e.event_type] for e in events])
        try:
            profile = fold(current.profile if current else None, times, weights,
                           np.asarray([i.vector for i in group]),  # rows of equal length (else ValueError, as np.stack)
                           lam=self.settings.decay_lambda, model=self.model)
        except (VectorSpaceMismatch, ValueError) as exc:
            self._mark(group, Status.FAILED, exc)
            return None
        basis = fold_basis(current and current.item_map(), current and current.profile.last_updated,
                           profile.last_updated, [item_key(e) for e in events], times, weights,
                           lam=self.settings.decay_lambda)
        newest = max(events, key=lambda e: e.occurred_at)
        if current is not None and to_days(newest.occurred_at) < current.profile.last_updated:
            newest = None  # only late events: the profile's last event stays
        return ProfileWrite(
            user_id=user_id,
            profile=profile,
            base=current,
            message_ids=[e.message_id for e in events],
            counts=dict(Counter(e.event_type for e in events)),
            last_event_type=newest and newest.event_type,
            last_event_id=newest and newest.message_id,
            purchased=[e.product_id for e in events if e.event_type == "product_purchase"],
            erased_at=erased_at,
            basis=basis,
        )

    @staticmethod
    def _pause_after_conflict(attempt: int, deadline: float) -> bool:
        """Sleep a random pause before re-read ``attempt`` (1-based); False when the budget is spent."""
        first, cap = CONFLICT_PAUSE_S
        pause = random.uniform(0, min(first * 2 ** (attempt - 1), cap))
        if time.monotonic() + pause >= deadline:
            return False
        time.sleep(pause)
        return True


def item_key(event: Event) -> str:
    """The event's item in the profile's item map: its product, or its search phrase as the embedder sees it."""
    if event.product_id is not None:
        return product_key(event.product_id)
    return phrase_key(normalise_phrase(event.search_phrase or ""))


def _fields(event: Event) -> dict:
    return {"message_id": event.message_id, "user_id": event.user_id, "event_type": event.event_type}
