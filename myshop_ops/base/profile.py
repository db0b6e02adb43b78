"""The profile math: exponentially decayed weighted sums of event vectors. Pure numpy, no I/O.

A profile is the sum S(T) = sum_i w_i * exp(-lambda * (T - t_i)) * v_i with times in days and
T the newest event time. It is stored as ``embedding = S/|S|`` (float32) and ``magnitude = |S|``.

Folding is exact whatever the order or grouping of events: with T' = max(T, t_1..t_n),
S' = exp(-lambda (T' - T)) S + sum_i w_i exp(-lambda (T' - t_i)) v_i, which equals applying the
events one by one (later ones rescale S, late ones are merged with their own decay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

DEFAULT_LAMBDA = 0.023
SECONDS_PER_DAY = 86_400.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class VectorSpaceMismatch(ValueError):
    """An event vector's model or dimensions differ from the profile's: never mixed."""


def half_life_days(lam: float) -> float:
    """Days after which an event's influence halves (ln 2 / lambda)."""
    return math.log(2.0) / lam


def to_days(when: datetime) -> float:
    """Fractional days since the Unix epoch of an aware datetime."""
    return (when - _EPOCH).total_seconds() / SECONDS_PER_DAY


def from_days(days: float) -> datetime:
    """Inverse of :func:`to_days` (aware UTC)."""
    return datetime.fromtimestamp(days * SECONDS_PER_DAY, tz=UTC)


def decay(elapsed_days: float | np.ndarray, lam: float) -> float | np.ndarray:
    """The factor an event's weight is multiplied by after ``elapsed_days``."""
    return np.exp(-lam * np.asarray(elapsed_days, dtype=np.float64))


@dataclass(frozen=True, slots=True)
class Profile:
    """A user's decayed sum in its unit/magnitude form, tagged with its vector space."""

    embedding: np.ndarray  # float32 unit vector
    magnitude: float
    last_updated: float  # T, days since the epoch
    model: str
    dimensions: int

    @property
    def total(self) -> np.ndarray:
        """S as float64."""
        return self.embedding.astype(np.float64) * self.magnitude


def fold(
    profile: Profile | None,
    times: np.ndarray,
    weights: np.ndarray,
    vectors: np.ndarray,
    *,
    lam: float,
    model: str,
) -> Profile:
    """Apply events (days, weights, row vectors of ``model``) to ``profile`` (None = no profile yet).

    Raises VectorSpaceMismatch when the vectors are not in the profile's space.
    """
    times = np.asarray(times, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) != len(times) or len(weights) != len(times) or not len(times):
        raise ValueError("fold needs n >= 1 events with one time, weight and vector row each")
    dims = vectors.shape[1]
    if profile is not None and (profile.model != model or profile.dimensions != dims):
        raise VectorSpaceMismatch(
            f"event vectors are {model}/{dims}d but the profile is {profile.model}/{profile.dimensions}d"
        )
    newest = float(times.max())
    new_t = newest if profile is None else max(profile.last_updated, newest)
    coeffs = weights * np.exp(-lam * (new_t - times))
    total = coeffs @ vectors  # float64 (coeffs are)
    if profile is not None:
        total += profile.total * math.exp(-lam * (new_t - profile.last_updated))
    magnitude = math.sqrt(float(total @ total))
    if magnitude == 0.0 or not math.isfinite(magnitude):
        raise ValueError("the folded profile has no direction (zero or non-finite sum)")
    return Profile(
        embedding=(total / magnitude).astype(np.float32),
        magnitude=magnitude,
        last_updated=new_t,
        model=model,
        dimensions=dims,
    )


def apply_event(profile: Profile | None, t: float, w: float, v: np.ndarray, *, lam: float, model: str) -> Profile:
    """Apply one event; the SPEC's two cases (t >= T rescales S, t < T is merged decayed)."""
    return fold(profile, np.array([t]), np.array([w]), np.asarray(v)[None, :], lam=lam, model=model)
