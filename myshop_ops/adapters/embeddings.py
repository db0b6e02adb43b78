"""Embedding providers (openai, hash), the one check every vector passes, and the search-phrase cache.

Every vector that comes in (a provider's reply, a value read back from the shared cache) goes through
``usable_vector``: a float32 vector of the configured size, finite, non-zero, of a length within NORM_BAND (scaled to
length 1). Callers get one result per input (``embed_each``): a vector, or the reason that input has none; one bad
input never costs another its vector, and nothing refused is ever cached.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import itertools
import math
import re
import time
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from myshop_ops.adapters.config import ConfigError, Settings
from myshop_ops.base.lru import Recent

MAX_INPUTS_PER_REQUEST = 2048
MAX_BYTES_PER_REQUEST = 300_000  # the API's token cap; tokens <= UTF-8 bytes
MAX_BYTES_PER_INPUT = 8192
NATIVE_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
# The lengths a vector may have. OpenAI's and the usual self-hosted servers' vectors have length 1; a model that does
# not normalise gives lengths of a few units to a few hundred. Far outside that, the reply is broken (a ~1e30 vector
# would outweigh every other event of a profile forever): refused. Inside, a vector is scaled to length 1, so every
# event weighs in the fold by its event type's weight alone; within UNIT_TOLERANCE of 1 it is kept bit for bit.
NORM_BAND = (1e-3, 1e3)
UNIT_TOLERANCE = 1e-3
# A whole request refused with one of these statuses may be refused for one of its inputs (too long, a moderation
# filter, a self-hosted server's tokenizer): embed_each splits it to find which (unless the refusal names another
# parameter than ``input``, e.g. ``dimensions``: then it concerns every request).
SPLIT_STATUSES = frozenset({400, 413, 422})


class EmbeddingError(Exception):
    """No vector. ``transient`` errors (429, 5xx, timeouts) are retried; others are not. ``retry_after``: the
    seconds the provider asked to wait before the next request (its Retry-After), if it said."""

    def __init__(self, message: str, *, transient: bool, retry_after: float | None = None):
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


class InputRefused(EmbeddingError):
    """This input has no vector, whatever its company: the provider refused it alone, replied with an unusable vector
    for it, or (hash provider) it has no words. Permanent."""

    def __init__(self, message: str):
        super().__init__(message, transient=False)


class RequestRefused(EmbeddingError):
    """The provider refused a request of several inputs with a status that may concern one of them
    (SPLIT_STATUSES): embed_each splits the request to find the refused ones."""

    def __init__(self, message: str):
        super().__init__(message, transient=False)


class Provider(Protocol):
    model: str
    dimensions: int

    def embed_request(self, texts: Sequence[str]) -> list[np.ndarray | EmbeddingError]:
        """One request (``texts`` within request_batches' limits): each text's vector as received, unchecked, or
        why that text has none. Raises EmbeddingError when the request as a whole fails (RequestRefused when it
        may be for one input). Callers use embed_each, which checks every vector."""


def usable_vector(value: object, dimensions: int) -> np.ndarray | str:
    """``value`` (a provider's or the cache's vector) as a float32 vector of ``dimensions`` numbers and length 1, or
    why it is not one: not numbers, another size, NaN or infinite values, all zeros, a length outside NORM_BAND.
    Never raises."""
    try:
        vec = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return "not an array of numbers"
    if vec.shape != (dimensions,):
        what = f"a {len(vec)}-d vector" if vec.ndim == 1 else f"an array of shape {vec.shape}"
        return f"{what}, EMBEDDING_DIMENSIONS is {dimensions}"
    if not np.isfinite(vec).all():
        return "a vector with NaN or infinite values"
    with np.errstate(all="ignore"):
        norm = float(np.sqrt(np.dot(vec, vec)))
    low, high = NORM_BAND
    if norm == 0.0:
        return "a zero vector"
    if not low <= norm <= high:
        return f"a vector of length {norm:.3g}, outside [{low:g}, {high:g}]"
    return (vec if abs(norm - 1.0) <= UNIT_TOLERANCE else vec / norm).astype(np.float32)


def embed_each(provider: Provider, texts: Sequence[str]) -> list[np.ndarray | EmbeddingError]:
    """Each text's checked vector (usable_vector), or why it has none, in order; never raises EmbeddingError.

    Requests stay within request_batches' limits. A request refused as a whole (RequestRefused) is split in halves,
    recursively, until each refused input stands alone and every other input has its vector: at most 2(n-1) extra
    requests for a request of n inputs, 2 per halving on the way to each refused input (22 for one among 2048).
    Any other failure of a request is every input's of that request, transient or not as it says.
    """
    out: list[np.ndarray | EmbeddingError] = []
    for batch in request_batches([truncate_utf8(t) for t in texts]):
        start = len(out)
        out.extend(_embed_group(provider, list(texts[start : start + len(batch)])))
    return out


def _embed_group(provider: Provider, texts: list[str]) -> list[np.ndarray | EmbeddingError]:
    try:
        rows = provider.embed_request(texts)
    except RequestRefused as exc:
        if len(texts) == 1:
            return [InputRefused(str(exc))]
        half = len(texts) // 2
        return _embed_group(provider, texts[:half]) + _embed_group(provider, texts[half:])
    except EmbeddingError as exc:
        return [exc] * len(texts)
    return [row if isinstance(row, EmbeddingError) else _checked(provider, row) for row in rows]


def _checked(provider: Provider, row: object) -> np.ndarray | EmbeddingError:
    vec = usable_vector(row, provider.dimensions)
    return vec if not isinstance(vec, str) else InputRefused(f"embeddings provider ({provider.model}) returned {vec}")


def embed_all(provider: Provider, texts: Sequence[str]) -> np.ndarray:
    """Every text's vector as the rows of one matrix; raises the first text's EmbeddingError (all or nothing)."""
    rows = embed_each(provider, texts)
    for row in rows:
        if isinstance(row, EmbeddingError):
            raise row
    return np.stack(rows) if rows else np.zeros((0, provider.dimensions), np.float32)


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
            raise InputRefused("cannot embed a text with no words")
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

    def embed_request(self, texts: Sequence[str]) -> list[np.ndarray | EmbeddingError]:
        out: list[np.ndarray | EmbeddingError] = []
        for text in texts:
            try:
                out.append(self.embed_one(text))
            except InputRefused as exc:
                out.append(exc)
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return embed_all(self, texts)


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
        return embed_all(self, texts)

    def embed_request(self, texts: Sequence[str]) -> list[np.ndarray | EmbeddingError]:
        oa = self._openai
        extra = {"dimensions": self.dimensions} if self._send_dimensions else {}
        inputs = [truncate_utf8(t) for t in texts]
        try:
            resp = self._client.embeddings.create(
                model=self.model, input=inputs, encoding_format="base64", **extra
            )
        except (oa.RateLimitError, oa.InternalServerError, oa.APITimeoutError, oa.APIConnectionError) as exc:
            raise EmbeddingError(f"embeddings provider: {type(exc).__name__}: {exc}", transient=True,
                                 retry_after=retry_after_s(getattr(exc, "response", None))) from exc
        except oa.APIStatusError as exc:
            message = f"embeddings provider refused ({exc.status_code}): {exc.message}"
            if exc.status_code in SPLIT_STATUSES and getattr(exc, "param", None) in (None, "input"):
                raise RequestRefused(message) from exc
            transient = exc.status_code in (408, 409, 429) or exc.status_code >= 500
            raise EmbeddingError(message, transient=transient, retry_after=retry_after_s(exc.response)) from exc
        except oa.APIError as exc:  # a reply the SDK could not read
            raise EmbeddingError(f"embeddings provider: {type(exc).__name__}: {exc}", transient=True) from exc
        return reply_rows(resp, len(inputs))


def retry_after_s(response: object) -> float | None:
    """The wait a refused reply asks for, in seconds: its ``retry-after-ms`` header, else ``retry-after`` (seconds or
    an HTTP date, as the SDK reads them); None when it says none or nothing readable. Never raises."""
    headers = getattr(response, "headers", None)
    get = getattr(headers, "get", None)
    if get is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = get(name)
        if not isinstance(value, str):
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, OverflowError, IndexError):
                continue
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    return None


def reply_rows(resp: object, n: int) -> list[np.ndarray | EmbeddingError]:
    """The vector of each of ``n`` inputs in a reply (``data[].index`` / ``.embedding``, base64 float32 or numbers),
    unchecked, or why that input has none (no vector or several for its index, not decodable). Never raises but
    EmbeddingError (transient) for a reply without a list of vectors."""
    data = getattr(resp, "data", None)
    if not isinstance(data, list):
        raise EmbeddingError("embeddings provider: a reply without a list of vectors", transient=True)
    by_index: dict[int, list[object]] = defaultdict(list)
    for item in data:
        index = getattr(item, "index", None)
        if isinstance(index, int) and not isinstance(index, bool):
            by_index[index].append(getattr(item, "embedding", None))
    return [_decoded(by_index.get(i, [])) for i in range(n)]


def _decoded(embeddings: list[object]) -> np.ndarray | EmbeddingError:
    if len(embeddings) != 1:
        return InputRefused(f"embeddings provider returned {len(embeddings)} vectors for this input")
    emb = embeddings[0]
    try:
        if isinstance(emb, str) and len(raw := base64.b64decode(emb, validate=True)) % 4 == 0:
            return np.frombuffer(raw, "<f4")
        if isinstance(emb, list):
            return np.array(emb, np.float64)
    except (ValueError, TypeError, OverflowError):
        pass
    return InputRefused("embeddings provider returned a vector that is not base64 float32 or numbers for this input")


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

    def embed(self, phrases: Sequence[str]) -> dict[str, np.ndarray | EmbeddingError]:
        """For every distinct phrase given, its vector or why it has none (never raises EmbeddingError). Only checked
        vectors are cached (usable_vector), here and in the shared cache; a shared value that fails the check is
        ignored, embedded again and overwritten."""
        keys = {p: self.key(p) for p in phrases}
        by_key = {k: p for p, k in keys.items()}
        found, missing = self._lru.take(by_key)
        if missing and self.shared is not None:
            for k, raw in zip(missing, self.shared.get_vectors(missing), strict=True):
                if isinstance(raw, bytes) and len(raw) % 4 == 0:
                    vec = usable_vector(np.frombuffer(raw, "<f4"), self.provider.dimensions)
                    if not isinstance(vec, str):
                        found[k] = vec
        fresh = [k for k in by_key if k not in found]
        failed: dict[str, EmbeddingError] = {}
        if fresh:
            results = embed_each(self.provider, [normalise_phrase(by_key[k]) for k in fresh])
            self.provider_calls += 1
            self.provider_texts += len(fresh)
            embedded = {k: r for k, r in zip(fresh, results, strict=True) if not isinstance(r, EmbeddingError)}
            failed = {k: r for k, r in zip(fresh, results, strict=True) if isinstance(r, EmbeddingError)}
            if embedded and self.shared is not None:
                self.shared.set_vectors({k: v.astype("<f4").tobytes() for k, v in embedded.items()}, self.ttl)
            found.update(embedded)
        self._lru.put(found)
        return {p: found[k] if k in found else failed[k] for p, k in keys.items()}
