"""A model migration's shadow profiles: each profile rebuilt under the other model from its item map (basis.py).

A shadow is the profile's document with its vector replaced: same ``_id``, ``version``, counts and id rings, the
vector ``normalise(sum W_i v'_i)`` under the other model, that model's magnitude and tags. It depends only on the
profile's item map, never on events, so it can be written again at any time (by the workers after each write while a
migration runs, by ``myshop model run`` for every profile, by the switch for any left behind) and a write is kept only
where the stored shadow is of an older version (Store.put_shadows).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from myshop_ops.adapters.config import PROVIDER_MODELS, Settings
from myshop_ops.adapters.embeddings import EmbeddingError
from myshop_ops.adapters.store import NEXT, PREV, Store, stored_basis
from myshop_ops.base.basis import PHRASE, PRODUCT, Basis, rebuild
from myshop_ops.base.layout import profile_fields, to_datetime
from myshop_ops.base.lru import Recent
from myshop_ops.base.profile import to_days
from myshop_ops.core.ports import Phrases

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Space:
    """An embeddings model's vector space: the provider that makes its vectors, the model tag and the size."""

    provider: str
    model: str
    dimensions: int

    @classmethod
    def of(cls, s: Settings) -> Space:
        return cls(s.embedding_provider, s.model, s.embedding_dimensions)

    def settings(self, s: Settings) -> Settings:
        """``s`` with this space's provider, model and size (credentials and endpoints are ``s``'s)."""
        model = self.model if self.provider == "openai" else s.openai_embedding_model
        return replace(s, embedding_provider=self.provider, openai_embedding_model=model,
                       embedding_dimensions=self.dimensions)

    def as_doc(self) -> dict:
        return {"provider": self.provider, "model": self.model, "dimensions": self.dimensions}

    @classmethod
    def from_doc(cls, doc: object) -> Space | None:
        """A stored space; None when it is not one (hostile or damaged migration document)."""
        if not isinstance(doc, dict):
            return None
        provider, model, dims = doc.get("provider"), doc.get("model"), doc.get("dimensions")
        if provider not in ("openai", *PROVIDER_MODELS) or not isinstance(model, str) or not model:
            return None
        if not isinstance(dims, int) or isinstance(dims, bool) or not 8 <= dims <= 8192:
            return None
        return cls(provider, model, dims)

    def __str__(self) -> str:
        return f"{self.model}/{self.dimensions}d"


@dataclass(frozen=True, slots=True)
class Plan:
    """What the workers do now: fold with ``primary``; while a migration runs, keep the shadow of ``shadow_space``
    in the collections of ``suffix`` up to date. ``hold``: a switch is under way, wait."""

    primary: Space
    shadow_space: Space | None = None
    suffix: str = ""
    hold: bool = False


def plan(doc: dict | None, configured: Space) -> Plan:
    """The workers' plan from the migration document (tools/migration.py); none, or an unreadable one: the
    configured model alone."""
    if not doc:
        return Plan(configured)
    source, target, state = Space.from_doc(doc.get("from")), Space.from_doc(doc.get("to")), doc.get("state")
    if source is None or target is None:
        return Plan(configured)
    if state == "running":
        return Plan(source, target, NEXT)
    if state == "switched":
        return Plan(target, source, PREV)
    if state == "finished":
        return Plan(target)
    return Plan(source if doc.get("direction") != "rollback" else target, hold=True)  # switching


@dataclass(slots=True)
class ShadowResult:
    written: int = 0  # shadow documents written (others were as new already)
    unmapped: list[str] = None  # users whose profile has no item map: no shadow can be built
    failed: dict[str, str] = None  # users whose items could not all be embedded now (transient): why
    retry_after: float | None = None  # the longest wait the provider asked for before trying them again, if any

    def __post_init__(self) -> None:
        self.unmapped = self.unmapped or []
        self.failed = self.failed or {}


def sync_shadows(primary: Store, shadow: Store, space: Space, phrases: Phrases, user_ids: Sequence[str],
                 layout: str, products: Recent[str, np.ndarray] | None = None) -> ShadowResult:
    """Rebuild the shadows of ``user_ids`` from their profiles' item maps under ``space`` and write those newer than
    the stored ones. Items without a vector in ``space`` (a product not imported under it) are left out of the
    rebuild, as the workers skip an event of a product without a vector; a phrase the provider cannot embed now
    leaves that user's shadow as it is (``failed``). Raises PyMongoError."""
    result = ShadowResult()
    docs = primary.source_docs(user_ids)
    maps: dict[str, Basis] = {}
    for doc in docs:
        # rewritten by another writer (the shop's PHP workers) since myshop's write: the map no longer describes it
        basis = stored_basis(doc, doc.get("myshop_version") != doc.get("version"))
        if basis is None or not basis.keys:
            result.unmapped.append(doc["user_id"])
        else:
            maps[doc["user_id"]] = basis
    vectors = _item_vectors(shadow, space, phrases, {k for b in maps.values() for k in b.keys}, products)
    out = []
    for doc in docs:
        user_id = doc["user_id"]
        if user_id not in maps:
            continue
        basis = maps[user_id]
        failed = next((v for k in basis.keys if isinstance(v := vectors.get(k), EmbeddingError)), None)
        if failed is not None:
            result.failed[user_id] = f"the phrases could not be embedded now: {str(failed)[:200]}"
            if failed.retry_after is not None:
                result.retry_after = max(result.retry_after or 0.0, failed.retry_after)
            continue
        known = [i for i, k in enumerate(basis.keys) if k in vectors]
        when = to_datetime(doc.get("last_updated"))
        if not known or when is None:
            result.unmapped.append(user_id)
            continue
        try:
            profile = rebuild(Basis(tuple(basis.keys[i] for i in known), basis.weights[known], basis.residual),
                              np.stack([vectors[basis.keys[i]] for i in known]), to_days(when), space.model)
        except ValueError:
            result.unmapped.append(user_id)
            continue
        fields, unset = profile_fields(profile, layout, doc["version"])
        out.append({**{k: v for k, v in doc.items() if k not in unset}, **fields})
    current = shadow.shadow_versions([d["user_id"] for d in docs])
    stale = [(d["user_id"], current[d["user_id"]][0]) for d in docs
             if d["user_id"] in current and current[d["user_id"]][0] != d["_id"]]
    result.written = shadow.put_shadows(out, stale)
    return result


def _item_vectors(shadow: Store, space: Space, phrases: Phrases, keys: set[str],
                  products: Recent[str, np.ndarray] | None) -> dict[str, np.ndarray | EmbeddingError]:
    """The vector of each item under ``space`` (product vectors from the shadow's products, phrases from the
    embedder), or the transient error of a phrase that has none now; items without a vector are absent."""
    out: dict[str, np.ndarray | EmbeddingError] = {}
    ids = {k[len(PRODUCT):] for k in keys if k.startswith(PRODUCT)}
    cached, unknown = products.take(ids) if products is not None else ({}, list(ids))
    found, _ = shadow.product_vectors(unknown, space.model, space.dimensions) if unknown else ({}, {})
    if products is not None:
        products.put(found)
    out.update({PRODUCT + pid: vec for pid, vec in {**cached, **found}.items()})
    texts = [k[len(PHRASE):] for k in keys if k.startswith(PHRASE)]
    if texts:
        for text, got in phrases.embed(texts).items():
            if isinstance(got, EmbeddingError):
                if got.transient:
                    out[PHRASE + text] = got
            else:
                out[PHRASE + text] = got
    return out
