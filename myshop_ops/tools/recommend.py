"""Product recommendations: the products most similar (cosine) to a user's profile vector.

Two backends (``RECOMMEND_BACKEND``):

* ``numpy`` (default): every usable product vector of the configured model/dimensions in one float32
  matrix of L2-normalised rows, cached per process and reused while ``product_embeddings`` is unchanged
  (its document count and newest ``updated_at``, two cheap index-backed reads, are compared before each
  use); top-k by ``argpartition``.
* ``atlas``: a MongoDB Atlas ``$vectorSearch`` aggregation on index ``ATLAS_VECTOR_INDEX``.

A profile whose model or dimensions differ from the configured ones is refused, never compared.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from pymongo.errors import OperationFailure

from myshop_ops.adapters.config import Settings
from myshop_ops.adapters.store import PRODUCTS, Store
from myshop_ops.base.layout import ForeignVector, UnreadableProfile, id_key, product_vector, profile_vector
from myshop_ops.base.profile import VectorSpaceMismatch

log = logging.getLogger(__name__)

ATLAS_MAX_CANDIDATES = 10_000  # Atlas caps numCandidates
_PRODUCT_FIELDS = {"_id": 0, "product_id": 1, "productId": 1, "name": 1, "category": 1}


class RecommendError(Exception):
    """Recommendations cannot be computed; ``str()`` is one line for the operator."""


class NoProfile(RecommendError):
    """The user has no profile document."""


class BackendError(RecommendError):
    """The configured backend cannot serve (e.g. ``atlas`` on a server without ``$vectorSearch``)."""


@dataclass(frozen=True, slots=True)
class Recommendation:
    product_id: str
    name: str | None
    category: str | None
    score: float | None  # cosine similarity with the profile; None for the fallback


@dataclass(frozen=True, slots=True)
class Recommendations:
    user_id: str
    items: list[Recommendation]
    backend: str  # numpy | atlas | fallback (newest products, the user has no profile)
    model: str
    dimensions: int
    excluded: int | None = None  # purchased products left out; None: not asked, or no purchased_product_ids

    @property
    def fallback(self) -> bool:
        return self.backend == "fallback"


# ---- the product matrix ---------------------------------------------------------------------------


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


class ProductMatrix:
    """Usable product vectors of one model/dimensions: L2-normalised float32 rows and their ids."""

    def __init__(self, ids: list[str], names: list[str | None], categories: list[str | None], vectors: np.ndarray,
                 signature: tuple[int, datetime | None, str | None], skipped: int = 0):
        self.ids = ids
        self.names = names
        self.categories = categories
        self.vectors = vectors
        self.signature = signature
        self.skipped = skipped  # documents of the model whose vector is unreadable, mis-sized or zero
        self.row = {pid: i for i, pid in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def item(self, i: int, score: float | None) -> Recommendation:
        return Recommendation(self.ids[i], self.names[i], self.categories[i], score)


def product_key(doc: dict) -> str | None:
    """A product document's id as events carry it: ``product_id``, else the shop's ``productId``."""
    return id_key(doc.get("product_id")) or id_key(doc.get("productId"))


def load_matrix(store: Store, model: str, dimensions: int, sig: tuple[int, datetime | None]) -> ProductMatrix:
    """Read every product vector of ``model``/``dimensions`` into one normalised float32 matrix. A product without
    a usable vector or id is left out, and the load logs how many were, once."""
    cursor = store.space_products(model, dimensions, {**_PRODUCT_FIELDS, "embedding": 1, "model": 1, "dimensions": 1})
    matrix = np.empty((min(max(sig[0], 16), 65_536), dimensions), np.float32)  # grows by doubling
    ids: list[str] = []
    names: list[str | None] = []
    categories: list[str | None] = []
    left_out: dict[str, str] = {}  # first few: product id -> why
    skipped = 0
    for doc in cursor:
        pid = product_key(doc)
        try:
            vec = product_vector(doc, model, dimensions)
        except ForeignVector as exc:
            skipped += 1
            if len(left_out) < 3:
                left_out[str(pid)[:64]] = str(exc)
            continue
        if pid is None:
            skipped += 1
            continue
        n = len(ids)
        if n == len(matrix):
            matrix = np.concatenate([matrix, np.empty_like(matrix)])
        matrix[n] = vec
        ids.append(pid)
        names.append(_text(doc.get("name")))
        categories.append(_text(doc.get("category")))
    matrix = matrix[: len(ids)].copy()
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)  # each within NORM_RANGE: no overflow, no zero
    if skipped:
        log.warning("products left out of recommendations: no usable vector or id", extra={
            "count": skipped, "space": f"{model}/{dimensions}d",
            "examples": "; ".join(f"{pid}: {why}" for pid, why in left_out.items())})
    return ProductMatrix(ids, names, categories, matrix, sig, skipped)


class MatrixCache:
    """Product matrices by (MongoDB URL, database, model, dimensions), reloaded when product_embeddings changed."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, str, int], ProductMatrix] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, source: str, store: Store, model: str, dimensions: int) -> ProductMatrix:
        key = (source, store.db_name, model, dimensions)
        sig = store.products_signature()  # read before loading: a write during the load only causes one more reload
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None and cached.signature == sig:
                return cached
            matrix = load_matrix(store, model, dimensions, sig)
            self._entries[key] = matrix
            self.loads += 1
            return matrix


PROCESS_CACHE = MatrixCache()


def top_k(vectors: np.ndarray, query: np.ndarray, k: int, exclude: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Row indices and scores of the ``k`` rows with the largest dot product with ``query``, best first
    (equal scores by row index); rows in ``exclude`` are never returned."""
    scores = vectors @ query
    available = len(scores)
    if exclude is not None and len(exclude):
        exclude = np.unique(exclude)
        scores[exclude] = -np.inf
        available -= len(exclude)
    k = min(k, available)
    if k <= 0:
        return np.zeros(0, np.intp), np.zeros(0, scores.dtype)
    idx = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    idx = idx[np.lexsort((idx, -scores[idx]))]
    return idx, scores[idx]


# ---- Atlas ----------------------------------------------------------------------------------------


def atlas_pipeline(query: np.ndarray, *, index: str, model: str, dimensions: int, limit: int,
                   exclude: list[str] | None = None) -> list[dict[str, Any]]:
    """The ``$vectorSearch`` aggregation for the ``limit`` products nearest ``query`` (model/dimensions
    as filters, purchased products excluded). Atlas's cosine score is (1 + cosine) / 2."""
    where: dict[str, Any] = {"model": model, "dimensions": dimensions}
    if exclude:
        where["product_id"] = {"$nin": list(exclude)}
    return [
        {"$vectorSearch": {
            "index": index,
            "path": "embedding",
            "queryVector": [float(x) for x in query],
            "numCandidates": min(ATLAS_MAX_CANDIDATES, max(20 * limit, 100)),
            "limit": limit,
            "filter": where,
        }},
        {"$project": {**_PRODUCT_FIELDS, "score": {"$meta": "vectorSearchScore"}}},
    ]


# ---- the recommender ------------------------------------------------------------------------------


class Recommender:
    """Recommendations for the configured vector space (``Settings.model`` / ``embedding_dimensions``)."""

    def __init__(self, settings: Settings, store: Store, cache: MatrixCache = PROCESS_CACHE):
        self.settings = settings
        self.store = store
        self.cache = cache
        self.model = settings.model
        self.dimensions = settings.embedding_dimensions
        self.backend = settings.recommend_backend

    @property
    def space(self) -> str:
        return f"{self.model}/{self.dimensions}d"

    def profile(self, user_id: str) -> dict | None:
        """The user's profile document (without the bounded message id list)."""
        return self.store.get_profile_doc(user_id, rings=False)

    def recommend(self, user_id: str, *, limit: int = 10, exclude_purchased: bool = False,
                  fallback: bool = False) -> Recommendations:
        """Top ``limit`` products for a user. Raises NoProfile (unless ``fallback``: the newest products),
        RecommendError on a profile of another vector space or no product vectors, BackendError."""
        doc = self.profile(user_id)
        if doc is None:
            if not fallback:
                raise NoProfile(f"user {user_id} has no profile in {self.store.db_name}.user_embeddings (none of "
                                "their events applied yet, or the profile was erased; --fallback lists the newest "
                                "products instead)")
            return self.newest(user_id, limit)
        return self.for_profile(doc, limit=limit, exclude_purchased=exclude_purchased)

    def for_profile(self, doc: dict, *, limit: int = 10, exclude_purchased: bool = False) -> Recommendations:
        """Top ``limit`` products for a profile document (as stored in user_embeddings)."""
        user_id = str(doc["user_id"])
        space = f"{doc.get('model')}/{doc.get('dimensions')}d"
        if doc.get("model") is not None and space != self.space:
            raise RecommendError(
                f"user {user_id}'s profile is {space} but the configured vector space is {self.space}: vectors "
                "of different models are never compared (set EMBEDDING_PROVIDER/OPENAI_EMBEDDING_MODEL/"
                "EMBEDDING_DIMENSIONS to the profile's, or rebuild the profiles)"
            )
        try:  # the shop's PHP workers tag nothing: an untagged vector of the configured length is taken
            _, vec = profile_vector(doc, self.model, self.dimensions)
        except VectorSpaceMismatch as exc:
            if doc.get("model") is not None:
                raise RecommendError(f"user {user_id}'s profile vector is unreadable, zero or not {self.dimensions} "
                                     "finite numbers (rebuild the profile)") from None
            raise RecommendError(f"user {user_id}'s profile: {exc}: vectors of different sizes are never compared "
                                 "(set EMBEDDING_DIMENSIONS to the profile's, or rebuild the profiles)") from None
        except UnreadableProfile:
            raise RecommendError(f"user {user_id}'s profile vector is unreadable, zero or not {self.dimensions} "
                                 "finite numbers (rebuild the profile)") from None
        query = vec.astype(np.float64)
        query = (query / np.linalg.norm(query)).astype(np.float32)
        bought = doc.get("purchased_product_ids")
        bought = bought if isinstance(bought, list) else None
        purchased = [str(p) for p in bought or ()] if exclude_purchased else []
        excluded = len(set(purchased)) if exclude_purchased and bought is not None else None
        if self.backend == "atlas":
            items = self._atlas(query, limit, purchased)
        else:
            items = self._numpy(query, limit, purchased)
        return Recommendations(user_id, items, self.backend, self.model, self.dimensions, excluded)

    def newest(self, user_id: str, limit: int) -> Recommendations:
        """The fallback for a user without a profile: the most recently updated products of the vector space."""
        docs = self.store.newest_products(self.model, self.dimensions, _PRODUCT_FIELDS, limit)
        if not docs:
            raise self._no_products()
        items = [Recommendation(product_key(d) or "?", _text(d.get("name")), _text(d.get("category")), None)
                 for d in docs]
        return Recommendations(user_id, items, "fallback", self.model, self.dimensions)

    def _no_products(self) -> RecommendError:
        return RecommendError(f"no {self.space} product vectors in {self.store.db_name}.{PRODUCTS} "
                              "(import a catalog: `myshop products import FILE.jsonl`)")

    def _numpy(self, query: np.ndarray, limit: int, purchased: list[str]) -> list[Recommendation]:
        matrix = self.cache.get(self.settings.mongodb_url, self.store, self.model, self.dimensions)
        if not len(matrix):
            raise self._no_products()
        rows = np.fromiter((matrix.row[p] for p in purchased if p in matrix.row), np.intp)
        idx, scores = top_k(matrix.vectors, query, limit, rows)
        return [matrix.item(int(i), float(s)) for i, s in zip(idx, scores, strict=True)]

    def _atlas(self, query: np.ndarray, limit: int, purchased: list[str]) -> list[Recommendation]:
        where = f"Atlas $vectorSearch on {self.store.db_name}.{PRODUCTS} (index {self.settings.atlas_vector_index!r})"
        pipeline = atlas_pipeline(query, index=self.settings.atlas_vector_index, model=self.model,
                                  dimensions=self.dimensions, limit=limit, exclude=purchased)
        try:
            docs = self.store.vector_search(pipeline)
        except OperationFailure as exc:
            first = str(exc.details.get("errmsg") if exc.details else exc).splitlines()[0][:200]
            raise BackendError(f"{where} failed: {first} (create the index as in docs/RECOMMENDATIONS.md, or set "
                               "RECOMMEND_BACKEND=numpy)") from None
        if not docs:
            if self.store.has_tagged_products(self.model, self.dimensions, excluding=purchased):
                raise BackendError(f"{where} returned nothing although {self.space} products exist: is the index "
                                   "built over `embedding` with filters model, dimensions, product_id "
                                   "(docs/RECOMMENDATIONS.md)? Or set RECOMMEND_BACKEND=numpy")
            raise self._no_products()
        return [Recommendation(product_key(d) or "?", _text(d.get("name")), _text(d.get("category")),
                               2.0 * float(d["score"]) - 1.0) for d in docs]
