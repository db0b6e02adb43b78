"""What built a profile, in a form no embeddings model is part of: the item map. Pure numpy, no I/O.

A profile is S(T) = sum_e w_e exp(-lambda (T - t_e)) v_e over its events. Events of the same item (a product, or a
search phrase once normalised) share a vector, so S(T) = sum_i W_i v_i with W_i the item's summed coefficient
``w_e exp(-lambda (T - t_e))``. The item map keeps (item, W_i) in the profile's own frame (decayed to its T, like S:
moving T rescales every W_i and S by the same factor, so nothing overflows however old a profile is), together with
``residual``: the mass of what the map does not hold (the lightest items dropped to keep it at ``limit`` entries, and
the prior of a profile written before the map existed). Under any model,

    S'(T) = sum_i W_i v'_i + R'        with |R'| <= residual   (unit item vectors)

so ``rebuild`` (the sum without R') is exact when residual is 0, and otherwise off by at most ``residual / |S'|``
relative (the bound ``error_bound`` reports with the profile's own magnitude).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from myshop_ops.base.profile import Profile

DEFAULT_LIMIT = 256  # items kept per profile (the heaviest; the others' mass goes to the residual)
PRODUCT, PHRASE = "p:", "s:"  # an item's kind, as the first two characters of its key
_HEADER = struct.Struct("<BHdI")  # format, entries, residual, bytes of the keys
FORMAT = 2  # 1 (weight, length and key, item after item; never deployed) is refused as another format
MAX_KEY_BYTES = 4 * 255 + 2  # a phrase of 255 characters (4 UTF-8 bytes at most each) and its kind
_KIND = tuple(ord(c) for c in PRODUCT[0] + PHRASE[0] + PRODUCT[1])  # a key's first byte (p, s), its second (:)


class UnreadableBasis(ValueError):
    """A stored item map that is not what myshop writes; ``str()`` says what (never its content)."""


@dataclass(frozen=True, slots=True)
class Basis:
    """A profile's item map: keys (``p:<product id>`` / ``s:<normalised phrase>``), their weights in the profile's
    frame (float64, the order of ``keys``), and the residual mass the map does not hold (same frame)."""

    keys: tuple[str, ...]
    weights: np.ndarray
    residual: float

    @classmethod
    def unmapped(cls, mass: float) -> Basis:
        """No item known: all of a profile's ``mass`` is residual (a profile written before the map existed)."""
        return cls((), np.zeros(0), float(mass))

    def error_bound(self, magnitude: float) -> float:
        """How far (relative to ``magnitude`` = |S|) a rebuild from the map can be from the profile: residual/|S|."""
        return self.residual / magnitude if magnitude > 0 else math.inf


def product_key(product_id: str) -> str:
    return PRODUCT + product_id


def phrase_key(normalised_phrase: str) -> str:
    return PHRASE + normalised_phrase


def fold_basis(basis: Basis | None, old_t: float | None, new_t: float, keys: list[str], times: np.ndarray,
               weights: np.ndarray, *, lam: float, limit: int = DEFAULT_LIMIT) -> Basis:
    """The map after folding events (``keys``, days, event weights) into a profile at ``old_t`` (None: no profile)
    whose new time is ``new_t`` (as ``profile.fold`` computes it): every weight and the residual rescaled to
    ``new_t``, each event's coefficient added to its item, then the ``limit`` heaviest kept (the rest's mass goes to
    the residual; ties by key, so the result does not depend on the order the events came in within one fold)."""
    scale = 1.0 if basis is None or old_t is None else math.exp(-lam * (new_t - old_t))
    merged: dict[str, float] = {}
    residual = 0.0
    if basis is not None:
        merged = dict(zip(basis.keys, (basis.weights * scale).tolist(), strict=True))
        residual = basis.residual * scale
    coeffs = np.asarray(weights, np.float64) * np.exp(-lam * (new_t - np.asarray(times, np.float64)))
    for key, c in zip(keys, coeffs.tolist(), strict=True):
        merged[key] = merged.get(key, 0.0) + c
    ordered = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))
    kept, dropped = ordered[:limit], ordered[limit:]
    residual += math.fsum(w for _, w in dropped)
    return Basis(tuple(k for k, _ in kept), np.array([w for _, w in kept], np.float64), residual)


def rebuild(basis: Basis, vectors: np.ndarray, last_updated: float, model: str) -> Profile:
    """The profile ``normalise(sum W_i v_i)`` at ``last_updated`` from the map and its items' vectors under ``model``
    (rows in the order of ``basis.keys``). ValueError when there is nothing to rebuild (no item, or a zero sum)."""
    vectors = np.asarray(vectors)
    if not basis.keys or vectors.ndim != 2 or len(vectors) != len(basis.keys):
        raise ValueError("nothing to rebuild: the item map is empty or the vectors do not match it")
    total = basis.weights @ vectors.astype(np.float64)
    magnitude = math.sqrt(float(total @ total))
    if magnitude == 0.0 or not math.isfinite(magnitude):
        raise ValueError("the rebuilt profile has no direction (zero or non-finite sum)")
    return Profile((total / magnitude).astype(np.float32), magnitude, last_updated, model, vectors.shape[1])


def encode_basis(basis: Basis) -> bytes:
    """The map as one byte string (stored as a BSON Binary: one value to write and read, not 256 array elements):
    format, count, residual, the keys' length in bytes, the weights (float64), then the keys in UTF-8 joined by NUL
    (the event contract refuses control characters in product ids and phrases, so no key holds one): each a single
    run, so both ways are a few array operations rather than one per item. ValueError for a key holding NUL."""
    keys = "\x00".join(basis.keys).encode("utf-8", "surrogatepass")
    if keys.count(0) != max(len(basis.keys) - 1, 0):
        raise ValueError("an item key holds NUL: the item map cannot store it")
    return b"".join((_HEADER.pack(FORMAT, len(basis.keys), basis.residual, len(keys)),
                     np.asarray(basis.weights, "<f8").tobytes(), keys))


def decode_basis(raw: object) -> Basis:
    """A stored map; UnreadableBasis for anything ``encode_basis`` does not write (a wrong format or length, a key
    that is not UTF-8, of no known kind or too long, a weight or residual that is negative or not finite). Never
    another exception."""
    if not isinstance(raw, bytes):
        raise UnreadableBasis(f"a {type(raw).__name__}, not bytes")
    if len(raw) < _HEADER.size:
        raise UnreadableBasis("cut short")
    fmt, count, residual, size = _HEADER.unpack_from(raw)
    if fmt != FORMAT:
        raise UnreadableBasis(f"format {fmt}, not {FORMAT}")
    at = _HEADER.size + 8 * count  # after the weights: the keys
    if len(raw) != at + size or (size > 0) != (count > 0):
        raise UnreadableBasis("cut short, trailing bytes, or keys where there are none")
    weights = np.frombuffer(raw, "<f8", count, _HEADER.size).copy()
    if not (math.isfinite(residual) and residual >= 0) or not np.all(np.isfinite(weights) & (weights >= 0)):
        raise UnreadableBasis("a weight or the residual negative or not finite")
    keys = _keys(raw[at:], count)
    if len(set(keys)) != count:
        raise UnreadableBasis("a repeated key")
    return Basis(keys, weights, residual)


def _keys(run: bytes, count: int) -> tuple[str, ...]:
    """The ``count`` keys of ``run`` (UTF-8, joined by NUL), each checked for its length and kind."""
    if not count:
        return ()
    blob = np.frombuffer(run, np.uint8)
    nul = np.flatnonzero(blob == 0)
    if len(nul) != count - 1:
        raise UnreadableBasis(f"{len(nul) + 1} keys for {count} weights")
    starts, ends = np.empty(count, np.intp), np.empty(count, np.intp)
    starts[0], starts[1:], ends[:-1], ends[-1] = 0, nul + 1, nul, len(blob)
    lengths = ends - starts
    if lengths.min() < 3 or lengths.max() > MAX_KEY_BYTES:
        raise UnreadableBasis("a key too short or too long")
    first = blob[starts]
    if not np.all(((first == _KIND[0]) | (first == _KIND[1])) & (blob[starts + 1] == _KIND[2])):
        raise UnreadableBasis("a key of no known kind")
    try:
        return tuple(run.decode("utf-8").split("\x00"))
    except UnicodeDecodeError:
        raise UnreadableBasis("a key that is not UTF-8") from None
