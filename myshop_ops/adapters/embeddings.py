"""Embedding providers (openai, hash) and the search-phrase cache in front of them."""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import unicodedata
import zlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from myshop_ops.adapters.config import ConfigError, Settings
from myshop_ops.base.lru import Recent

MAX_INPUTS_PER_REQUEST = 2048
MAX_BYTES_PER_REQUEST = 300_000  # the API's token cap; tokens <= UTF-8 bytes
MAX_BYTES_PER_INPUT = 8192
NATIVE_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}


class EmbeddingError(Exception):
    """The provider failed. ``transient`` errors (429, 5xx, timeouts) are retried; others are not."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


class Provider(Protocol):
    model: str
    dimensions: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One float32 unit row per text, in order."""


_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def _fold_text(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in text if not unicodedata.combining(c))


class HashProvider:
    """Deterministic feature hashing (words, bigrams, char 3-5-grams): offline, lexical, no semantics.

    Uses crc32, never ``hash()``, so vectors are identical across processes and machines.
    """

    def __init__(self, dimensions: int = 1536, model: str = "hash-v1"):
        self.dimensions = dimensions
        self.model = model

    def _features(self, text: str) -> list[tuple[str, float]]:
        words = _WORD.findall(_fold_text(text))
        feats: list[tuple[str, float]] = []
        for w in words:
            feats.append(("w:" + w, 1.0))
            padded = f"<{w}>"
            grams = [padded[i : i + n] for n in range(3, 6) for i in range(max(len(padded) - n + 1, 0))]
            if grams:
                cw = 2.0 / len(grams)
                feats.extend(("c:" + g, cw) for g in grams)
        feats.extend((f"b:{a} {b}", 0.5) for a, b in itertools.pairwise(words))
        return feats

    def embed_one(self, text: str) -> np.ndarray:
        feats = self._features(text)
        if not feats:
            raise EmbeddingError("cannot embed a text with no words", transient=False)
        idx = np.empty(len(feats), np.int64)
        val = np.empty(len(feats), np.float64)
        for k, (f, w) in enumerate(feats):
            b = f.encode()
            idx[k] = zlib.crc32(b) % self.dimensions
            val[k] = w if zlib.crc32(b, 0x9E3779B9) & 1 else -w
        v = np.bincount(idx, weights=val, minlength=self.dimensions)
        v = np.sign(v) * np.log1p(np.abs(v))
        norm = np.linalg.norm(v)
        if norm == 0.0:
            v[idx[0]], norm = 1.0, 1.0
        return (v / norm).astype(np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), np.float32)
        return np.stack([self.embed_one(t) for t in texts])


def truncate_utf8(text: str, limit: int = MAX_BYTES_PER_INPUT) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes without splitting a character."""
    raw = text.encode()
    return text if len(raw) <= limit else raw[:limit].decode(errors="ignore")


def request_batches(texts: Sequence[str]) -> list[list[str]]:
    """Split inputs into requests of <= 2048 inputs and <= 300k bytes (a safe bound on tokens)."""
    batches: list[list[str]] = []
    current: list[str] = []
    size = 0
    for text in texts:
        n = len(text.encode())
        if current and (len(current) >= MAX_INPUTS_PER_REQUEST or size + n > MAX_BYTES_PER_REQUEST):
            batches.append(current)
            current, size = [], 0
        current.append(text)
        size += n
    if current:
        batches.append(current)
    return batches


class OpenAIProvider:
    """The official SDK against OpenAI or any compatible endpoint; base64 vectors decoded with numpy."""

    def __init__(self, settings: Settings, *, timeout: float = 30.0, max_retries: int = 2):
        import openai

        self._openai = openai
        self.model = settings.openai_embedding_model
        self.dimensions = settings.embedding_dimensions
        self._send_dimensions = NATIVE_DIMENSIONS.get(self.model) != self.dimensions
        self._client = openai.OpenAI(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url,
            timeout=timeout,
            max_retries=max_retries,
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        inputs = [truncate_utf8(t) for t in texts]
        rows = [self._request(batch) for batch in request_batches(inputs)]
        return np.concatenate(rows) if rows else np.zeros((0, self.dimensions), np.float32)

    def _request(self, inputs: list[str]) -> np.ndarray:
        oa = self._openai
        extra = {"dimensions": self.dimensions} if self._send_dimensions else {}
        try:
            resp = self._client.embeddings.create(
                model=self.model, input=inputs, encoding_format="base64", **extra
            )
        except (oa.RateLimitError, oa.InternalServerError, oa.APITimeoutError, oa.APIConnectionError) as exc:
            raise EmbeddingError(f"embeddings provider: {type(exc).__name__}: {exc}", transient=True) from exc
        except oa.APIStatusError as exc:
            transient = exc.status_code in (408, 409, 429) or exc.status_code >= 500
            raise EmbeddingError(
                f"embeddings provider refused the request ({exc.status_code}): {exc.message}", transient=transient
            ) from exc
        data = sorted(resp.data, key=lambda d: d.index)
        if len(data) != len(inputs):
            raise EmbeddingError(f"provider returned {len(data)} vectors for {len(inputs)} inputs", transient=True)
        out = np.empty((len(inputs), self.dimensions), np.float32)
        for i, item in enumerate(data):
            emb = item.embedding
            vec = np.frombuffer(base64.b64decode(emb), "<f4") if isinstance(emb, str) else np.asarray(emb, "<f4")
            if vec.shape != (self.dimensions,):
                raise EmbeddingError(
                    f"provider returned {vec.shape[0]}-d vectors for {self.model}, EMBEDDING_DIMENSIONS is "
                    f"{self.dimensions}",
                    transient=False,
                )
            out[i] = vec
        return out


def make_provider(settings: Settings) -> Provider:
    """The configured provider (hash is refused in prod by the settings themselves)."""
    if settings.embedding_provider == "hash":
        return HashProvider(settings.embedding_dimensions, settings.model)
    if settings.embedding_provider == "openai":
        if not settings.openai_api_key:  # settings loaded for a command that does not embed (load_settings)
            raise ConfigError("OPENAI_API_KEY", None, "required when EMBEDDING_PROVIDER=openai")
        return OpenAIProvider(settings)
    raise ConfigError("EMBEDDING_PROVIDER", settings.embedding_provider, "openai or hash")


def normalise_phrase(phrase: str) -> str:
    """The cache identity of a search phrase: NFKC, lower case, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", phrase).casefold().split())


class VectorCache(Protocol):
    def get_vectors(self, keys: Sequence[str]) -> list[bytes | None]: ...

    def set_vectors(self, items: dict[str, bytes], ttl: int) -> None: ...


class PhraseEmbedder:
    """Search-phrase vectors: in-process LRU, then the shared cache, then one provider call for the rest."""

    def __init__(self, provider: Provider, shared: VectorCache | None, *, ttl: int, lru_size: int = 10_000):
        self.provider = provider
        self.shared = shared
        self.ttl = ttl
        self._lru: Recent[str, np.ndarray] = Recent(lru_size)
        self.provider_calls = 0
        self.provider_texts = 0

    def key(self, phrase: str) -> str:
        digest = hashlib.sha256(normalise_phrase(phrase).encode()).hexdigest()
        return f"{self.provider.model}:{self.provider.dimensions}:{digest}"  # the Redis gateway adds its prefix

    def embed(self, phrases: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors by phrase for every distinct phrase given (raises EmbeddingError)."""
        keys = {p: self.key(p) for p in phrases}
        by_key = {k: p for p, k in keys.items()}
        found, missing = self._lru.take(by_key)
        if missing and self.shared is not None:
            for k, raw in zip(missing, self.shared.get_vectors(missing), strict=True):
                if raw is not None and len(raw) == 4 * self.provider.dimensions:
                    found[k] = np.frombuffer(raw, "<f4")
        fresh = [k for k in by_key if k not in found]
        if fresh:
            vectors = self.provider.embed([normalise_phrase(by_key[k]) for k in fresh])
            self.provider_calls += 1
            self.provider_texts += len(fresh)
            for k, vec in zip(fresh, vectors, strict=True):
                found[k] = vec
            if self.shared is not None:
                self.shared.set_vectors({k: found[k].astype("<f4").tobytes() for k in fresh}, self.ttl)
        self._lru.put(found)
        return {p: found[k] for p, k in keys.items()}
