"""MongoDB: user profiles (conditional writes), product vectors, failed-message records, erasure records, indexes."""

from __future__ import annotations

import copy
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
from bson.binary import Binary
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING, DESCENDING, DeleteOne, InsertOne, MongoClient, ReplaceOne, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

from myshop_ops.adapters.config import Settings
from myshop_ops.base.basis import Basis, UnreadableBasis, decode_basis, encode_basis
from myshop_ops.base.layout import (
    SHOP_VECTOR,
    ForeignVector,
    UnreadableProfile,
    adoption_record,
    id_forms,
    id_key,
    product_fields,
    product_vector,
    profile_fields,
    read_profile,
    to_datetime,
)
from myshop_ops.base.profile import Profile, VectorSpaceMismatch, from_days
from myshop_ops.base.rawbson import DoubleArray, decode_with_doubles, raw_document

USERS = "user_embeddings"
PRODUCTS = "product_embeddings"
FAILED = "failed_messages"
MIGRATIONS = "embedding_migrations"  # the one model migration document (tools/migration.py)
NEXT, PREV = "_next", "_prev"  # a model migration's shadow collections: the profiles and products of the other model
ERASURES = "user_erasures"  # one record per erased user: a hash of the user id and the erasure time (erasure.py)
RECENT_IDS = 256  # message ids kept per profile for the authoritative duplicate check
RECENT_WRITES = 128  # write tokens kept per profile: tells a landed write from a conflict, one token per write
ID_BYTES = 32  # a message id (sha256 hex) is kept as its 32 raw bytes
TOKEN_BYTES = 8
ERASURE_AHEAD = timedelta(days=1)  # clocks may differ; an erasure time further ahead is not one myshop recorded
SCAN_BATCH = 500  # explicit cursor batch size: never one huge reply

INDEXES: dict[str, list[tuple[str, list[tuple[str, int]], dict]]] = {
    USERS: [
        ("user_id_unique", [("user_id", ASCENDING)], {"unique": True}),
        ("last_updated", [("last_updated", DESCENDING)], {}),
        ("version", [("version", ASCENDING)], {}),
    ],
    PRODUCTS: [
        ("product_id_unique", [("product_id", ASCENDING)], {"unique": True}),
        ("updated_at", [("updated_at", DESCENDING)], {}),
    ],
    FAILED: [  # one record per failed copy (failure_id); records of older versions and dead-lettered messages have none
        ("failure_id_unique", [("failure_id", ASCENDING)], {"unique": True, "sparse": True}),
        ("message_id", [("message_id", ASCENDING)], {}),
        ("last_failure_at", [("last_failure_at", DESCENDING)], {}),
        ("error_class", [("error_class", ASCENDING)], {}),
        # FAILED_RETENTION_DAYS: a record goes at its expires_at (set when written; none: kept until removed)
        ("expires_at_ttl", [("expires_at", ASCENDING)], {"expireAfterSeconds": 0}),
    ],
    ERASURES: [  # looked up by _id; a record goes at its expires_at (FAILED_RETENTION_DAYS after the erasure)
        ("expires_at_ttl", [("expires_at", ASCENDING)], {"expireAfterSeconds": 0}),
    ],
}


# indexes setup_indexes drops: failed_messages was keyed by message_id, which two failed messages may share
OBSOLETE: dict[str, list[tuple[str, list[tuple[str, int]], dict]]] = {
    FAILED: [("message_id_unique", [("message_id", ASCENDING)], {"unique": True})],
}


def in_space(model: str, dimensions: int) -> dict:
    """The filter of the products of a vector space: tagged with it, or untagged (the shop's sync tags nothing:
    an untagged vector of the right length is taken as the configured model's)."""
    return {"$or": [{"model": model, "dimensions": dimensions}, {"model": None}]}


def pack_ring(value: object, width: int) -> bytes:
    """A stored ring of ids as packed bytes, oldest first.

    Rings are stored as one BSON Binary of fixed-width items and rewritten whole by the version-filtered update:
    256 array elements made profile writes and reads several times slower (docs/PERFORMANCE.md).
    Arrays of hex strings (what $push stored before) are read too."""
    if isinstance(value, bytes):
        ring = bytes(value)  # plain bytes, also from a Binary
        return ring[len(ring) % width:]  # whole items only, whatever was stored
    if not isinstance(value, list):
        return b""
    return b"".join(bytes.fromhex(v) for v in value if isinstance(v, str) and len(v) == 2 * width
                    and all(c in "0123456789abcdefABCDEF" for c in v))


def ring_has(ring: bytes, item: bytes) -> bool:
    """Whether ``item`` is one of the ring's fixed-width items (not a match straddling two)."""
    i = ring.find(item)
    while i != -1:
        if i % len(item) == 0:
            return True
        i = ring.find(item, i + 1)
    return False


_INDEX_OPTIONS = ("unique", "sparse", "partialFilterExpression", "expireAfterSeconds")


def _options(index: dict) -> tuple:
    return tuple(None if index.get(o) in (None, False) else index.get(o) for o in _INDEX_OPTIONS)


def satisfying_index(existing: dict[str, dict], keys: list[tuple[str, int]], opts: dict,
                     name: str | None = None) -> str | None:
    """The name of an index in ``existing`` (``index_information()``) that serves as ``keys`` with ``opts``:
    the same fields in the same directions (either direction for a single field: it serves both sort orders)
    and the same options, whatever its name (``name`` first)."""
    want = [(k, int(d)) for k, d in keys]
    for found in sorted(existing, key=lambda n: n != name):
        info = existing[found]
        try:
            got = [(k, int(d)) for k, d in info["key"]]
        except (KeyError, TypeError, ValueError):
            continue  # a text or hashed index, or an odd listing
        same_keys = got == want or (len(want) == 1 and len(got) == 1 and got[0][0] == want[0][0])
        if same_keys and _options(info) == _options(opts):
            return found
    return None


# Products per bulk write: 1,536 doubles each in the shop layout make a write of 256 products take ~8 s on the
# single-threaded Mongo-wire server, past pymongo's heartbeat (it then cancels the write); a few MB per write anyway.
PRODUCT_WRITE_BATCH = 32
# Profile writes per bulk write, for the same reason: a batch of 500 users in the shop layout is ~10 MB, 10-15 s on
# the test server; pymongo cancelled it and every event of the batch went to a retry queue (docs/PERFORMANCE.md).
PROFILE_WRITE_BATCH = 32
VECTOR_READ_BATCH = 64  # profiles or products per reply of a vector read (~1.4 MB in the shop layout): the same


def _epoch(value: datetime | str) -> float:
    """A product's updated_at in seconds: a date, or an ISO 8601 string (the shop's); an unreadable string is oldest."""
    try:
        when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    except (ValueError, TypeError, OverflowError):
        return float("-inf")


def _index_refusal(collection: str, name: str, keys: list[tuple[str, int]], exc: OperationFailure) -> str:
    """Why MongoDB refused to create an index, and what to do, in one line."""
    fields = ", ".join(k for k, _ in keys)
    if exc.code == 11000:
        return (f"documents of {collection} share a value of {fields} (a missing field counts as null): make it "
                "unique, then run setup-indexes again")
    if exc.code in (85, 86):
        return (f"an index with the same name or keys and other options exists: drop it "
                f"(db.{collection}.dropIndex('{name}') or the conflicting one), then run again")
    first = str((exc.details or {}).get("errmsg") or exc).splitlines()[0][:200]
    return f"{first} (code {exc.code})"


def erasure_key(user_id: str) -> str:
    """The ``_id`` of a user's erasure record: a sha256 hex of the user id, so the record does not hold the id."""
    return hashlib.sha256(b"myshop-erasure\x00" + user_id.encode("utf-8", "surrogatepass")).hexdigest()


def erasure_time(value: object) -> datetime | None:
    """A stored erasure time; None when it is not a time, or one more than ERASURE_AHEAD ahead: myshop records the
    time of the erasure, so a later one is forged (near year 9999 it would overflow the worker's cutoff too)."""
    when = to_datetime(value)
    return when if when is not None and when <= datetime.now(UTC) + ERASURE_AHEAD else None


def _codec(client: MongoClient, dates: DatetimeConversion) -> CodecOptions:
    """The client's codec options with another conversion of BSON dates."""
    return client.codec_options.with_options(datetime_conversion=dates)


def encoded(doc: dict) -> dict | RawBSONDocument:
    """A document to send: as BSON bytes when it holds a shop-layout vector already encoded (rawbson.DoubleArray),
    else as it is (pymongo encodes it)."""
    return raw_document(doc) if any(isinstance(v, DoubleArray) for v in doc.values()) else doc


def message_ids(doc: dict) -> list[str]:
    """A profile document's recent message ids, as hex."""
    ring = pack_ring(doc.get("recent_message_ids"), ID_BYTES)
    return [ring[i:i + ID_BYTES].hex() for i in range(0, len(ring), ID_BYTES)]


@dataclass(slots=True)
class StoredProfile:
    """A profile document as the worker needs it: the math state, its concurrency token and its id rings."""

    profile: Profile
    version: int
    recent_ids: bytes = b""
    recent_writes: bytes = b""
    doc_id: ObjectId | None = None  # the document's _id: a profile erased and created again is another document
    adopted: bool = False  # a prior myshop did not write (layout.py): its next write records the adoption
    event_count: int = 0  # events counted in the document when it was read
    event_counts: dict[str, int | float] = field(default_factory=dict)  # the same by event type
    erased_at: datetime | None = None  # the user's erasure before this document was created (None: none known)
    basis: Basis | None = None  # what built the profile (basis.py); None: not known, all of its mass is residual

    def item_map(self) -> Basis:
        """The profile's item map; without one, all of its mass is residual (written before maps, or adopted)."""
        return self.basis if self.basis is not None else Basis.unmapped(self.profile.magnitude)

    def seen(self, message_id: str) -> bool:
        """Whether the message's effect is already in this profile."""
        return ring_has(self.recent_ids, bytes.fromhex(message_id))


@dataclass(slots=True)
class ProfileWrite:
    """One conditional write: an insert (no base) or an update of the document read (base)."""

    user_id: str
    profile: Profile
    base: StoredProfile | None  # the document read (its version filters the update); None: insert
    message_ids: list[str]
    counts: dict[str, int]
    last_event_type: str | None  # None: only late events, the stored last event stays
    last_event_id: str | None
    purchased: list[str] = field(default_factory=list)  # product ids bought (for recommend --exclude-purchased)
    erased_at: datetime | None = None  # the user's last erasure, recorded in a document this write creates
    basis: Basis | None = None  # the item map after these events (basis.py), written with the vector


@dataclass(slots=True)
class WriteResult:
    applied: list[str] = field(default_factory=list)
    conflicted: list[str] = field(default_factory=list)
    stored: dict[str, StoredProfile] = field(default_factory=dict)  # each applied profile, as it now is


def written(w: ProfileWrite, token: bytes) -> StoredProfile:
    """The profile as ``w`` leaves it: next version, both rings advanced, same document (a new one for an insert)."""
    base = w.base or StoredProfile(w.profile, 0, doc_id=ObjectId())
    new_ids = b"".join(bytes.fromhex(m) for m in w.message_ids)
    return StoredProfile(
        profile=w.profile,
        version=base.version + 1,
        recent_ids=(base.recent_ids + new_ids)[-RECENT_IDS * ID_BYTES:],
        recent_writes=(base.recent_writes + token)[-RECENT_WRITES * TOKEN_BYTES:],
        doc_id=base.doc_id,
        event_count=base.event_count + sum(w.counts.values()),
        erased_at=base.erased_at if w.base else w.erased_at,
        basis=w.basis,
    )


def stored_basis(doc: dict, adopted: bool) -> Basis | None:
    """A profile document's item map; None when it has none that describes its vector: none stored, unreadable,
    or the vector was rewritten by another writer since (adopted)."""
    raw = doc.get("basis")
    if adopted or raw is None:
        return None
    try:
        return decode_basis(bytes(raw) if isinstance(raw, bytes) else raw)
    except UnreadableBasis:
        return None


def _timeouts(url: str, timeout_ms: int) -> dict[str, int]:
    """The client timeouts ``url`` does not set itself: an option in MONGODB_URL is the operator's and wins."""
    query = url.partition("?")[2].lower()
    given = {part.partition("=")[0] for part in query.replace(";", "&").split("&")}
    defaults = {"serverSelectionTimeoutMS": timeout_ms, "connectTimeoutMS": timeout_ms,
                "socketTimeoutMS": max(timeout_ms, 30_000)}
    return {k: v for k, v in defaults.items() if k.lower() not in given}


class Store:
    def __init__(self, url: str, db: str, *, timeout_ms: int = 5000, failed_retention_days: int = 0):
        self.client: MongoClient = MongoClient(
            url,
            tz_aware=True,
            # What no document can break a read with (pymongo raises InvalidBSON, mid-cursor, for the whole batch):
            # a date outside years 1..9999 is read as the nearest one (profiles: as DatetimeMS, refused by the
            # profile parser with that reason), a string that is not UTF-8 with replacement characters.
            datetime_conversion=DatetimeConversion.DATETIME_CLAMP,
            unicode_decode_error_handler="replace",
            appname="myshop-ops",
            **_timeouts(url, timeout_ms),
        )
        self.db = self.client[db]
        self.users = self.db.get_collection(USERS, codec_options=_codec(self.client, DatetimeConversion.DATETIME_AUTO))
        # profiles as read for the fold: raw, so the shop layout's array of doubles is read without Python floats
        self._raw_users = self.users.with_options(
            codec_options=self.users.codec_options.with_options(document_class=RawBSONDocument))
        self.products = self.db[PRODUCTS]
        self._raw_products = self.products.with_options(
            codec_options=self.products.codec_options.with_options(document_class=RawBSONDocument))
        self.failed = self.db[FAILED]
        self.erasures = self.db[ERASURES]
        self.failed_retention = timedelta(days=failed_retention_days) if failed_retention_days else None

    @classmethod
    def from_settings(cls, s: Settings, **kw) -> Store:
        return cls(s.mongodb_url, s.mongodb_db, failed_retention_days=s.failed_retention_days, **kw)

    def view(self, suffix: str) -> Store:
        """This store on the profiles and products of ``suffix`` (NEXT, PREV: a model migration's shadow collections),
        on the same connection; failed records and erasures are the deployment's."""
        other = copy.copy(self)
        other.users = self.db.get_collection(USERS + suffix, codec_options=self.users.codec_options)
        other._raw_users = other.users.with_options(codec_options=self._raw_users.codec_options)
        other.products = self.db[PRODUCTS + suffix]
        other._raw_products = other.products.with_options(codec_options=self._raw_products.codec_options)
        return other

    # ---- the model migration ------------------------------------------------------------------

    def migration(self) -> dict | None:
        """The model migration document, as stored (None: no migration)."""
        return self.db[MIGRATIONS].find_one({"_id": "model"})

    def put_migration(self, doc: dict, expect_state: str | None) -> bool:
        """Create the migration document (``expect_state`` None) or replace it while its state is ``expect_state``;
        False when another run changed it first."""
        coll = self.db[MIGRATIONS]
        if expect_state is None:
            try:
                coll.insert_one({"_id": "model", **doc})
            except DuplicateKeyError:
                return False
            return True
        return coll.replace_one({"_id": "model", "state": expect_state}, doc).matched_count == 1

    def update_migration(self, fields: dict) -> None:
        self.db[MIGRATIONS].update_one({"_id": "model"}, {"$set": fields})

    def delete_migration(self) -> None:
        self.db[MIGRATIONS].delete_one({"_id": "model"})

    def count_profiles(self) -> int:
        return self.users.estimated_document_count()

    def count_products(self) -> int:
        return self.products.estimated_document_count()

    def collections(self) -> set[str]:
        return set(self.db.list_collection_names())

    def rename(self, source: str, target: str, *, drop_target: bool = False) -> None:
        """Rename a collection of this database, atomically for readers (``renameCollection``; with ``drop_target``
        it replaces ``target`` in the same step: a reader finds the old collection or the new one, never none).
        MongoDB runs it on the admin database, the Mongo-wire test server only on the database itself: both are
        tried."""
        spec = {"to": f"{self.db.name}.{target}", "dropTarget": drop_target}
        try:
            self.client.admin.command("renameCollection", f"{self.db.name}.{source}", **spec)
        except OperationFailure as exc:
            if "current database" not in str(exc):
                raise
            self.db.command("renameCollection", f"{self.db.name}.{source}", **spec)

    def copy_collection(self, source: str, target: str) -> None:
        """Make ``target`` a copy of ``source`` (USERS or PRODUCTS) with its required indexes, on the server
        (``$merge``; the Mongo-wire test server has no ``$out``). Not atomic: for a collection no reader uses."""
        self.db.drop_collection(target)
        for name, keys, opts in INDEXES[source]:
            self.db[target].create_index(keys, name=name, **opts)
        self.db[source].aggregate([{"$merge": {"into": target, "whenMatched": "replace",
                                               "whenNotMatched": "insert"}}])

    def delete_profiles(self, user_ids: Sequence[str]) -> None:
        """Delete these users' documents here (a migration's shadows found wrong: the next catch-up rebuilds them)."""
        self.users.delete_many({"user_id": {"$in": list(user_ids)}})

    def drop(self, name: str) -> None:
        self.db.drop_collection(name)

    def profile_versions(self, after: str | None, limit: int) -> list[dict]:
        """``user_id``, ``_id``, ``version`` of up to ``limit`` profiles by user id, after ``after``."""
        query = {} if after is None else {"user_id": {"$gt": after}}
        return list(self.users.find(query, {"user_id": 1, "version": 1}, batch_size=SCAN_BATCH)
                    .sort("user_id", 1).limit(limit))

    def source_docs(self, user_ids: Sequence[str]) -> list[dict]:
        """The profile documents of these users without their vectors (what a shadow copies besides its vector)."""
        return list(self.users.find({"user_id": {"$in": list(user_ids)}}, {"vector": 0, "embedding": 0},
                                    batch_size=SCAN_BATCH))

    def put_shadows(self, docs: Sequence[dict], stale: Sequence[tuple[str, ObjectId]]) -> int:
        """Write shadow profiles (complete documents, ``_id`` and ``version`` those of the profile they mirror) where
        the stored one is older; first delete ``stale`` (user id, _id: a shadow of a document that is gone). Returns
        the documents written."""
        if stale:
            self.users.bulk_write([DeleteOne({"user_id": u, "_id": i}) for u, i in stale], ordered=False)
        ops = [ReplaceOne({"user_id": d["user_id"], "_id": d["_id"], "version": {"$lt": d["version"]}}, encoded(d),
                          upsert=True) for d in docs]
        written = 0
        for start in range(0, len(ops), PROFILE_WRITE_BATCH):
            try:
                res = self.users.bulk_write(ops[start:start + PROFILE_WRITE_BATCH], ordered=False)
                written += res.upserted_count + res.modified_count
            except BulkWriteError as exc:  # a duplicate key: the shadow is as new or newer already
                other = [e for e in exc.details.get("writeErrors", []) if e.get("code") != 11000]
                if other:
                    raise OperationFailure(f"shadow write failed: {other[0].get('errmsg')}", other[0].get("code")
                                           ) from exc
                written += exc.details.get("nUpserted", 0) + exc.details.get("nModified", 0)
        return written

    def shadow_versions(self, user_ids: Sequence[str]) -> dict[str, tuple[ObjectId, int]]:
        """(_id, version) of the documents of these users, by user id."""
        return {d["user_id"]: (d["_id"], d.get("version")) for d in self.users.find(
            {"user_id": {"$in": list(user_ids)}}, {"user_id": 1, "version": 1}, batch_size=SCAN_BATCH)}

    def orphans(self, primary: Store, limit: int = SCAN_BATCH) -> list[tuple[str, ObjectId]]:
        """(user id, _id) of documents here whose user has no document in ``primary`` (erased meanwhile)."""
        out: list[tuple[str, ObjectId]] = []
        after = None
        while True:
            chunk = self.profile_versions(after, limit)
            if not chunk:
                return out
            after = chunk[-1]["user_id"]
            alive = set(primary.shadow_versions([d["user_id"] for d in chunk]))
            out += [(d["user_id"], d["_id"]) for d in chunk if d["user_id"] not in alive]

    def ping(self) -> None:
        """Raises pymongo's ConnectionFailure when MongoDB cannot be reached."""
        self.client.admin.command("ping")

    def close(self) -> None:
        self.client.close()

    def setup_indexes(self) -> list[tuple[str, str, str]]:
        """Create the required indexes; returns (collection, index, "created" | "existing" | "existing as NAME").

        An index with the same key and options under another name (the shop's ``idx_user_id``) satisfies the
        requirement: MongoDB refuses a second index on the same key, so none is created beside it."""
        out = []
        for coll_name, specs in INDEXES.items():
            coll = self.db[coll_name]
            existing = coll.index_information()
            for name, keys, opts in OBSOLETE.get(coll_name, []):
                if (found := satisfying_index(existing, keys, opts, name)) is not None:
                    coll.drop_index(found)
                    out.append((coll_name, found, "dropped (obsolete)"))
                    existing = coll.index_information()
            for name, keys, opts in specs:
                found = satisfying_index(existing, keys, opts, name)
                if found is not None:
                    out.append((coll_name, name, "existing" if found == name else f"existing as {found}"))
                    continue
                try:
                    coll.create_index(keys, name=name, **opts)
                except OperationFailure as exc:  # the data or an index refuses it: say why, go on with the others
                    out.append((coll_name, name, "failed: " + _index_refusal(coll_name, name, keys, exc)))
                else:
                    out.append((coll_name, name, "created"))
        return out

    def index_shadows(self, suffix: str) -> None:
        """Create the profiles' and products' required indexes on the collections of ``suffix`` (a migration's)."""
        for base in (USERS, PRODUCTS):
            for name, keys, opts in INDEXES[base]:
                self.db[base + suffix].create_index(keys, name=name, **opts)

    def missing_indexes(self) -> list[tuple[str, str]]:
        """Required indexes that no existing index satisfies (same key and options, whatever its name)."""
        missing = []
        for coll_name, specs in INDEXES.items():
            info = self.db[coll_name].index_information()
            missing += [(coll_name, name) for name, keys, opts in specs if satisfying_index(info, keys, opts) is None]
        return missing

    def foreign_indexes(self) -> list[tuple[str, str, str | None]]:
        """Indexes myshop did not name: (collection, index, the required index it serves or None)."""
        out = []
        for coll_name, specs in INDEXES.items():
            info = self.db[coll_name].index_information()
            ours = {name for name, _, _ in specs}
            others = {n: i for n, i in info.items() if n not in ours and n != "_id_"}
            serves = {satisfying_index(others, keys, opts): name for name, keys, opts in specs}
            out += [(coll_name, n, serves.get(n)) for n in others]
        return out

    def data_report(self, dimensions: int) -> dict[str, int]:
        """What the collections hold, by shape (`myshop preflight`): profiles per layout, the shop's products."""
        count = self.users.count_documents
        written_with = {"$expr": {"$eq": ["$myshop_version", "$version"]}}
        products = self.products.count_documents
        return {
            "profiles_shop_layout": count({"vector": {"$exists": True}, **written_with}),
            "profiles_to_adopt": count({"vector": {"$exists": True}, "$nor": [written_with]}),
            "profiles_compact": count({"vector": {"$exists": False}, "embedding": {"$exists": True}}),
            "profiles_without_vector": count({"vector": {"$exists": False}, "embedding": {"$exists": False}}),
            "products_untagged": products({"model": None}),
            "products_untagged_usable": products({"model": None, "embedding": {"$size": dimensions}}),
            "products_without_product_id": products({"product_id": {"$exists": False}}),
        }

    # ---- profiles -------------------------------------------------------------------------------

    def load_profiles(
        self, user_ids: Iterable[str], model: str, dimensions: int
    ) -> tuple[dict[str, StoredProfile], dict[str, ValueError]]:
        """(profiles by user id, users whose document cannot be folded into -> why: UnreadableProfile or
        VectorSpaceMismatch), in any stored layout."""
        ids = list(user_ids)
        profiles: dict[str, StoredProfile] = {}
        unreadable: dict[str, ValueError] = {}
        if not ids:
            return profiles, unreadable
        cursor = self._raw_users.find(
            {"user_id": {"$in": ids}},
            {"user_id": 1, "vector": 1, "embedding": 1, "magnitude": 1, "last_updated": 1, "model": 1,
             "dimensions": 1, "version": 1, "myshop_version": 1, "event_count": 1, "event_counts": 1,
             "purchased_product_ids": 1, "recent_message_ids": 1, "recent_writes": 1, "_id": 1, "erased_at": 1,
             "basis": 1},
            batch_size=VECTOR_READ_BATCH,
        )
        for raw in cursor:
            # a shop-layout vector of the configured length as a float64 ndarray (read_profile takes it as the list)
            doc = decode_with_doubles(bytes(raw.raw), SHOP_VECTOR, dimensions, self.users.codec_options)
            user_id = doc["user_id"]
            try:
                read = read_profile(doc, model, dimensions)
            except (UnreadableProfile, VectorSpaceMismatch) as exc:
                unreadable[user_id] = type(exc)(f"the profile of user {user_id} cannot be folded into: {exc}")
                continue
            profiles[user_id] = StoredProfile(
                profile=read.profile,
                version=read.version,
                recent_ids=pack_ring(doc.get("recent_message_ids"), ID_BYTES),
                recent_writes=pack_ring(doc.get("recent_writes"), TOKEN_BYTES),
                doc_id=doc["_id"],
                adopted=read.adopted,
                event_count=read.event_count,
                event_counts=read.event_counts,
                erased_at=to_datetime(doc.get("erased_at")),
                basis=stored_basis(doc, read.adopted),
            )
        return profiles, unreadable

    def write_profiles(self, writes: Sequence[ProfileWrite], layout: str = "shop") -> WriteResult:
        """Conditional inserts/updates in unordered bulk_writes of PROFILE_WRITE_BATCH, vectors in ``layout``
        (layout.py).

        A write is ``applied`` when it landed, ``conflicted`` when another writer got there first
        (duplicate key on insert, version or document changed on update); conflicted users must be re-read.
        Other errors (connection, server) raise.
        """
        result = WriteResult()
        if not writes:
            return result
        now = datetime.now(UTC)
        tokens = [os.urandom(TOKEN_BYTES) for _ in writes]
        after = [written(w, t) for w, t in zip(writes, tokens, strict=True)]
        ops = [self._op(w, a, now, layout) for w, a in zip(writes, after, strict=True)]
        failed_idx: set[int] = set()
        matched = 0
        for start in range(0, len(ops), PROFILE_WRITE_BATCH):
            n, failed = self._bulk(ops[start:start + PROFILE_WRITE_BATCH])
            matched += n
            failed_idx.update(start + i for i in failed)
        updates = [i for i, w in enumerate(writes) if w.base is not None and i not in failed_idx]
        if matched < len(writes) - len(failed_idx):
            # Some version-filtered updates matched nothing: an unordered bulk does not say which, so look for
            # each write's token (one per write, so other workers' big batches cannot push it out of the window).
            landed = {
                d["user_id"]: pack_ring(d.get("recent_writes"), TOKEN_BYTES)
                for d in self.users.find(
                    {"user_id": {"$in": [writes[i].user_id for i in updates]}},
                    {"user_id": 1, "recent_writes": 1, "_id": 0},
                    batch_size=SCAN_BATCH,
                )
            }
            failed_idx.update(i for i in updates if not ring_has(landed.get(writes[i].user_id, b""), tokens[i]))
        for i, w in enumerate(writes):
            if i in failed_idx:
                result.conflicted.append(w.user_id)
            else:
                result.applied.append(w.user_id)
                result.stored[w.user_id] = after[i]
        return result

    def _bulk(self, ops: list[InsertOne | UpdateOne]) -> tuple[int, set[int]]:
        """One unordered bulk_write: (documents matched or inserted, indexes of the inserts that met a duplicate key).
        Other write errors raise OperationFailure, connection errors as pymongo raises them."""
        try:
            res = self.users.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            other = [e for e in errors if e.get("code") != 11000]
            if other:
                raise OperationFailure(f"profile write failed: {other[0].get('errmsg')}", other[0].get("code")) from exc
            return exc.details.get("nMatched", 0) + exc.details.get("nInserted", 0), {e["index"] for e in errors}
        return res.matched_count + res.inserted_count, set()

    @staticmethod
    def _op(w: ProfileWrite, after: StoredProfile, now: datetime, layout: str) -> InsertOne | UpdateOne:
        p = w.profile
        fields, unset = profile_fields(p, layout, after.version)
        fields.update(
            last_updated=from_days(p.last_updated),
            updated_at=now,
            recent_message_ids=Binary(after.recent_ids),
            recent_writes=Binary(after.recent_writes),
        )
        if w.basis is not None:
            fields["basis"] = Binary(encode_basis(w.basis))
        if w.base is not None and w.base.adopted:
            # what verify recomputes the profile from: the prior itself, and what was counted before it
            fields["adopted"] = adoption_record(w.base.profile, w.base.version, w.base.event_count,
                                                w.base.event_counts)
        if w.last_event_id is not None:
            fields.update(last_event_type=w.last_event_type, last_event_id=w.last_event_id)
        if w.base is None:
            return InsertOne(encoded(
                {
                    "_id": after.doc_id,
                    "user_id": w.user_id,
                    **fields,
                    "version": 1,
                    "event_count": sum(w.counts.values()),
                    "event_counts": dict(w.counts),
                    "purchased_product_ids": sorted(set(w.purchased)),
                    "created_at": now,
                    **({"erased_at": w.erased_at} if w.erased_at else {}),
                }
            ))
        inc = {"version": 1, "event_count": sum(w.counts.values())}
        inc.update({f"event_counts.{t}": n for t, n in w.counts.items()})
        update = {"$set": encoded(fields), "$unset": unset, "$inc": inc}
        if w.purchased:
            update["$addToSet"] = {"purchased_product_ids": {"$each": sorted(set(w.purchased))}}
        return UpdateOne({"user_id": w.user_id, "version": w.base.version, "_id": w.base.doc_id}, update)

    @property
    def db_name(self) -> str:
        return self.db.name

    def get_profile_doc(self, user_id: str, *, rings: bool = True) -> dict | None:
        """The user's profile document as stored; without ``rings``, without its id rings' message ids."""
        return self.users.find_one({"user_id": user_id}, {"_id": 0} if rings else {"_id": 0, "recent_message_ids": 0})

    def profile_docs(self, user_ids: Sequence[str]) -> dict[str, dict]:
        """The profile documents of these users by user id (one ``$in``), without their id rings."""
        return {d["user_id"]: d for d in self.users.find({"user_id": {"$in": list(user_ids)}},
                                                         {"recent_message_ids": 0, "recent_writes": 0, "_id": 0},
                                                         batch_size=SCAN_BATCH)}

    def profile_progress(self, user_ids: Sequence[str]) -> list[dict]:
        """``user_id``, ``event_count``, ``updated_at`` of these users' profiles (one ``$in``)."""
        return list(self.users.find({"user_id": {"$in": list(user_ids)}},
                                    {"user_id": 1, "event_count": 1, "updated_at": 1, "_id": 0}, batch_size=SCAN_BATCH))

    def profile_event_count(self, user_id: str) -> int | None:
        """The events counted in the user's profile; None without a profile."""
        doc = self.users.find_one({"user_id": user_id}, {"_id": 0, "event_count": 1})
        return None if doc is None else doc.get("event_count", 0)

    def delete_profile(self, user_id: str) -> dict | None:
        """Delete the user's profile (and its copies under another model, during a model migration); returns its
        version and event_count (None: there was none)."""
        for suffix in (NEXT, PREV):
            self.db[USERS + suffix].delete_many({"user_id": user_id})
        return self.users.find_one_and_delete({"user_id": user_id}, {"_id": 0, "version": 1, "event_count": 1})

    def delete_profile_doc(self, user_id: str, doc_id: ObjectId) -> bool:
        """Delete the profile document ``doc_id`` of the user, whatever its version (a document created while the
        user was being erased); False: it is gone already."""
        return self.users.delete_one({"user_id": user_id, "_id": doc_id}).deleted_count == 1

    # ---- erasure records --------------------------------------------------------------------------

    def record_erasure(self, user_id: str, at: datetime) -> datetime:
        """Record the user's erasure at ``at`` (a later one already recorded stays), kept FAILED_RETENTION_DAYS
        after it (none: until removed); returns the erasure time recorded. Written before the profile is deleted."""
        later = {"erased_at": at, **({"expires_at": at + self.failed_retention} if self.failed_retention else {})}
        update: dict = {"$max": later}
        if not self.failed_retention:
            update["$unset"] = {"expires_at": ""}
        doc = self.erasures.find_one_and_update({"_id": erasure_key(user_id)}, update, {"erased_at": 1},
                                                upsert=True, return_document=ReturnDocument.AFTER)
        recorded = erasure_time((doc or {}).get("erased_at"))
        if recorded is None:  # not a time myshop wrote (a type $max keeps, a forged future): this erasure replaces it
            update["$set"] = update.pop("$max")
            self.erasures.update_one({"_id": erasure_key(user_id)}, update)
            recorded = at.replace(microsecond=at.microsecond // 1000 * 1000)  # as stored: milliseconds
        return recorded

    def erasure_times(self, user_ids: Iterable[str]) -> tuple[dict[str, datetime], dict[str, ValueError]]:
        """(the erasure time of each of these users that has an erasure record, users whose record has no readable
        time -> why), in one ``$in``."""
        keys = {erasure_key(u): u for u in user_ids}
        times: dict[str, datetime] = {}
        unreadable: dict[str, ValueError] = {}
        if not keys:
            return times, unreadable
        for doc in self.erasures.find({"_id": {"$in": list(keys)}}, {"erased_at": 1}, batch_size=SCAN_BATCH):
            key = doc.get("_id")
            user_id = keys.get(key) if isinstance(key, str) else None
            if user_id is None:
                continue
            when = erasure_time(doc.get("erased_at"))
            if when is None:
                unreadable[user_id] = ValueError(f"the erasure record of user {user_id} has no readable erased_at")
            else:
                times[user_id] = when
        return times, unreadable

    # ---- products -------------------------------------------------------------------------------

    def product_vectors(
        self, product_ids: Iterable[str], model: str, dimensions: int
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """(usable vectors by product id, ids whose stored vector is unusable -> what it is instead).

        Documents are found by ``product_id``, then (for ids still missing) by ``productId``, the field the shop's
        sync upserts by; a decimal id also finds the integer (``"42"`` finds ``42``), and the other way round."""
        wanted = set(product_ids)
        vectors: dict[str, np.ndarray] = {}
        foreign: dict[str, str] = {}
        for key in ("product_id", "productId"):
            missing = sorted(wanted - vectors.keys() - foreign.keys())
            if not missing:
                break
            cursor = self._raw_products.find(
                {key: {"$in": id_forms(missing)}},
                {key: 1, "embedding": 1, "model": 1, "dimensions": 1, "_id": 0},
                batch_size=VECTOR_READ_BATCH,
            )
            for raw in cursor:  # a shop-layout embedding read as the profiles' vector is (load_profiles)
                doc = decode_with_doubles(bytes(raw.raw), "embedding", dimensions, self.products.codec_options)
                pid = id_key(doc.get(key))
                if pid not in wanted or pid in vectors:
                    continue
                try:
                    vectors[pid] = product_vector(doc, model, dimensions)
                    foreign.pop(pid, None)
                except ForeignVector as exc:
                    foreign[pid] = str(exc)
        return vectors, foreign

    def products_by_id(self, product_ids: Sequence[str], fields: Sequence[str]) -> dict[str, dict]:
        """The stored product documents of these product ids (``product_id`` and ``fields``), by product id."""
        return {d["product_id"]: d for d in self.products.find(
            {"product_id": {"$in": list(product_ids)}}, {"_id": 0, "product_id": 1, **dict.fromkeys(fields, 1)},
            batch_size=SCAN_BATCH)}

    def update_products(self, fields_by_id: dict[str, dict]) -> None:
        """Set these fields (and updated_at) on the products, vectors untouched."""
        if fields_by_id:
            now = datetime.now(UTC)
            self.products.bulk_write([UpdateOne({"product_id": pid}, {"$set": {**fields, "updated_at": now}})
                                      for pid, fields in fields_by_id.items()], ordered=False)

    def count_product_vectors(self, model: str, dimensions: int) -> int:
        """Products whose vector is tagged with this model and dimensions."""
        return self.products.count_documents({"model": model, "dimensions": dimensions})

    def tagged_product_ids(self, model: str, dimensions: int, limit: int) -> list[object]:
        """Up to ``limit`` product ids of products tagged with this model and dimensions, as stored."""
        cursor = self.products.find({"model": model, "dimensions": dimensions}, {"product_id": 1, "_id": 0},
                                    batch_size=SCAN_BATCH).limit(limit)
        return [d["product_id"] for d in cursor if d.get("product_id") is not None]

    def products_signature(self) -> tuple[int, datetime | None, str | None]:
        """What changes whenever a product is written or removed: the document count and the newest updated_at of
        each type it is written as (a date by myshop, an ISO 8601 string by the shop's sync). One sort over both
        would miss the shop's writes: MongoDB orders every date above every string. A time more than a day ahead
        (a bad document) is passed over: it would stay the newest and hide every later write."""
        ahead = datetime.now(UTC) + timedelta(days=1)
        newest = [self.products.find_one({"updated_at": {"$type": kind, "$lte": bound}}, {"_id": 0, "updated_at": 1},
                                         sort=[("updated_at", -1)])
                  for kind, bound in (("date", ahead), ("string", ahead.isoformat()))]
        date, text = ((doc or {}).get("updated_at") for doc in newest)
        return self.products.estimated_document_count(), date, text

    def space_products(self, model: str, dimensions: int, fields: dict) -> Iterator[dict]:
        """The products of a vector space (``in_space``), with ``fields``, streamed."""
        return iter(self.products.find(in_space(model, dimensions), fields, batch_size=SCAN_BATCH))

    def newest_products(self, model: str, dimensions: int, fields: dict, limit: int) -> list[dict]:
        """The ``limit`` most recently updated products of a vector space (ties by product id), then those without
        a time. updated_at is a date when myshop wrote it and an ISO 8601 string when the shop's sync did: each
        kind is read newest first and the two merged by time (MongoDB orders every date above every string)."""
        space = in_space(model, dimensions)

        def newest(when: dict) -> list[dict]:
            return list(self.products.find({**space, "updated_at": when}, {**fields, "updated_at": 1},
                                           batch_size=SCAN_BATCH).sort([("updated_at", -1), ("product_id", 1)])
                        .limit(limit))

        timed = newest({"$type": "date"}) + newest({"$type": "string"})
        timed.sort(key=lambda d: (-_epoch(d["updated_at"]), str(d.get("product_id"))))
        if len(timed) < limit:
            timed += newest({"$not": {"$type": ["date", "string"]}})
        return [{k: v for k, v in d.items() if k in fields} for d in timed[:limit]]

    def vector_search(self, pipeline: list[dict]) -> list[dict]:
        """Run an Atlas ``$vectorSearch`` aggregation on the products (raises OperationFailure)."""
        return list(self.products.aggregate(pipeline))

    def has_tagged_products(self, model: str, dimensions: int, excluding: Sequence[str] = ()) -> bool:
        """Whether a product tagged with this model and dimensions exists, besides ``excluding``."""
        query = {"model": model, "dimensions": dimensions, "product_id": {"$nin": list(excluding)}}
        return self.products.find_one(query, {"_id": 1}) is not None

    def upsert_products(self, docs: Sequence[dict], layout: str = "shop") -> int:
        """Upsert product documents by product_id, vectors stored in ``layout`` (layout.py)."""
        if not docs:
            return 0
        now = datetime.now(UTC)
        ops = [
            UpdateOne(
                {"product_id": d["product_id"]},
                {"$set": {**d, **product_fields(d["product_id"], d["embedding"], layout), "updated_at": now}},
                upsert=True,
            )
            for d in docs
        ]
        written = 0
        for i in range(0, len(ops), PRODUCT_WRITE_BATCH):
            res = self.products.bulk_write(ops[i:i + PRODUCT_WRITE_BATCH], ordered=False)
            written += res.upserted_count + res.modified_count
        return written

    # ---- failed messages ------------------------------------------------------------------------

    def record_failures(self, records: Sequence[dict]) -> None:
        """Upsert failed-message records by failure_id, or by message_id for a record without one (the first
        failure time is kept; with a retention, the record expires that long after its last failure)."""
        if not records:
            return
        keep = self.failed_retention
        ops = [
            UpdateOne(
                {"failure_id": r["failure_id"]} if r.get("failure_id") else
                {"message_id": r["message_id"], "failure_id": {"$exists": False}},
                {"$set": {**{k: v for k, v in r.items() if k != "first_failure_at"},
                          **({"expires_at": r["last_failure_at"] + keep} if keep else {})},
                 "$setOnInsert": {"first_failure_at": r["first_failure_at"]}},
                upsert=True,
            )
            for r in records
        ]
        self.failed.bulk_write(ops, ordered=False)

    def count_failures(self, user_id: str | None = None) -> int:
        """Failed-message records (of one user)."""
        return self.failed.count_documents({} if user_id is None else {"user_id": user_id})

    def failure_keys(self) -> list[dict]:
        """``message_id`` and ``failure_id`` of every failed-message record."""
        return list(self.failed.find({}, {"message_id": 1, "failure_id": 1, "_id": 0}, batch_size=SCAN_BATCH))

    def failure_owners(self, message_ids: Sequence[str]) -> list[tuple[str, str | None]]:
        """(message id, user id: None when it is not text) of the records of these message ids (one ``$in``); a
        record whose message_id is not one of them as text (an array holding one matches ``$in`` too) is left out."""
        wanted = set(message_ids)
        docs = self.failed.find({"message_id": {"$in": list(wanted)}}, {"message_id": 1, "user_id": 1, "_id": 0},
                                batch_size=SCAN_BATCH)
        return [(m, u if isinstance(u := d.get("user_id"), str) else None) for d in docs
                if isinstance(m := d.get("message_id"), str) and m in wanted]

    def search_failures(self, *, text: str | None = None, since: datetime | None = None, limit: int = 50
                        ) -> list[dict]:
        """Records newest first: ``text`` in the error, class, user or message id (case-insensitive), failed last
        at ``since`` or later."""
        query: dict = {}
        if text:
            rx = {"$regex": re.escape(text), "$options": "i"}
            query["$or"] = [{"error_message": rx}, {"error_class": rx}, {"user_id": rx}, {"message_id": rx}]
        if since:
            query["last_failure_at"] = {"$gte": since}
        return list(self.failed.find(query, batch_size=SCAN_BATCH).sort("last_failure_at", -1).limit(limit))

    def failures_named(self, ident: str) -> list[dict]:
        """The records a failure id or a message id names (a message id: every failed copy of it), newest first."""
        query = {"$or": [{"failure_id": ident}, {"message_id": ident}]}
        return list(self.failed.find(query).sort("last_failure_at", -1).limit(100))

    def failures_by_class(self) -> list[tuple[object, int]]:
        """(error class as stored: any value, records), most first."""
        rows = self.failed.aggregate([{"$group": {"_id": "$error_class", "n": {"$sum": 1}}}, {"$sort": {"n": -1}}])
        return [(r.get("_id"), r.get("n") if isinstance(r.get("n"), int) else 0) for r in rows]

    def delete_failures(self, keys: Iterable[str] | None = None) -> int:
        """Delete the records of these keys (failure ids, or message ids of records without one); None: all."""
        if keys is None:
            return self.failed.delete_many({}).deleted_count
        keys = list(keys)
        return self.failed.delete_many({"$or": [{"failure_id": {"$in": keys}},
                                                {"message_id": {"$in": keys}, "failure_id": {"$exists": False}}]}
                                       ).deleted_count

    def delete_failure_docs(self, doc_ids: Iterable[ObjectId]) -> int:
        """Delete these failed-message documents by ``_id`` (a record whose ids are unreadable has no usable key)."""
        doc_ids = list(doc_ids)
        return self.failed.delete_many({"_id": {"$in": doc_ids}}).deleted_count if doc_ids else 0

    def delete_user_failures(self, user_id: str) -> int:
        return self.failed.delete_many({"user_id": user_id}).deleted_count

    def delete_failures_before(self, at: datetime) -> int:
        """Delete the records whose last failure is before ``at``."""
        return self.failed.delete_many({"last_failure_at": {"$lt": at}}).deleted_count
