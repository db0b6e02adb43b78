"""Document shapes in ``user_embeddings`` and ``product_embeddings``: what myshop writes, and how any document
found there is read (the shop's PHP code writes there too, and anything read from the store may be hostile).

Two layouts for what myshop writes (``STORE_LAYOUT``):

* ``shop`` (default): the shop's field names and types, which its PHP reader takes as they are. A profile holds
  ``user_id``, ``vector`` (the unit profile as an array of doubles), ``dimension_count``, ``last_updated``
  (UTC datetime), ``version``, ``updated_at``, ``created_at``; an imported product holds ``product_id`` and
  ``productId`` (strings) and ``embedding`` as an array of doubles.
* ``compact``: the vector as one BSON Binary float32 vector (subtype 9) in ``embedding``: ~3.5x smaller and
  cheaper to write, but only myshop reads it. For deployments whose readers are all myshop.

Either way myshop's bookkeeping sits beside the shop's fields under names the shop never reads or writes
(``magnitude``, ``model``, ``dimensions``, ``myshop_version``, counts, the id rings), so the shop's own
``$set`` leaves it alone. Both layouts are always read.

Adoption: a profile whose ``magnitude`` myshop did not write together with its vector (written by the shop's
PHP workers, or rewritten by them since: ``myshop_version`` != ``version``) is taken as the prior
S = 1 * vector at T = last_updated: the stored unit vector counts as one event of weight 1 at its
``last_updated``. That is the shop's own update rule (normalize(decay(days) * vector + w * event)), so the
first event folded into it moves the profile as the shop would have, and the exact math goes on from there.
myshop's first write of an adopted profile records that prior in an ``adopted`` sub-document (``adoption_record``:
its unit vector as a BSON float32 vector, its magnitude and time, the version and counts it was read with; the
shop reads no such field), so ``myshop verify`` can recompute the profile as fold(prior, events since).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from bson import DatetimeMS
from bson.binary import Binary, BinaryVectorDtype

from myshop_ops.base.contract import EVENT_TYPES
from myshop_ops.base.profile import Profile, VectorSpaceMismatch, from_days, to_days
from myshop_ops.base.rawbson import double_array

LAYOUTS = ("shop", "compact")
SHOP_VECTOR, COMPACT_VECTOR = "vector", "embedding"
MAX_INT64 = 2**63 - 1
MAX_VERSION = MAX_INT64 - 1  # a readable profile's next version (version + 1) must be readable too
MAX_COUNT = 2**62  # a counter beyond this could overflow int64 on $inc (MongoDB refuses the whole write)
MAX_MAGNITUDE = 1e12  # |S| is at most the sum of all event weights (each <= 100): ten billion events of one user
FUTURE_LAST_UPDATED = timedelta(days=1)  # a profile's time is its newest event's: a little clock skew at most
_FLOAT32_VECTOR = BinaryVectorDtype.FLOAT32.value + b"\x00"  # BSON vector header: dtype 0x27, padding 0
_NUMBER = (int, float)
# The lengths a stored vector may have: embeddings are unit vectors (some self-hosted models' are not: tens);
# outside this range it is dust or a forged scale
NORM_RANGE = (1e-6, 1e6)
UNIT_TOLERANCE = 1e-5  # how far from 1 a float32 unit vector's length may be (rounding of d elements)


class UnreadableProfile(ValueError):
    """A profile document myshop cannot fold into: the message fails with this reason, the worker goes on."""


class ForeignVector(ValueError):
    """A stored vector that is not the configured vector space's, or not a vector at all; ``str()`` says what."""


def encode_vector(vec: np.ndarray) -> Binary:
    """A float32 vector as BSON Binary subtype 9 (FLOAT32): what ``Binary.from_vector`` makes, built directly (cheaper:
    docs/PERFORMANCE.md)."""
    return Binary(_FLOAT32_VECTOR + np.asarray(vec, dtype="<f4").tobytes(), 9)


def decode_vector(value: object) -> np.ndarray:
    """A stored vector as a 1-d float32 array: a BSON float32 vector (Binary subtype 9), raw little-endian float32
    bytes (Binary subtype 0), an array of numbers, or such an array's doubles read raw (a float64 ndarray from
    rawbson.read_double_array). ForeignVector (what it is instead, never its content) for anything else; never
    another exception, whatever the value."""
    if isinstance(value, Binary):  # subtype 0 is decoded to bytes: every Binary here has another subtype
        if value.subtype != 9:
            raise ForeignVector(f"a BSON binary of subtype {value.subtype}, not a vector")
        if bytes(value[:2]) != _FLOAT32_VECTOR or len(value) % 4 != 2:
            raise ForeignVector("a BSON vector that is not float32, or is cut short")
        # a fresh copy of the payload, read in place (no list of Python floats: docs/PERFORMANCE.md)
        return np.frombuffer(value, "<f4", offset=2).copy()
    if isinstance(value, bytes):
        if len(value) % 4:
            raise ForeignVector("raw bytes that are not whole float32 numbers")
        return np.frombuffer(value, "<f4").copy()
    if isinstance(value, np.ndarray) and value.dtype == np.float64:
        array = value
    elif not isinstance(value, list):
        raise ForeignVector(value_kind(value) if value is None else f"a {type(value).__name__}, not an array")
    else:
        array = _number_array(value)
    if array.ndim != 1 or array.dtype.kind not in "fiu":
        raise ForeignVector("an array of arrays or mixed values, not of numbers")
    with np.errstate(over="ignore"):  # a number past float32's range becomes inf: refused as non-finite
        return array.astype(np.float32)


def _number_array(value: list) -> np.ndarray:
    try:
        return np.array(value)  # a list of numbers is a float or integer array; anything else is not
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ForeignVector("an array of arrays or mixed values, not of numbers") from None


def vector_value(vec: np.ndarray, layout: str) -> Binary | list[float]:
    """How a vector is stored in ``layout``: an array of doubles (shop) or a BSON float32 vector (compact)."""
    return encode_vector(vec) if layout == "compact" else np.asarray(vec, dtype=np.float64).tolist()


def _finite_vector(value: object) -> np.ndarray:
    """A stored vector as float32; ForeignVector ("an unreadable vector (what it is)") when it is not a non-empty
    vector of finite numbers whose length is within NORM_RANGE (zero, NaN, Inf, denormal dust or an absurd scale:
    one such product or profile would outweigh or erase every other vector it is folded or ranked with)."""
    try:
        vec = decode_vector(value)
    except ForeignVector as exc:
        raise ForeignVector(f"an unreadable vector ({exc})") from None
    norm = float(np.linalg.norm(vec.astype(np.float64))) if np.isfinite(vec).all() else math.nan
    if not NORM_RANGE[0] <= norm <= NORM_RANGE[1]:
        what = ("empty" if not len(vec) else "a NaN or infinite element" if math.isnan(norm) else
                "zero" if norm == 0.0 else f"length {norm:.3g}, outside {NORM_RANGE[0]:g}..{NORM_RANGE[1]:g}")
        raise ForeignVector(f"an unreadable vector ({what})")
    return vec


def check_space(doc: dict, vec: np.ndarray, model: str, dimensions: int) -> None:
    """Raise ForeignVector unless ``vec`` (read from ``doc``) is in the configured space. A vector without a
    ``model`` tag (the shop's sync writes none) is taken as the configured model's when its length matches."""
    tagged = doc.get("model")
    if tagged is None:
        if len(vec) != dimensions:
            raise ForeignVector(f"an untagged {len(vec)}d vector, expected {model}/{dimensions}d")
        return
    doc_dims = doc.get("dimensions", len(vec))
    if tagged != model or doc_dims != dimensions or len(vec) != dimensions:
        raise ForeignVector(f"a {str(tagged)[:60]}/{str(doc_dims)[:12]}d vector, expected {model}/{dimensions}d")


# ---- products ---------------------------------------------------------------------------------------------


def id_forms(product_ids: list[str]) -> list[str | int]:
    """The ids to look for: each string, and the integer of each decimal one (``"42"`` also finds ``42``)."""
    out: list[str | int] = list(product_ids)
    for pid in product_ids:
        if pid.isascii() and pid.isdigit() and str(int(pid)) == pid and int(pid) <= MAX_INT64:
            out.append(int(pid))
    return out


def id_key(value: object) -> str | None:
    """A stored product id as the string events carry (``42`` -> ``"42"``); None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def product_vector(doc: dict, model: str, dimensions: int) -> np.ndarray:
    """A product document's usable vector; ForeignVector (what it has instead) otherwise."""
    vec = _finite_vector(doc.get("embedding"))
    check_space(doc, vec, model, dimensions)
    return vec


def product_fields(product_id: str, vec: np.ndarray, layout: str) -> dict[str, Any]:
    """An imported product's id and vector fields. The shop layout also writes ``productId``, the field the shop's
    sync upserts by: its next sync of the product then updates this document instead of inserting another."""
    fields: dict[str, Any] = {"product_id": product_id, "embedding": vector_value(vec, layout)}
    if layout == "shop":
        fields["productId"] = product_id
    return fields


# ---- profiles ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProfileRead:
    """What a profile document holds for the fold: the math state and whether it was adopted."""

    profile: Profile
    version: int
    adopted: bool  # the stored unit vector taken as a prior (see the module docstring)
    event_count: int  # events myshop counted before this read
    event_counts: dict[str, int | float] = field(default_factory=dict)  # the same by event type


def to_datetime(value: object) -> datetime | None:
    """A stored time (BSON datetime, or an ISO-8601 string as the shop's reader also accepts) as aware UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None  # also a date past pymongo's range (DatetimeMS: the profiles' reads decode those so)
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # near year 1 or 9999 with an offset
        return None


def _number(value: object) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and math.isfinite(value)


def profile_vector(doc: dict, model: str, dimensions: int) -> tuple[str, np.ndarray]:
    """(the field, the stored vector) of a profile in either layout (``vector`` wins when both are there);
    UnreadableProfile when it is not a vector, VectorSpaceMismatch when it is another space's."""
    field = SHOP_VECTOR if SHOP_VECTOR in doc else COMPACT_VECTOR
    if field not in doc:
        raise UnreadableProfile("it has neither a vector nor an embedding")
    try:
        vec = _finite_vector(doc[field])
    except ForeignVector as exc:
        raise UnreadableProfile(f"its {field} is {exc}") from None
    try:
        check_space(doc, vec, model, dimensions)
    except ForeignVector as exc:
        raise VectorSpaceMismatch(f"its {field} is {exc}") from None
    return field, vec


def read_profile(doc: dict, model: str, dimensions: int, now: datetime | None = None) -> ProfileRead:
    """The fold's view of any profile document; UnreadableProfile (why) when it cannot be folded into,
    VectorSpaceMismatch when its vector is another space's. ``now`` (default: the clock) bounds last_updated."""
    version = doc.get("version")
    if not _number(version) or version != int(version) or not 0 <= version < MAX_INT64:
        raise UnreadableProfile(f"its version is {value_kind(version)}, not a whole number")
    if version >= (MAX_VERSION if isinstance(version, int) else 2**53):  # a double past 2^53: $inc adds nothing
        raise UnreadableProfile(f"its version is {version!r}, at the limit of its type: a write could not be counted")
    when = to_datetime(doc.get("last_updated"))
    if when is None:
        raise UnreadableProfile(f"its last_updated is {value_kind(doc.get('last_updated'))}, not a UTC time")
    if when - (now or datetime.now(UTC)) > FUTURE_LAST_UPDATED:
        # events are folded at the profile's time: from years ahead, every event would decay to nothing
        raise UnreadableProfile(f"its last_updated is {when.isoformat()}, more than a day in the future")
    field, vec = profile_vector(doc, model, dimensions)
    for name, ok in (("event_count", _count), ("event_counts", _counts), ("purchased_product_ids", _array)):
        if name in doc and not ok(doc[name]):
            raise UnreadableProfile(f"its {name} is {value_kind(doc[name])}")
    magnitude = doc.get("magnitude")
    ours = _number(magnitude) and magnitude > 0 and (field == COMPACT_VECTOR or doc.get("myshop_version") == version)
    if ours and magnitude > MAX_MAGNITUDE:  # the profile would outweigh every event folded into it: no effect
        raise UnreadableProfile(f"its magnitude is {magnitude:.3g}, more than any sum of events reaches")
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    return ProfileRead(
        profile=Profile(
            embedding=vec if ours else (vec / norm).astype(np.float32),
            magnitude=float(magnitude) if ours else 1.0,
            last_updated=to_days(when),
            model=model,
            dimensions=len(vec),
        ),
        version=int(version),
        adopted=not ours,
        event_count=int(doc.get("event_count", 0)),
        event_counts=dict(doc.get("event_counts") or {}),
    )


def profile_fields(p: Profile, layout: str, version: int) -> tuple[dict[str, Any], dict[str, str]]:
    """($set, $unset) for a profile's vector state in ``layout``; the other layout's vector fields go away. The
    shop layout's ``vector`` is a DoubleArray: encode the fields with ``rawbson.raw_document``."""
    fields: dict[str, Any] = {"magnitude": p.magnitude, "model": p.model, "dimensions": p.dimensions,
                              "myshop_version": version}
    if layout == "compact":
        fields[COMPACT_VECTOR] = encode_vector(p.embedding)
        return fields, {SHOP_VECTOR: "", "dimension_count": ""}
    fields[SHOP_VECTOR] = double_array(p.embedding)  # the array's bytes: rawbson.raw_document writes them
    fields["dimension_count"] = p.dimensions
    return fields, {COMPACT_VECTOR: ""}


@dataclass(frozen=True, slots=True)
class Adoption:
    """A profile's ``adopted`` record: what the profile was when myshop adopted it."""

    version: int  # the adopted document's version
    last_updated: float  # the prior's time T, days
    event_count: int  # events counted in the document then
    event_counts: dict[str, int | float]  # the same by event type
    prior: Profile | None  # the prior itself; None: recorded by a myshop that did not keep it


def adoption_record(prior: Profile, version: int, event_count: int, event_counts: dict) -> dict[str, Any]:
    """The ``adopted`` sub-document myshop writes with its first write of an adopted profile: the prior as read
    (its unit vector as a BSON float32 vector, bit-exact; magnitude; time) and the document's version and counts
    then (the counts of the event types only: a stored key may be one no update can write, ``$x`` or ``a.b``). A BSON
    vector whatever the layout: the shop reads no such field."""
    return {"version": version, "last_updated": from_days(prior.last_updated), "event_count": event_count,
            "event_counts": {t: event_counts[t] for t in EVENT_TYPES if t in event_counts},
            "vector": encode_vector(prior.embedding), "magnitude": prior.magnitude}


def read_adoption(record: object, model: str, dimensions: int) -> Adoption:
    """A stored ``adopted`` record; UnreadableProfile (what is wrong with it, never its content) when any field is
    not what myshop writes: the prior a finite unit vector of ``dimensions`` and a finite positive magnitude."""
    if not isinstance(record, dict):
        raise UnreadableProfile(f"it is {value_kind(record)}, not a document")
    when = to_datetime(record.get("last_updated"))
    for name, value in (("version", record.get("version")), ("event_count", record.get("event_count"))):
        if not _whole(value):
            raise UnreadableProfile(f"its {name} is {value_kind(value)}, not a whole number")
    if when is None:
        raise UnreadableProfile(f"its last_updated is {value_kind(record.get('last_updated'))}, not a UTC time")
    base = (record["version"], to_days(when), record["event_count"])
    if "vector" not in record and "magnitude" not in record:
        return Adoption(*base, {}, None)
    counts = record.get("event_counts")
    if not _counts(counts):
        raise UnreadableProfile(f"its event_counts is {value_kind(counts)}, not counts by event type")
    try:
        vec = _finite_vector(record.get("vector"))
    except ForeignVector as exc:
        raise UnreadableProfile(f"its vector is {exc}") from None
    if len(vec) != dimensions or abs(float(np.linalg.norm(vec.astype(np.float64))) - 1.0) > UNIT_TOLERANCE:
        raise UnreadableProfile(f"its vector is not a {dimensions}d unit vector")
    magnitude = record.get("magnitude")
    if not _number(magnitude) or not 0 < magnitude <= MAX_MAGNITUDE:
        raise UnreadableProfile(f"its magnitude is {value_kind(magnitude)}, not a positive sum of events")
    return Adoption(*base, dict(counts), Profile(vec, float(magnitude), base[1], model, dimensions))


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_INT64


def _count(value: object) -> bool:
    """A counter myshop can go on adding to with $inc (an integer far from the int64 limit, or a double)."""
    return _number(value) and (isinstance(value, float) or abs(value) <= MAX_COUNT)


def _counts(value: object) -> bool:
    return isinstance(value, dict) and all(_count(v) for v in value.values())


def _array(value: object) -> bool:
    return isinstance(value, list)


def value_kind(value: object) -> str:
    """A hostile value named briefly for an error message (never its content)."""
    if value is None:
        return "missing"
    if isinstance(value, DatetimeMS):
        return "a date outside years 1..9999"
    return f"a {type(value).__name__}" if not _number(value) else f"{value!r}"[:30]
