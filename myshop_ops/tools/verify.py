"""`myshop verify`: the exact oracle. The profile math does not depend on order or batching, so every user's
final profile can be recomputed from the set of events published (deduplicated by message_id) and compared with
what the workers stored. Assumes the file holds every event of the users it names (test runs, audits of a
replayed stream); events recorded in failed_messages are expected to be missing and are reported as failed."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.embeddings import EmbeddingError, PhraseEmbedder
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import Event, InvalidMessage, event_key, parse
from myshop_ops.base.layout import UnreadableProfile, read_profile, to_datetime
from myshop_ops.base.profile import Profile, VectorSpaceMismatch, fold, prior_residual, to_days

COSINE_MIN = 0.99999
MAGNITUDE_RTOL = 1e-4
CHUNK = 1000


@dataclass(slots=True)
class UserCheck:
    user_id: str
    status: str  # ok | lost | pending (short while messages are in flight) | duplicated | diverging | unverifiable
    expected_events: int
    stored_events: int
    cosine: float | None = None  # None for an adopted profile: its prior's direction is not known any more
    magnitude_error: float | None = None  # relative (adopted: how far the sum beyond the events is from the prior's)
    adopted: bool = False  # folded from a prior myshop adopted (layout.py): checked against the rule
    reason: str | None = None  # why an unverifiable profile cannot be checked


@dataclass
class Verification:
    lines: int = 0
    invalid_lines: int = 0
    events: int = 0  # distinct valid events
    duplicates_in_file: int = 0
    skipped_no_product: int = 0
    in_failed: int = 0
    in_flight: int = 0  # messages still queued or unacked when verified: a short count may only be waiting
    users: list[UserCheck] = field(default_factory=list)

    def unsettled(self, in_flight: int) -> None:
        """Record that ``in_flight`` messages were not settled yet: users short of events are ``pending``, not
        ``lost`` (the run cannot be judged until the queues drained)."""
        self.in_flight = in_flight
        if in_flight:
            for u in self.users:
                if u.status == "lost":
                    u.status = "pending"

    def count(self, status: str) -> int:
        return sum(1 for u in self.users if u.status == status)

    @property
    def lost_events(self) -> int:
        return sum(max(0, u.expected_events - u.stored_events) for u in self.users)

    @property
    def duplicated_events(self) -> int:
        return sum(max(0, u.stored_events - u.expected_events) for u in self.users)

    @property
    def nothing_checked(self) -> str | None:
        """Why no profile could be compared, or None. A run that checked nothing is not OK: an empty file, or one
        of invalid lines only, proves nothing about the stored profiles."""
        if self.users:
            return None
        if not self.events:
            return (f"nothing to verify: none of its {self.lines} line(s) is a valid event" if self.lines
                    else "nothing to verify: the file holds no events")
        return (f"nothing to verify: each of its {self.events} event(s) is in failed_messages ({self.in_failed}) "
                f"or names a product without a vector ({self.skipped_no_product})")

    @property
    def ok(self) -> bool:
        return not self.in_flight and bool(self.users) and all(u.status == "ok" for u in self.users)

    def as_json(self, max_problems: int = 50) -> dict:
        problems = [asdict(u) for u in self.users if u.status != "ok"][:max_problems]
        return {"ok": self.ok, "reason": self.nothing_checked, "lines": self.lines,
                "invalid_lines": self.invalid_lines, "events": self.events,
                "duplicates_in_file": self.duplicates_in_file, "skipped_no_product": self.skipped_no_product,
                "in_failed": self.in_failed, "in_flight": self.in_flight, "users": len(self.users),
                "users_pending": self.count("pending"),
                "users_ok": self.count("ok"), "users_lost": self.count("lost"),
                "users_duplicated": self.count("duplicated"), "users_diverging": self.count("diverging"),
                "users_unverifiable": self.count("unverifiable"),
                "users_adopted": sum(1 for u in self.users if u.adopted),
                "events_lost": self.lost_events, "events_duplicated": self.duplicated_events, "problems": problems}


def read_events(lines: Iterable[bytes], report: Verification) -> dict[str, Event]:
    """Valid events by ``Event.key`` (message id and user; the first of duplicates kept, as the workers do)."""
    events: dict[str, Event] = {}
    for line in lines:
        if not line.strip():
            continue
        report.lines += 1
        try:
            event = parse(line.strip())
        except InvalidMessage:
            report.invalid_lines += 1
            continue
        if event.key in events:
            report.duplicates_in_file += 1
        else:
            events[event.key] = event
    report.events = len(events)
    return events


def _chunks(items: list, size: int = CHUNK) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def verify(settings: Settings, lines: Iterable[bytes], store: Store, phrases: PhraseEmbedder) -> Verification:
    report = Verification()
    events = read_events(lines, report)
    failed_keys = set()
    for chunk in _chunks(sorted({e.message_id for e in events.values()})):
        failed_keys.update(event_key(m, str(user)) for m, user in store.failure_owners(chunk))
    live = [e for e in events.values() if e.key not in failed_keys]
    report.in_failed = len(events) - len(live)
    vectors = _vectors(settings, live, store, phrases)
    report.skipped_no_product = sum(1 for e in live if e.key not in vectors)
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in live:
        if e.key in vectors:
            by_user[e.user_id].append(e)
    stored = _stored(store, list(by_user))
    for user_id, evs in sorted(by_user.items()):
        expected = fold(None, np.array([to_days(e.occurred_at) for e in evs]),
                        np.array([settings.weights[e.event_type] for e in evs]),
                        np.stack([vectors[e.key] for e in evs]), lam=settings.decay_lambda,
                        model=settings.model)
        report.users.append(_judge(settings, user_id, expected, Counter(e.event_type for e in evs),
                                   stored.get(user_id)))
    return report


def _vectors(settings: Settings, events: list[Event], store: Store, phrases: PhraseEmbedder) -> dict[str, np.ndarray]:
    """The vector each event contributes, by ``Event.key`` (absent: its product has no usable vector)."""
    products: dict[str, np.ndarray] = {}
    for chunk in _chunks(sorted({e.product_id for e in events if e.product_id is not None})):
        found, _ = store.product_vectors(chunk, settings.model, settings.embedding_dimensions)
        products.update(found)
    searched: dict[str, np.ndarray] = {}
    for chunk in _chunks(sorted({e.search_phrase for e in events if e.search_phrase is not None})):
        for phrase, vec in phrases.embed(chunk).items():
            if isinstance(vec, EmbeddingError):
                raise vec
            searched[phrase] = vec
    out = {}
    for e in events:
        vec = searched.get(e.search_phrase) if e.search_phrase is not None else products.get(e.product_id)
        if vec is not None:
            out[e.key] = vec
    return out


def _stored(store: Store, user_ids: list[str]) -> dict[str, dict]:
    out = {}
    for chunk in _chunks(user_ids):
        out.update(store.profile_docs(chunk))
    return out


def _judge(settings: Settings, user_id: str, expected: Profile, counts: Counter, doc: dict | None) -> UserCheck:
    n = sum(counts.values())
    if doc is None:
        return UserCheck(user_id, "lost", n, 0)
    try:
        stored = read_profile(doc, settings.model, settings.embedding_dimensions)
    except (UnreadableProfile, VectorSpaceMismatch) as exc:
        return UserCheck(user_id, "unverifiable", n, 0, reason=f"the profile cannot be read: {exc}")
    if stored.adopted:
        return UserCheck(user_id, "unverifiable", n, stored.event_count, reason=(
            f"version {stored.version} was written by another writer (the shop's PHP workers?) after myshop's last "
            "write: its events are not all in the file"))
    adoption = doc.get("adopted") if isinstance(doc.get("adopted"), dict) else None
    prior_t = to_datetime(adoption.get("last_updated")) if adoption else None
    before = adoption.get("event_count", 0) if adoption else 0
    if adoption and (prior_t is None or not isinstance(before, int)):
        return UserCheck(user_id, "unverifiable", n, stored.event_count, reason="its adoption record is unreadable")
    check = UserCheck(user_id, "ok", n, stored.event_count - before, adopted=adoption is not None)
    if check.stored_events != n:
        check.status = "lost" if check.stored_events < n else "duplicated"
        return check
    if prior_t is not None:
        # the prior's direction is gone; its weight is known: the sum beyond the events must be exactly that
        check.magnitude_error = prior_residual(stored.profile, expected, to_days(prior_t), settings.decay_lambda)
        diverging = check.magnitude_error > MAGNITUDE_RTOL
    else:
        got = stored.profile
        check.cosine = float(got.embedding.astype(np.float64) @ expected.embedding.astype(np.float64) /
                             (np.linalg.norm(got.embedding) * np.linalg.norm(expected.embedding) or 1.0))
        check.magnitude_error = abs(got.magnitude - expected.magnitude) / max(expected.magnitude, 1e-12)
        diverging = check.cosine < COSINE_MIN or check.magnitude_error > MAGNITUDE_RTOL
    if diverging or (not before and dict(doc.get("event_counts") or {}) != dict(counts)):
        check.status = "diverging"
    return check
