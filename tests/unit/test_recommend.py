"""myshop_ops.tools.recommend, pure parts: exact top-k against a brute-force sort, the Atlas $vectorSearch pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from myshop_ops.adapters.config import ConfigError, load_settings
from myshop_ops.tools.recommend import ATLAS_MAX_CANDIDATES, atlas_pipeline, top_k


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    m = rng.standard_normal((n, d)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int, exclude=()) -> list[int]:
    scores = vectors.astype(np.float64) @ query.astype(np.float64)
    return [i for i in sorted(range(len(vectors)), key=lambda i: -scores[i]) if i not in set(exclude)][:k]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 7, 50, 499, 500, 900])
def test_top_k_equals_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    vectors = unit_rows(rng, 500, 32)
    query = unit_rows(rng, 1, 32)[0]
    exclude = rng.choice(500, size=20, replace=False) if seed % 2 else None
    idx, scores = top_k(vectors, query, k, exclude)
    expected = brute_force(vectors, query, k, () if exclude is None else exclude.tolist())
    assert idx.tolist() == expected
    np.testing.assert_allclose(scores, vectors[expected].astype(np.float64) @ query, rtol=0, atol=1e-6)
    assert np.all(np.diff(scores) <= 0)


def test_top_k_ties_by_row_and_exclusions_never_returned():
    vectors = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
    idx, scores = top_k(vectors, np.array([1, 0], np.float32), 3)
    assert idx.tolist() == [0, 1, 3] and scores.tolist() == [1.0, 1.0, 1.0]
    idx, _ = top_k(vectors, np.array([1, 0], np.float32), 10, np.array([1, 1, 3]))
    assert idx.tolist() == [0, 2]
    idx, _ = top_k(vectors, np.array([1, 0], np.float32), 2, np.arange(4))
    assert idx.tolist() == []
    assert top_k(np.zeros((0, 2), np.float32), np.array([1, 0], np.float32), 5)[0].tolist() == []


def test_atlas_pipeline():
    query = np.array([0.6, 0.8, 0.0], np.float32)
    pipeline = atlas_pipeline(query, index="idx", model="text-embedding-3-small", dimensions=3, limit=10,
                              exclude=["p1", "p2"])
    assert pipeline == [
        {"$vectorSearch": {
            "index": "idx",
            "path": "embedding",
            "queryVector": [float(np.float32(0.6)), float(np.float32(0.8)), 0.0],
            "numCandidates": 200,
            "limit": 10,
            "filter": {"model": "text-embedding-3-small", "dimensions": 3, "product_id": {"$nin": ["p1", "p2"]}},
        }},
        {"$project": {"_id": 0, "product_id": 1, "productId": 1, "name": 1, "category": 1,
                      "score": {"$meta": "vectorSearchScore"}}},
    ]
    assert all(type(x) is float for x in pipeline[0]["$vectorSearch"]["queryVector"])  # BSON doubles


def test_atlas_pipeline_bounds_candidates_and_omits_an_empty_exclusion():
    small = atlas_pipeline(np.ones(2, np.float32), index="i", model="m", dimensions=2, limit=1)[0]["$vectorSearch"]
    assert small["numCandidates"] == 100 and small["filter"] == {"model": "m", "dimensions": 2}
    big = atlas_pipeline(np.ones(2, np.float32), index="i", model="m", dimensions=2, limit=1000)[0]["$vectorSearch"]
    assert big["numCandidates"] == ATLAS_MAX_CANDIDATES >= big["limit"]


def test_backend_settings_are_validated():
    base = {"APP_ENV": "test", "EMBEDDING_PROVIDER": "hash"}
    s = load_settings(env=base, env_file=None)
    assert (s.recommend_backend, s.atlas_vector_index) == ("numpy", "product_embedding_index")
    s = load_settings(env={**base, "RECOMMEND_BACKEND": "Atlas", "ATLAS_VECTOR_INDEX": "vec_idx-2"}, env_file=None)
    assert (s.recommend_backend, s.atlas_vector_index) == ("atlas", "vec_idx-2")
    with pytest.raises(ConfigError, match=r"^RECOMMEND_BACKEND='faiss' is invalid: one of numpy, atlas$"):
        load_settings(env={**base, "RECOMMEND_BACKEND": "faiss"}, env_file=None)
    with pytest.raises(ConfigError, match=r"^ATLAS_VECTOR_INDEX='my index' is invalid"):
        load_settings(env={**base, "ATLAS_VECTOR_INDEX": "my index"}, env_file=None)
