"""Hypothesis strategies and generated faults shared by the property tests of the consume path: what a hostile or
broken publisher can put in a delivery (properties, headers, bodies) and what a broken embeddings provider can
answer for one input (tests/support/stubs.py StubProvider.replies)."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pika
from hypothesis import strategies as st

from myshop_ops.adapters.embeddings import EmbeddingError, InputRefused, RequestRefused
from myshop_ops.base.contract import MAX_BODY_BYTES

# ---- deliveries ---------------------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.binary(max_size=20),
    st.decimals(), st.datetimes(), st.complex_numbers(), st.builds(object),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner,
                                                                max_size=3),
    max_leaves=12,
)
HEADER_NAMES = st.sampled_from(["x-retry-count", "x-published-at", "x-first-failure-at", "x-error-history",
                                "x-failure-id", "x-original-size", "x-death"]) | st.text(max_size=10) | st.binary(
    max_size=4)
HEADERS = st.dictionaries(HEADER_NAMES, VALUES, max_size=5) | VALUES
PROPERTIES = st.builds(
    pika.BasicProperties,
    message_id=st.one_of(st.binary(max_size=8), st.text(max_size=300), st.text(min_size=120, max_size=200), VALUES),
    content_type=st.one_of(st.just("application/json"), st.binary(max_size=8), VALUES),
    timestamp=st.one_of(st.integers(), VALUES),
    expiration=VALUES, priority=VALUES, correlation_id=VALUES, type=VALUES, app_id=VALUES,
    headers=HEADERS,
)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=3), max_leaves=8)
BAD_BODIES = st.one_of(
    st.binary(max_size=64),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.integers(MAX_BODY_BYTES + 1, MAX_BODY_BYTES + 2000).map(lambda n: b"{" + b" " * n),
)

# ---- provider replies for one input -------------------------------------------------------------------------------
# Each maps the input's good vector to what the provider answers for it instead (StubProvider.replies).

Reply = Callable[[np.ndarray], object]

BAD_REPLIES: dict[str, Reply] = {  # permanent: the input's searches fail, nothing is cached
    "nan": lambda v: np.full(len(v), np.nan, np.float32),
    "inf": lambda v: np.where(np.arange(len(v)) == 0, np.inf, v).astype(np.float32),
    "huge": lambda v: v * np.float32(1e30),
    "tiny": lambda v: v * np.float32(1e-30),
    "zero": lambda v: np.zeros(len(v), np.float32),
    "short": lambda v: v[: len(v) // 2],
    "long": lambda v: np.concatenate([v, v]),
    "matrix": lambda v: np.stack([v, v]),
    "refused": lambda v: RequestRefused("embeddings provider refused (400): no"),  # the whole request: split
}
REFUSED_INPUT: dict[str, Reply] = {  # permanent: a reply with no usable vector for this input, the others answered
    "input refused": lambda v: InputRefused("embeddings provider returned 0 vectors for this input"),
}
TRANSIENT_REPLIES: dict[str, Reply] = {  # the whole request holding the input fails for now (not split): retried
    "429": lambda v: EmbeddingError("embeddings provider refused (429): rate limited", transient=True),
    "503": lambda v: EmbeddingError("embeddings provider refused (503): overloaded", transient=True),
    "timeout": lambda v: EmbeddingError("embeddings provider: APITimeoutError: Request timed out.", transient=True),
}
GOOD_REPLIES: dict[str, Reply] = {
    "good": lambda v: v,
    "length 3": lambda v: v * np.float32(3),  # a model that does not normalise: scaled to length 1
}
