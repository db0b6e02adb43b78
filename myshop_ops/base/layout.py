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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from bson.binary import Binary, BinaryVectorDtype

from myshop_ops.base.profile import Profile, VectorSpaceMismatch, to_days

LAYOUTS = ("shop", "compact")
SHOP_VECTOR, COMPACT_VECTOR = "vector", "embedding"
MAX_INT64 = 2**63 - 1
_FLOAT32_VECTOR = BinaryVectorDtype.FLOAT32.value + b"\x00"  # BSON vector header: dtype 0x27, padding 0
_NUMBER = (int, float)


class UnreadableProfile(ValueError):
    """A profile document myshop cannot fold into: the message fails with this reason, the worker goes on."""


class ForeignVector(ValueError):
    """A stored vector that is not the configured vector space's, or not a vector at all; ``str()`` says what."""


def encode_vector(vec: np.ndarray) -> Binary:
    """A float32 vector as BSON Binary subtype 9 (FLOAT32): what ``Binary.from_vector`` makes, built directly (cheaper:
    docs/PERFORMANCE.md)."""
    return Binary(_FLOAT32_VECTOR + np.asarray(vec, dtype="<f4").tobytes(), 9)


def decode_vector(value: object) -> np.ndarray:
    """A stored vector (Binary subtype 9, raw float32 bytes, or an array of numbers) as float32."""
    if isinstance(value, Binary) and value.subtype == 9:
        # numpy view of the payload, copied: the same fresh float32 array as from the default list of Python floats,
        # without making that list (docs/PERFORMANCE.md: worker CPU per event)
        return np.array(value.as_vector(return_numpy=True).data, dtype=np.float32)
    if isinstance(value, bytes | bytearray):
        return np.frombuffer(value, "<f4")
    return np.asarray(value, dtype=np.float32)


def vector_value(vec: np.ndarray, layout: str) -> Binary | list[float]:
    """How a vector is stored in ``layout``: an array of doubles (shop) or a BSON float32 vector (compact)."""
    return encode_vector(vec) if layout == "compact" else np.asarray(vec, dtype=np.float64).tolist()


def _finite_vector(value: object) -> np.ndarray:
    """A stored vector as float32, or ForeignVector when it is not a finite, non-zero vector."""
    try:
        vec = decode_vector(value)
        ok = vec.ndim == 1 and len(vec) > 0 and bool(np.isfinite(vec).all()) and bool(vec.any())
    except (ValueError, TypeError, OverflowError):
        ok = False
    if not ok:
        raise ForeignVector("an unreadable vector (not a non-zero array of finite numbers)")
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


def to_datetime(value: object) -> datetime | None:
    """A stored time (BSON datetime, or an ISO-8601 string as the shop's reader also accepts) as aware UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


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


def read_profile(doc: dict, model: str, dimensions: int) -> ProfileRead:
    """The fold's view of any profile document; UnreadableProfile (why) when it cannot be folded into,
    VectorSpaceMismatch when its vector is another space's."""
    version = doc.get("version")
    if not _number(version) or version != int(version) or not 0 <= version < MAX_INT64:
        raise UnreadableProfile(f"its version is {_kind(version)}, not a whole number")
    when = to_datetime(doc.get("last_updated"))
    if when is None:
        raise UnreadableProfile(f"its last_updated is {_kind(doc.get('last_updated'))}, not a UTC time")
    field, vec = profile_vector(doc, model, dimensions)
    for name, ok in (("event_count", _number), ("event_counts", _counts), ("purchased_product_ids", _array)):
        if name in doc and not ok(doc[name]):
            raise UnreadableProfile(f"its {name} is {_kind(doc[name])}")
    magnitude = doc.get("magnitude")
    ours = _number(magnitude) and magnitude > 0 and (field == COMPACT_VECTOR or doc.get("myshop_version") == version)
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
    )


def profile_fields(p: Profile, layout: str, version: int) -> tuple[dict[str, Any], dict[str, str]]:
    """($set, $unset) for a profile's vector state in ``layout``; the other layout's vector fields go away."""
    fields: dict[str, Any] = {"magnitude": p.magnitude, "model": p.model, "dimensions": p.dimensions,
                              "myshop_version": version}
    if layout == "compact":
        fields[COMPACT_VECTOR] = encode_vector(p.embedding)
        return fields, {SHOP_VECTOR: "", "dimension_count": ""}
    fields[SHOP_VECTOR] = vector_value(p.embedding, layout)
    fields["dimension_count"] = p.dimensions
    return fields, {COMPACT_VECTOR: ""}


def _counts(value: object) -> bool:
    return isinstance(value, dict) and all(_number(v) for v in value.values())


def _array(value: object) -> bool:
    return isinstance(value, list)


def _kind(value: object) -> str:
    """A hostile value named briefly for an error message (never its content)."""
    if value is None:
        return "missing"
    return f"a {type(value).__name__}" if not _number(value) else f"{value!r}"[:30]
