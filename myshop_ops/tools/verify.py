"""`myshop verify`: the exact oracle. The profile math does not depend on order or batching, so every user's
final profile can be recomputed from the set of events published (deduplicated by message_id) and compared with
what the workers stored. Assumes the file holds every event of the users it names (test runs, audits of a
replayed stream); events recorded in failed_messages are expected to be missing and are reported as failed.

A profile is OK only when it equals that recomputation: vector, magnitude, time and counts. A profile myshop adopted
from the shop (layout.py) carries its prior in its adoption record: it is recomputed as fold(prior, the file's
events) and compared the same way, its counts less the record's. The prior is trusted as recorded (it predates
myshop: no events file holds it); the record is checked against the profile (an earlier version, no more events, no
later time, a finite unit vector of the configured size, a positive magnitude), else the profile is
``unverifiable``, as is one adopted before myshop kept the prior. This is a consistency check against the events,
not tamper-proofing: whoever can write MongoDB can write a profile and a record that agree.

Memory is bounded whatever the file's size: the events go through a scratch SQLite database in a temporary
directory (deduplication, failed_messages, vectors and the per-user order are all done there, with a page cache of
SCRATCH_CACHE_KIB), and Python holds at most CHUNK events, CHUNK recomputed profiles and MAX_KEPT problem users at a
time. The scratch database takes about half the events file on disk (its sorts spill there too), plus the vectors
of the products and phrases it names, and is removed at the end.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import groupby
from operator import itemgetter
from pathlib import Path

import numpy as np

from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.embeddings import EmbeddingError, PhraseEmbedder
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import InvalidMessage, parse
from myshop_ops.base.layout import ProfileRead, UnreadableProfile, read_adoption, read_profile
from myshop_ops.base.profile import Profile, VectorSpaceMismatch, fold, to_days

COSINE_MIN = 0.99999
MAGNITUDE_RTOL = 1e-4
TIME_TOLERANCE_DAYS = 0.002 / 86_400  # BSON dates keep milliseconds: the stored time may be cut by < 1 ms
CHUNK = 1000  # ids per database query, events per fold, users per profile read
INSERT_BATCH = 10_000  # events per scratch insert
MAX_KEPT = 1000  # problem users kept for the report (all are counted)
SCRATCH_CACHE_KIB = 16 * 1024  # the scratch database's page cache (its temporary sorts spill to disk)


@dataclass(slots=True)
class UserCheck:
    user_id: str
    status: str  # ok | lost | pending (short while messages are in flight) | duplicated | diverging | unverifiable
    expected_events: int
    stored_events: int
    cosine: float | None = None  # None when the vectors were not compared
    magnitude_error: float | None = None  # relative
    adopted: bool = False  # carries an adoption record (layout.py): recomputed from the prior it holds
    reason: str | None = None  # why an unverifiable profile cannot be checked, or what diverges


@dataclass
class Verification:
    lines: int = 0
    invalid_lines: int = 0
    events: int = 0  # distinct valid events
    duplicates_in_file: int = 0
    skipped_no_product: int = 0
    in_failed: int = 0
    in_flight: int = 0  # messages still queued or unacked when verified: a short count may only be waiting
    complete: bool = True  # False: a dependency failed mid-way, the counts are those of the users checked so far
    users: int = 0
    statuses: Counter = field(default_factory=Counter)
    adopted: int = 0
    lost_events: int = 0
    duplicated_events: int = 0
    problems: list[UserCheck] = field(default_factory=list)  # the first MAX_KEPT problem users, by user id

    def add(self, check: UserCheck) -> None:
        """Count one user's check (and keep it when it is a problem, up to MAX_KEPT)."""
        self.users += 1
        self.statuses[check.status] += 1
        self.adopted += check.adopted
        self.lost_events += max(0, check.expected_events - check.stored_events)
        self.duplicated_events += max(0, check.stored_events - check.expected_events)
        if check.status != "ok" and len(self.problems) < MAX_KEPT:
            self.problems.append(check)

    def unsettled(self, in_flight: int) -> None:
        """Record that ``in_flight`` messages were not settled yet: users short of events are ``pending``, not
        ``lost`` (the run cannot be judged until the queues drained)."""
        self.in_flight = in_flight
        if in_flight:
            self.statuses["pending"] += self.statuses.pop("lost", 0)
            for u in self.problems:
                if u.status == "lost":
                    u.status = "pending"

    def count(self, status: str) -> int:
        return self.statuses.get(status, 0)

    @property
    def nothing_checked(self) -> str | None:
        """Why no profile could be compared, or None. A run that checked nothing is not OK: an empty file, or one
        of invalid lines only, proves nothing about the stored profiles."""
        if self.users or not self.complete:
            return None
        if not self.events:
            return (f"nothing to verify: none of its {self.lines} line(s) is a valid event" if self.lines
                    else "nothing to verify: the file holds no events")
        return (f"nothing to verify: each of its {self.events} event(s) is in failed_messages ({self.in_failed}) "
                f"or names a product without a vector ({self.skipped_no_product})")

    @property
    def ok(self) -> bool:
        return self.complete and not self.in_flight and bool(self.users) and self.count("ok") == self.users

    def as_json(self, max_problems: int = 50) -> dict:
        return {"ok": self.ok, "complete": self.complete, "reason": self.nothing_checked, "lines": self.lines,
                "invalid_lines": self.invalid_lines, "events": self.events,
                "duplicates_in_file": self.duplicates_in_file, "skipped_no_product": self.skipped_no_product,
                "in_failed": self.in_failed, "in_flight": self.in_flight, "users": self.users,
                "users_pending": self.count("pending"),
                "users_ok": self.count("ok"), "users_lost": self.count("lost"),
                "users_duplicated": self.count("duplicated"), "users_diverging": self.count("diverging"),
                "users_unverifiable": self.count("unverifiable"), "users_adopted": self.adopted,
                "events_lost": self.lost_events, "events_duplicated": self.duplicated_events,
                "problems": [asdict(u) for u in self.problems[:max_problems]]}


def verify(settings: Settings, lines: Iterable[bytes], store: Store,
           phrases: PhraseEmbedder | Callable[[], tuple[Settings, PhraseEmbedder]],
           report: Verification | None = None, scratch_dir: Path | None = None) -> Verification:
    """Check every user the file names (``lines``: its lines, each already bounded). ``report`` is filled as the
    run goes: when a dependency fails mid-way it holds what was checked so far (and ``complete`` is False).
    ``phrases`` may be a function giving the settings and embedder to check with, called once the file is read
    (the model of the live profiles is read from the store then)."""
    report = Verification() if report is None else report
    report.complete = False
    with _scratch(scratch_dir) as db:
        _load(db, lines, report)
        if callable(phrases):
            settings, phrases = phrases()
        _mark_failed(db, store, report)
        _product_vectors(db, store, settings)
        _phrase_vectors(db, phrases)
        report.skipped_no_product = db.execute(
            "SELECT count(*) FROM live LEFT JOIN vectors v USING (kind, ref) WHERE v.vec IS NULL AND kind = 'p'"
        ).fetchone()[0]
        for batch in _batches(_expected(db, settings), CHUNK):
            docs = store.profile_docs([u.user_id for u in batch])
            for u in batch:
                report.add(_judge(settings, u, docs.get(u.user_id)))
    report.complete = True
    return report


# ---- the scratch database -----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE events (user_id TEXT NOT NULL, message_id TEXT NOT NULL, type TEXT NOT NULL, t REAL NOT NULL,
                     kind TEXT NOT NULL, ref TEXT NOT NULL, PRIMARY KEY (user_id, message_id)) WITHOUT ROWID;
CREATE TABLE failed (user_id TEXT NOT NULL, message_id TEXT NOT NULL, PRIMARY KEY (user_id, message_id))
    WITHOUT ROWID;
CREATE TABLE vectors (kind TEXT NOT NULL, ref TEXT NOT NULL, vec BLOB, error TEXT, PRIMARY KEY (kind, ref))
    WITHOUT ROWID;
CREATE VIEW live AS SELECT * FROM events e
    WHERE NOT EXISTS (SELECT 1 FROM failed f WHERE f.user_id = e.user_id AND f.message_id = e.message_id);
"""


@contextmanager
def _scratch(directory: Path | None) -> Iterator[sqlite3.Connection]:
    """A scratch database in its own temporary directory (removed at the end, also on failure)."""
    with tempfile.TemporaryDirectory(prefix="myshop-verify-", dir=directory) as tmp, \
            closing(sqlite3.connect(Path(tmp) / "verify.sqlite3", isolation_level=None)) as db:
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "temp_store = FILE", "locking_mode = EXCLUSIVE",
                       f"cache_size = -{SCRATCH_CACHE_KIB}"):
            db.execute(f"PRAGMA {pragma}")
        db.executescript(_SCHEMA)
        yield db


def _load(db: sqlite3.Connection, lines: Iterable[bytes], report: Verification) -> None:
    """Every valid event once (by message id and user: the first of duplicates kept, as the workers do)."""
    rows: list[tuple] = []
    for line in lines:
        if not (line := line.strip()):
            continue
        report.lines += 1
        try:
            e = parse(line)
        except InvalidMessage:
            report.invalid_lines += 1
            continue
        search = e.event_type == "search"
        rows.append((e.user_id, e.message_id, e.event_type, to_days(e.occurred_at), "s" if search else "p",
                     e.search_phrase if search else e.product_id))
        if len(rows) >= INSERT_BATCH:
            _insert(db, rows, report)
    _insert(db, rows, report)


def _insert(db: sqlite3.Connection, rows: list[tuple], report: Verification) -> None:
    if rows:
        inserted = db.executemany("INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?)", rows).rowcount
        report.events += inserted
        report.duplicates_in_file += len(rows) - inserted
        rows.clear()


def _column_chunks(db: sqlite3.Connection, query: str) -> Iterator[list]:
    """The first column of ``query``'s rows, CHUNK at a time."""
    cursor = db.execute(query)
    while chunk := cursor.fetchmany(CHUNK):
        yield [row[0] for row in chunk]


def _mark_failed(db: sqlite3.Connection, store: Store, report: Verification) -> None:
    for chunk in _column_chunks(db, "SELECT DISTINCT message_id FROM events ORDER BY message_id"):
        db.executemany("INSERT OR IGNORE INTO failed VALUES (?, ?)",
                       [(str(user), m) for m, user in store.failure_owners(chunk)])
    report.in_failed = report.events - db.execute("SELECT count(*) FROM live").fetchone()[0]


def _product_vectors(db: sqlite3.Connection, store: Store, settings: Settings) -> None:
    """Each usable product vector the live events name (a product without one is skipped, as the workers do)."""
    query = "SELECT DISTINCT ref FROM live WHERE kind = 'p' ORDER BY ref"
    for chunk in _column_chunks(db, query):
        found, _ = store.product_vectors(chunk, settings.model, settings.embedding_dimensions)
        db.executemany("INSERT INTO vectors VALUES ('p', ?, ?, NULL)",
                       [(pid, vec.astype("<f4").tobytes()) for pid, vec in found.items()])


def _phrase_vectors(db: sqlite3.Connection, phrases: PhraseEmbedder) -> None:
    """Each search phrase's vector, or why the provider gave none. A phrase the provider refuses fails only the
    users who searched it (the embedder answers per phrase); after a transient failure (the provider's own
    retries spent) no further call is made: the remaining phrases have that error."""
    down: str | None = None
    for chunk in _column_chunks(db, "SELECT DISTINCT ref FROM live WHERE kind = 's' ORDER BY ref"):
        if down is None:
            found, down = _embed(phrases, chunk)
        else:
            found = dict.fromkeys(chunk, down)
        db.executemany("INSERT INTO vectors VALUES ('s', ?, ?, ?)",
                       [(p, None, r) if isinstance(r, str) else (p, r.astype("<f4").tobytes(), None)
                        for p, r in found.items()])


def _embed(phrases: PhraseEmbedder, chunk: list[str]) -> tuple[dict[str, np.ndarray | str], str | None]:
    """(vector or why there is none, by phrase; the transient error that should stop further calls). The embedder
    answers per phrase: a phrase the provider refuses is that phrase's reason alone."""
    found: dict[str, np.ndarray | str] = {}
    down = None
    for phrase, result in phrases.embed(chunk).items():
        if isinstance(result, EmbeddingError):
            found[phrase] = f"its search phrases could not be embedded: {str(result)[:300]}"
            down = down or (found[phrase] if result.transient else None)
        else:
            found[phrase] = result
    return found, down


# ---- the recomputation and the judgement ----------------------------------------------------------------------


@dataclass(slots=True)
class Expected:
    """One user's recomputation from the file (``reason``: why it could not be made)."""

    user_id: str
    events: int
    counts: Counter
    profile: Profile | None = None
    reason: str | None = None


def _expected(db: sqlite3.Connection, settings: Settings) -> Iterator[Expected]:
    """Every user with at least one usable live event, in user id order, folded CHUNK events at a time."""
    rows = db.execute("SELECT user_id, type, t, vec, error FROM live LEFT JOIN vectors USING (kind, ref) "
                      "WHERE vec IS NOT NULL OR error IS NOT NULL ORDER BY user_id")
    for user_id, user_rows in groupby(rows, key=itemgetter(0)):
        exp = Expected(user_id, 0, Counter())
        for chunk in _batches(user_rows, CHUNK):
            exp.events += len(chunk)
            exp.counts.update(r[1] for r in chunk)
            if exp.reason is None and (error := next((r[4] for r in chunk if r[4] is not None), None)):
                exp.reason, exp.profile = error, None
            if exp.reason is None:
                try:
                    exp.profile = fold(exp.profile, np.array([r[2] for r in chunk]),
                                       np.array([settings.weights[r[1]] for r in chunk]),
                                       np.stack([np.frombuffer(r[3], "<f4") for r in chunk]),
                                       lam=settings.decay_lambda, model=settings.model)
                except ValueError as exc:  # the vectors cancel out: no profile to compare with
                    exp.reason, exp.profile = f"its events cannot be folded: {exc}", None
        yield exp


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _judge(settings: Settings, exp: Expected, doc: dict | None) -> UserCheck:
    n = exp.events
    if doc is None:  # lost, unless the file's events cannot tell what the profile should be
        return UserCheck(exp.user_id, "lost" if exp.reason is None else "unverifiable", n, 0, reason=exp.reason)
    try:
        stored = read_profile(doc, settings.model, settings.embedding_dimensions)
    except (UnreadableProfile, VectorSpaceMismatch) as exc:
        return UserCheck(exp.user_id, "unverifiable", n, 0, reason=f"the profile cannot be read: {exc}")
    if stored.adopted:
        return UserCheck(exp.user_id, "unverifiable", n, stored.event_count, adopted="adopted" in doc, reason=(
            f"version {stored.version} was written by another writer (the shop's PHP workers?) after myshop's last "
            "write: its events are not all in the file"))
    if exp.reason is not None:
        return UserCheck(exp.user_id, "unverifiable", n, stored.event_count, reason=exp.reason)
    check = UserCheck(exp.user_id, "ok", n, stored.event_count, adopted="adopted" in doc)
    counts, expected = stored.event_counts, exp.profile
    if check.adopted:
        try:
            counts, expected = _since_adoption(settings, check, doc["adopted"], stored, expected)
        except _Unverifiable as exc:
            check.status, check.reason = "unverifiable", str(exc)
            return check
    if check.stored_events != n:
        check.status = "lost" if check.stored_events < n else "duplicated"
        return check
    got = stored.profile
    check.cosine = float(got.embedding.astype(np.float64) @ expected.embedding.astype(np.float64) /
                         (np.linalg.norm(got.embedding) * np.linalg.norm(expected.embedding) or 1.0))
    check.magnitude_error = abs(got.magnitude - expected.magnitude) / max(expected.magnitude, 1e-12)
    check.reason = _difference(check, got, expected, counts, exp.counts)
    if check.reason:
        check.status = "diverging"
    return check


def _difference(check: UserCheck, got: Profile, expected: Profile, stored_counts: dict, counts: Counter
                ) -> str | None:
    """What differs between a stored profile and its recomputation, or None."""
    if check.cosine < COSINE_MIN:
        return f"its vector is not the events' (cosine {check.cosine:.6f})"
    if check.magnitude_error > MAGNITUDE_RTOL:
        return f"its magnitude is off by {check.magnitude_error:.2e} (relative)"
    if abs(got.last_updated - expected.last_updated) > TIME_TOLERANCE_DAYS:
        return "its last_updated is not its newest event's time"
    if {k: v for k, v in stored_counts.items() if v} != dict(counts):
        return "its per-type event counts are not the file's"
    return None


class _Unverifiable(Exception):
    """Why a profile cannot be checked against the file."""


def _since_adoption(settings: Settings, check: UserCheck, value: object, stored: ProfileRead, events: Profile
                    ) -> tuple[dict, Profile]:
    """For a profile with an adoption record: (the stored counts minus the record's, the recomputation
    fold(prior, the file's events)); ``check.stored_events`` becomes the events counted since the adoption.
    _Unverifiable when the record is unreadable, contradicts the profile or holds no prior. The prior is trusted
    as recorded (it predates myshop); everything since is checked as for any profile."""
    try:
        record = read_adoption(value, settings.model, settings.embedding_dimensions)
    except UnreadableProfile as exc:
        raise _Unverifiable(f"its adoption record is unreadable: {exc}") from None
    if not (record.event_count <= stored.event_count and record.version < stored.version
            and record.last_updated <= stored.profile.last_updated + TIME_TOLERANCE_DAYS):
        raise _Unverifiable("its adoption record contradicts the profile (counts, version or time)")
    if record.prior is None:
        raise _Unverifiable("adopted before myshop kept the prior: cannot be checked")
    check.stored_events -= record.event_count
    counts = {k: stored.event_counts.get(k, 0) - record.event_counts.get(k, 0)
              for k in stored.event_counts.keys() | record.event_counts.keys()}
    try:  # the events' sum as one event of weight 1 at its time: folding is linear (profile.py)
        return counts, fold(record.prior, np.array([events.last_updated]), np.ones(1), events.total[None, :],
                            lam=settings.decay_lambda, model=settings.model)
    except ValueError as exc:  # the prior and the events cancel out
        raise _Unverifiable(f"its prior and events cannot be folded: {exc}") from None
