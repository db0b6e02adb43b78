"""myshop_ops.adapters.embeddings: the real openai SDK over real HTTP against tests.support.fake_openai.

Nothing here mocks httpx/httpx2 or the SDK transport: the SDK talks to a stdlib HTTP server on 127.0.0.1
whose vectors are HashProvider's, so results can be compared bit for bit. Injected faults carry
``retry-after-ms: 1`` (or the client has ``max_retries=0``) so no test waits for the SDK's backoff.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from myshop_ops.adapters.config import ConfigError, load_settings
from myshop_ops.adapters.embeddings import (
    MAX_BYTES_PER_INPUT,
    MAX_BYTES_PER_REQUEST,
    MAX_INPUTS_PER_REQUEST,
    EmbeddingError,
    HashProvider,
    InputRefused,
    OpenAIProvider,
    PhraseEmbedder,
    RequestRefused,
    embed_each,
    make_provider,
    reply_rows,
    request_batches,
    truncate_utf8,
    usable_vector,
)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `tests` is not a package; make tests.support importable under plain `pytest`
    sys.path.insert(0, str(ROOT))

from tests.support.fake_openai import FakeOpenAI  # noqa: E402

TEXTS = ["running shoes", "green tea", "Grüner Tee, 500 g", "anorak for my 4 year old son", "running shoes"]


def nbytes(text: str) -> int:
    return len(text.encode())


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would swallow the loopback calls.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def server():
    s = FakeOpenAI(api_key="test-key").start()
    yield s
    s.stop()


@pytest.fixture
def fake(server: FakeOpenAI):
    server.clear()
    yield server
    server.clear()


def make_settings(base_url: str, **env: str):
    values = {"EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": base_url}
    values.update(env)
    return load_settings(env=values, env_file=None)


def provider(fake: FakeOpenAI, *, timeout: float = 5.0, max_retries: int = 0, **env: str) -> OpenAIProvider:
    return OpenAIProvider(make_settings(fake.base_url, **env), timeout=timeout, max_retries=max_retries)


def shortened(v: np.ndarray, dims: int) -> np.ndarray:
    out = v[..., :dims].astype(np.float64)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


# -- OpenAIProvider through the SDK -----------------------------------------------------------------------


@pytest.mark.parametrize("reverse_data", [False, True], ids=["in-order", "server-reverses-data"])
def test_vectors_bit_equal_to_hash_provider_in_input_order(fake: FakeOpenAI, reverse_data: bool) -> None:
    fake.reverse_data = reverse_data  # the SDK does not re-sort `data`; the provider must use `index`
    p = provider(fake)
    out = p.embed(TEXTS)
    assert (p.model, p.dimensions) == ("text-embedding-3-small", 1536)
    assert out.dtype == np.float32 and out.shape == (len(TEXTS), 1536)
    assert np.array_equal(out, HashProvider(1536).embed(TEXTS))
    assert len(fake.requests) == 1


def test_request_body_native_size_is_base64_without_dimensions(fake: FakeOpenAI) -> None:
    provider(fake).embed(TEXTS)
    (req,) = fake.requests
    assert req["body"]["model"] == "text-embedding-3-small"
    assert req["body"]["input"] == TEXTS
    assert req["body"]["encoding_format"] == "base64"
    assert "dimensions" not in req["body"]
    assert req["headers"]["authorization"] == "Bearer test-key"
    assert req["headers"]["x-stainless-retry-count"] == "0"


def test_configured_dimensions_are_sent_and_vectors_are_short_and_unit(fake: FakeOpenAI) -> None:
    p = provider(fake, EMBEDDING_DIMENSIONS="512")
    out = p.embed(TEXTS)
    (req,) = fake.requests
    assert req["body"]["dimensions"] == 512
    assert req["body"]["encoding_format"] == "base64"
    assert out.dtype == np.float32 and out.shape == (len(TEXTS), 512)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert np.allclose(out, shortened(HashProvider(1536).embed(TEXTS), 512), atol=1e-6)


def test_ada_002_refuses_dimensions_as_a_permanent_error(fake: FakeOpenAI) -> None:
    p = provider(fake, max_retries=2, OPENAI_EMBEDDING_MODEL="text-embedding-ada-002", EMBEDDING_DIMENSIONS="512")
    with pytest.raises(EmbeddingError) as ei:
        p.embed(["green tea"])
    assert ei.value.transient is False
    assert len(fake.requests) == 1


def test_429_is_retried_by_the_sdk_and_succeeds(fake: FakeOpenAI) -> None:
    fake.fail_next(429, retry_after_ms=1)
    out = provider(fake, max_retries=2).embed(TEXTS)
    assert np.array_equal(out, HashProvider(1536).embed(TEXTS))
    assert [r["headers"]["x-stainless-retry-count"] for r in fake.requests] == ["0", "1"]


def test_persistent_500_raises_transient_after_all_retries(fake: FakeOpenAI) -> None:
    fake.fail_next(500, retry_after_ms=1, times=3)
    with pytest.raises(EmbeddingError) as ei:
        provider(fake, max_retries=2).embed(TEXTS)
    assert ei.value.transient is True
    assert isinstance(ei.value.__cause__, openai.InternalServerError)
    assert [r["headers"]["x-stainless-retry-count"] for r in fake.requests] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (429, {"retry-after": "7"}, 7.0),
        (429, {"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # the milliseconds first, as the SDK
        (503, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # an HTTP date already past
        (429, {"retry-after": "-3"}, 0.0),
        (429, {"retry-after": "soon"}, None),
        (429, {"retry-after-ms": "nan", "retry-after": "inf"}, None),
        (429, {}, None),
    ],
)
def test_a_refusal_carries_the_wait_the_provider_asked_for(fake: FakeOpenAI, status: int, headers: dict,
                                                           expected: float | None) -> None:
    fake.fail_next(status, headers=headers)
    with pytest.raises(EmbeddingError) as ei:
        provider(fake).embed(["green tea"])
    assert ei.value.transient is True and ei.value.retry_after == expected


@pytest.mark.parametrize(
    ("case", "status", "requests"),
    # a refused request of two inputs is split: one request each, the refused one alone
    [("injected-400", 400, 1), ("empty-input", 400, 3), ("bad-key", 401, 1), ("unknown-model", 404, 1)],
)
def test_client_errors_are_permanent_and_not_retried(fake: FakeOpenAI, case: str, status: int, requests: int) -> None:
    env: dict[str, str] = {}
    texts = TEXTS
    if case == "injected-400":
        fake.fail_next(400, retry_after_ms=1)
        texts = ["green tea"]
    elif case == "empty-input":
        texts = ["green tea", ""]
    elif case == "bad-key":
        env["OPENAI_API_KEY"] = "sk-wrong"
    else:
        env["OPENAI_EMBEDDING_MODEL"] = "text-embedding-4-nope"
    p = provider(fake, max_retries=2, **env)  # retries allowed, so "1 request" proves they were not used
    with pytest.raises(EmbeddingError) as ei:
        p.embed(texts)
    assert ei.value.transient is False
    assert f"({status})" in str(ei.value)
    assert len(fake.requests) == requests


def test_slow_response_beyond_the_timeout_is_transient(fake: FakeOpenAI) -> None:
    fake.fail_next(200, delay_s=1.0)
    p = OpenAIProvider(make_settings(fake.base_url), timeout=0.3, max_retries=0)
    t0 = time.perf_counter()
    with pytest.raises(EmbeddingError) as ei:
        p.embed(["green tea"])
    assert time.perf_counter() - t0 < 0.9
    assert ei.value.transient is True
    assert isinstance(ei.value.__cause__, openai.APITimeoutError)
    assert len(fake.requests) == 1


def test_unreachable_server_is_transient() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = OpenAIProvider(make_settings(f"http://127.0.0.1:{port}/v1"), timeout=2, max_retries=0)
    with pytest.raises(EmbeddingError) as ei:
        p.embed(["green tea"])
    assert ei.value.transient is True


def test_vectors_of_the_wrong_size_are_refused() -> None:
    with FakeOpenAI(dimensions={"text-embedding-3-small": 384}) as small, pytest.raises(EmbeddingError) as ei:
        provider(small).embed(["green tea"])
    assert ei.value.transient is False
    assert "384-d" in str(ei.value)


def test_long_input_is_truncated_on_a_character_boundary_before_sending(fake: FakeOpenAI) -> None:
    text = "€" * 3000  # 9000 bytes, 3 bytes per character
    provider(fake).embed([text])
    sent = fake.requests[0]["body"]["input"]
    assert sent == ["€" * (MAX_BYTES_PER_INPUT // 3)]
    assert nbytes(sent[0]) <= MAX_BYTES_PER_INPUT


def test_5000_inputs_go_out_in_requests_within_the_api_limits(fake: FakeOpenAI) -> None:
    # Mostly tiny texts (the 2048-input cap binds) and a run of ~8 kB ones (the 300k-byte cap binds).
    # The padding is whitespace, so it costs bytes but no hashing time.
    texts = [f"bulky item {i}" + " " * 8000 if 2500 <= i < 2600 else f"item {i}" for i in range(5000)]
    out = provider(fake).embed(texts)

    sent = fake.inputs()
    assert [len(b) for b in sent] == [len(b) for b in request_batches(texts)] == [2048, 488, 37, 2048, 379]
    assert [x for batch in sent for x in batch] == texts  # nothing lost, duplicated or reordered
    assert all(1 <= len(b) <= MAX_INPUTS_PER_REQUEST for b in sent)
    assert all(sum(map(nbytes, b)) <= MAX_BYTES_PER_REQUEST for b in sent)
    assert max(len(b) for b in sent) == MAX_INPUTS_PER_REQUEST  # the count cap was exercised ...
    assert max(sum(map(nbytes, b)) for b in sent) > MAX_BYTES_PER_REQUEST - 8192  # ... and the byte cap
    assert out.shape == (5000, 1536)
    sample = [0, 2047, 2048, 2500, 2599, 4999]
    assert np.array_equal(out[sample], HashProvider(1536).embed([texts[i] for i in sample]))


# -- request_batches and truncate_utf8 ---------------------------------------------------------------------

_CHARS = st.sampled_from(["a", "é", "€", "😀", " "])  # 1, 2, 3, 4 and 1 bytes


def _check_batches(texts: list[str]) -> None:
    batches = request_batches(texts)
    assert [t for b in batches for t in b] == texts
    for b in batches:
        assert 1 <= len(b) <= MAX_INPUTS_PER_REQUEST
        assert sum(map(nbytes, b)) <= MAX_BYTES_PER_REQUEST
    for prev, nxt in itertools.pairwise(batches):  # greedy: a batch ends only when it must
        assert len(prev) == MAX_INPUTS_PER_REQUEST or sum(map(nbytes, prev)) + nbytes(nxt[0]) > MAX_BYTES_PER_REQUEST


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=300))
def test_request_batches_small_inputs(texts: list[str]) -> None:
    _check_batches(texts)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(
        st.tuples(st.integers(1, MAX_BYTES_PER_INPUT // 4), _CHARS, st.integers(1, 1500)), min_size=1, max_size=6
    )
)
@example(blocks=[(1, "a", 5000)])
@example(blocks=[(8192, "a", 37), (1, "a", 2047)])
@example(blocks=[(2048, "😀", 40)])
def test_request_batches_never_exceed_the_api_limits(blocks: list[tuple[int, str, int]]) -> None:
    # Runs of equal texts (k characters, <= 8192 bytes each) so that both caps are reached.
    texts: list[str] = []
    for k, ch, reps in blocks:
        text = truncate_utf8(ch * k)
        texts.extend([text] * reps)
    _check_batches(texts)


def test_request_batches_of_nothing() -> None:
    assert request_batches([]) == []


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=60), limit=st.integers(0, 200))
@example(text="aé€😀", limit=2)
@example(text="€€", limit=5)
@example(text="😀", limit=3)
def test_truncate_utf8_never_splits_a_character(text: str, limit: int) -> None:
    out = truncate_utf8(text, limit)
    assert text.startswith(out)  # a prefix of whole characters: no U+FFFD, nothing mangled
    assert nbytes(out) <= limit
    if out != text:  # and the longest such prefix
        assert nbytes(out) + nbytes(text[len(out)]) > limit
    else:
        assert nbytes(text) <= limit


def test_truncate_utf8_default_limit() -> None:
    assert truncate_utf8("x" * 8192) == "x" * 8192
    assert truncate_utf8("é" * 5000) == "é" * 4096


# -- HashProvider -----------------------------------------------------------------------------------------

_HASH_SNIPPET = """
import hashlib, sys
from myshop_ops.adapters.embeddings import HashProvider
v = HashProvider(1536).embed_one(sys.argv[1])
print(hashlib.sha256(v.tobytes()).hexdigest(), v.dtype, v.shape)
"""


def test_hash_provider_is_deterministic_across_processes_and_hash_seeds() -> None:
    text = "Grüner Tee für Läufer: running shoes, size 42"
    v = HashProvider(1536).embed_one(text)
    expected = f"{hashlib.sha256(v.tobytes()).hexdigest()} float32 (1536,)"
    env = {k: val for k, val in os.environ.items() if k != "PYTHONHASHSEED"}
    seen = set()
    for seed in ("1", "4242"):
        r = subprocess.run(
            [sys.executable, "-c", _HASH_SNIPPET, text],
            env={**env, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        seen.add(r.stdout.strip())
    assert seen == {expected}


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=80), dim=st.sampled_from([8, 384, 1536]))
def test_hash_provider_unit_norm_or_permanent_error(text: str, dim: int) -> None:
    hp = HashProvider(dim)
    try:
        v = hp.embed_one(text)
    except EmbeddingError as exc:  # only texts without any word may be refused
        assert exc.transient is False
        assert not any(c.isalnum() for c in text)
        return
    assert v.dtype == np.float32 and v.shape == (dim,)
    assert np.isfinite(v).all()
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    assert np.array_equal(v, hp.embed_one(text))


@pytest.mark.parametrize("text", ["", "   ", "\t\n", "!?-—", "___"])
def test_hash_provider_refuses_texts_without_words(text: str) -> None:
    with pytest.raises(EmbeddingError) as ei:
        HashProvider(384).embed_one(text)
    assert ei.value.transient is False
    with pytest.raises(EmbeddingError):
        HashProvider(384).embed(["green tea", text])


def test_hash_provider_embeds_nothing_as_an_empty_matrix() -> None:
    out = HashProvider(384).embed([])
    assert out.shape == (0, 384) and out.dtype == np.float32


# -- PhraseEmbedder ---------------------------------------------------------------------------------------


class DictCache:
    """A shared-cache stand-in (Redis in production): a dict plus a log of calls and when they happened."""

    def __init__(self, server: FakeOpenAI):
        self.server = server
        self.data: dict[str, bytes] = {}
        self.calls: list[tuple[str, object, int]] = []  # (method, argument, server requests so far)

    def get_vectors(self, keys):
        self.calls.append(("get", list(keys), len(self.server.requests)))
        return [self.data.get(k) for k in keys]

    def set_vectors(self, items, ttl):
        self.calls.append(("set", (dict(items), ttl), len(self.server.requests)))
        self.data.update(items)


def test_phrases_differing_in_case_and_whitespace_share_one_entry(fake: FakeOpenAI) -> None:
    pe = PhraseEmbedder(provider(fake), None, ttl=60)
    phrases = ["Running Shoes", "running   shoes", "  RUNNING\tshoes ", "green tea"]
    out = pe.embed(phrases)
    assert set(out) == set(phrases)
    assert len({pe.key(p) for p in phrases[:3]}) == 1
    assert fake.inputs() == [["running shoes", "green tea"]]  # one request, normalised, no duplicates
    assert (pe.provider_calls, pe.provider_texts) == (1, 2)
    expected = HashProvider(1536).embed_one("running shoes")
    for p in phrases[:3]:
        assert np.array_equal(out[p], expected)


def test_second_call_is_served_by_the_lru_without_the_provider(fake: FakeOpenAI) -> None:
    pe = PhraseEmbedder(provider(fake), None, ttl=60)
    first = pe.embed(["running shoes", "green tea"])
    assert len(fake.requests) == 1
    second = pe.embed(["Green Tea", "running shoes"])
    assert len(fake.requests) == 1
    assert pe.provider_calls == 1
    assert np.array_equal(second["Green Tea"], first["green tea"])
    assert np.array_equal(second["running shoes"], first["running shoes"])


def test_lru_evicts_the_least_recently_used_phrase(fake: FakeOpenAI) -> None:
    pe = PhraseEmbedder(provider(fake), None, ttl=60, lru_size=2)
    pe.embed(["alpha"])
    pe.embed(["beta"])
    pe.embed(["alpha"])  # alpha is now the most recent
    pe.embed(["gamma"])  # evicts beta
    assert fake.inputs() == [["alpha"], ["beta"], ["gamma"]]
    pe.embed(["alpha", "gamma"])
    assert len(fake.requests) == 3
    pe.embed(["beta"])
    assert fake.inputs()[-1] == ["beta"]


def test_shared_cache_is_consulted_before_the_provider_and_written_after(fake: FakeOpenAI) -> None:
    cache = DictCache(fake)
    pe = PhraseEmbedder(provider(fake), cache, ttl=1234)
    planted = HashProvider(1536).embed_one("something else entirely")  # distinguishable from the provider's
    cache.data[pe.key("cached phrase")] = planted.astype("<f4").tobytes()

    out = pe.embed(["Cached  Phrase", "fresh phrase"])

    assert np.array_equal(out["Cached  Phrase"], planted)  # from the shared cache, not re-embedded
    assert np.array_equal(out["fresh phrase"], HashProvider(1536).embed_one("fresh phrase"))
    assert fake.inputs() == [["fresh phrase"]]
    (get, getkeys, before), (set_, (items, ttl), after) = cache.calls
    assert (get, set_) == ("get", "set")
    assert sorted(getkeys) == sorted([pe.key("cached phrase"), pe.key("fresh phrase")])
    assert (before, after) == (0, 1)  # read before the provider call, written after it
    assert list(items) == [pe.key("fresh phrase")] and ttl == 1234
    assert np.frombuffer(items[pe.key("fresh phrase")], "<f4").tolist() == out["fresh phrase"].tolist()

    # A second worker (empty LRU) sharing the cache needs no provider call at all.
    other = PhraseEmbedder(provider(fake), cache, ttl=1234)
    again = other.embed(["fresh phrase", "cached phrase"])
    assert len(fake.requests) == 1 and other.provider_calls == 0
    assert np.array_equal(again["cached phrase"], planted)
    assert [c[0] for c in cache.calls] == ["get", "set", "get"]


def test_shared_cache_entry_of_the_wrong_size_is_ignored(fake: FakeOpenAI) -> None:
    cache = DictCache(fake)
    pe = PhraseEmbedder(provider(fake), cache, ttl=60)
    cache.data[pe.key("green tea")] = np.ones(384, "<f4").tobytes()  # from a 384-d space
    out = pe.embed(["green tea"])
    assert fake.inputs() == [["green tea"]]
    assert np.array_equal(out["green tea"], HashProvider(1536).embed_one("green tea"))


def test_cache_identity_uses_full_unicode_case_folding() -> None:
    pe = PhraseEmbedder(HashProvider(384), None, ttl=60)
    assert pe.key("STRASSE") == pe.key("Straße")


# -- the fake server itself (so that it keeps catching what the real API would refuse) -------------------


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"input": []}, 400),
        ({"input": [""]}, 400),
        ({"input": ["x"] * 2049}, 400),
        ({"input": ["word " * 8193]}, 400),
        ({"input": ["w " * 8000] * 38}, 400),  # 304k tokens in one request
        ({"input": ["x"], "dimensions": 0}, 400),
        ({"input": ["x"], "dimensions": 1537}, 400),
        ({"input": ["x"], "model": "text-embedding-ada-002", "dimensions": 512}, 400),
        ({"input": ["x"], "model": "no-such-model"}, 404),
    ],
    ids=[
        "empty",
        "empty-string",
        "2049-inputs",
        "8193-tokens",
        "300k-tokens",
        "dims-0",
        "dims-1537",
        "ada-dims",
        "unknown-model",
    ],
)
def test_fake_server_refuses_what_the_api_refuses(fake: FakeOpenAI, kwargs: dict, status: int) -> None:
    client = openai.OpenAI(base_url=fake.base_url, api_key="test-key", max_retries=0, timeout=5)
    with pytest.raises(openai.APIStatusError) as ei:
        client.embeddings.create(**{"model": "text-embedding-3-small", **kwargs})
    assert ei.value.status_code == status
    assert set(ei.value.body) >= {"message", "type", "param", "code"}  # the SDK unwraps {"error": {...}}


def test_fake_server_float_format_large_model_and_token_arrays(fake: FakeOpenAI) -> None:
    client = openai.OpenAI(base_url=fake.base_url, api_key="test-key", max_retries=0, timeout=5)
    r = client.embeddings.create(model="text-embedding-3-large", input="green tea", encoding_format="float")
    assert fake.requests[-1]["body"]["encoding_format"] == "float"
    assert np.array_equal(np.asarray(r.data[0].embedding, np.float32), HashProvider(3072).embed_one("green tea"))
    r = client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3], [4]])
    assert [len(d.embedding) for d in r.data] == [1536, 1536]
    assert r.usage.prompt_tokens == 4


def test_fake_server_runs_as_a_module_and_prints_ready() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_openai", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("READY http://127.0.0.1:") and line.endswith("/v1")
        base_url = line.split(" ", 1)[1]
        out = OpenAIProvider(make_settings(base_url), timeout=5, max_retries=0).embed(["green tea"])
        assert np.array_equal(out[0], HashProvider(1536).embed_one("green tea"))
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_only_openai_and_hash_are_providers_a_self_hosted_model_is_openai_with_a_base_url():
    with pytest.raises(ConfigError, match="EMBEDDING_PROVIDER='local' is invalid"):
        load_settings({"EMBEDDING_PROVIDER": "local"}, None)
    with pytest.raises(ConfigError, match="a self-hosted model: openai with OPENAI_BASE_URL"):
        load_settings({"APP_ENV": "prod", "EMBEDDING_PROVIDER": "hash"}, None)
    s = load_settings({"EMBEDDING_PROVIDER": "openai", "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://127.0.0.1:1/v1",
                       "OPENAI_EMBEDDING_MODEL": "bge-small-en-v1.5", "EMBEDDING_DIMENSIONS": "384"}, None)
    assert s.model == "bge-small-en-v1.5" and make_provider(s).dimensions == 384


# -- one bad input hurts no one but itself ------------------------------------------------------------------
# Every vector is checked (usable_vector) wherever it comes in; a refused one fails its own input only and is never
# cached; a request refused as a whole is split until only the refused inputs fail.


def test_nan_for_one_phrase_fails_only_it_is_never_cached_and_is_embedded_fresh_after_recovery(
        fake: FakeOpenAI) -> None:
    cache = DictCache(fake)
    pe = PhraseEmbedder(provider(fake), cache, ttl=3600)
    fake.answer("poison phrase", "nan")
    out = pe.embed(["Poison phrase", "green tea", "running shoes"])
    assert isinstance(out["Poison phrase"], InputRefused) and "NaN" in str(out["Poison phrase"])
    assert np.array_equal(out["green tea"], HashProvider(1536).embed_one("green tea"))
    assert np.array_equal(out["running shoes"], HashProvider(1536).embed_one("running shoes"))
    assert set(cache.data) == {pe.key("green tea"), pe.key("running shoes")}  # not in Redis
    assert pe._lru.take([pe.key("poison phrase")])[1] == [pe.key("poison phrase")]  # nor in-process

    fake.clear()  # the provider recovered: the phrase, and any spelling of it, is embedded fresh
    again = pe.embed(["Poison  PHRASE", "green tea"])
    assert fake.inputs() == [["poison phrase"]]
    assert np.array_equal(again["Poison  PHRASE"], HashProvider(1536).embed_one("poison phrase"))
    assert np.frombuffer(cache.data[pe.key("poison phrase")], "<f4").tolist() == again["Poison  PHRASE"].tolist()


@pytest.mark.parametrize(("fault", "reason"), [
    ("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("huge", "length 1e+30"), ("zero", "zero vector"),
    ("short", "768-d vector, EMBEDDING_DIMENSIONS is 1536"), ("missing", "0 vectors for this input"),
])
def test_an_unusable_vector_is_refused_for_its_input_only_with_a_reason(fake: FakeOpenAI, fault: str,
                                                                         reason: str) -> None:
    fake.answer("bad one", fault)
    texts = ["green tea", "bad one", "running shoes"]
    got = embed_each(provider(fake), texts)
    assert isinstance(got[1], InputRefused) and got[1].transient is False and reason in str(got[1])
    assert np.array_equal(np.stack([got[0], got[2]]), HashProvider(1536).embed(["green tea", "running shoes"]))
    assert len(fake.requests) == 1


def test_a_1e30_reply_is_refused_not_folded_in(fake: FakeOpenAI) -> None:
    fake.answer("huge", "huge")
    with pytest.raises(InputRefused, match=r"length 1e\+30, outside \[0.001, 1000\]"):
        provider(fake).embed(["huge"])


def test_a_vector_of_any_length_within_the_band_is_scaled_to_one_and_unit_ones_are_kept_bit_for_bit() -> None:
    v = HashProvider(64).embed_one("green tea")
    assert usable_vector(v, 64) is not v and np.array_equal(usable_vector(v, 64), v)
    assert np.allclose(usable_vector(v * 37.5, 64), v, atol=1e-6)  # a model that does not normalise
    assert "outside" in usable_vector(v * 1e4, 64) and "outside" in usable_vector(v * 1e-4, 64)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(
    st.lists(st.floats(width=32) | st.floats(), max_size=10),
    st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=10),
    st.lists(st.lists(st.floats(), max_size=3), max_size=3),
    st.text(max_size=5), st.none(), st.binary(max_size=12),
    st.dictionaries(st.text(max_size=2), st.floats(), max_size=2),
))
def test_usable_vector_is_total_a_unit_vector_of_the_size_or_a_reason(value: object) -> None:
    got = usable_vector(value, 4)
    if isinstance(got, str):
        return
    assert got.dtype == np.float32 and got.shape == (4,) and np.isfinite(got).all()
    assert abs(float(np.linalg.norm(got.astype(np.float64))) - 1.0) <= 2e-3


def test_one_refused_input_among_14_is_found_by_splitting_and_the_13_others_get_vectors(fake: FakeOpenAI) -> None:
    texts = [f"phrase number {i}" for i in range(14)]
    fake.answer("phrase number 9", "400")
    got = embed_each(provider(fake), texts)
    assert [i for i, g in enumerate(got) if isinstance(g, EmbeddingError)] == [9]
    assert isinstance(got[9], InputRefused) and "(400)" in str(got[9])
    expected = HashProvider(1536).embed(texts[:9] + texts[10:])
    assert np.array_equal(np.stack(got[:9] + got[10:]), expected)
    assert len(fake.requests) == 1 + 2 * 4  # halving 14 -> 7 -> 4 -> 2 -> 1: two requests per halving


def test_a_refusal_naming_another_parameter_concerns_every_input_and_is_not_split(fake: FakeOpenAI) -> None:
    p = provider(fake, OPENAI_EMBEDDING_MODEL="text-embedding-ada-002", EMBEDDING_DIMENSIONS="512")
    got = embed_each(p, TEXTS)
    assert all(isinstance(g, EmbeddingError) and not g.transient and "(400)" in str(g) for g in got)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("fault", ["429", "500", "503", "timeout"])
def test_a_transient_failure_of_a_request_is_transient_for_each_of_its_inputs(fake: FakeOpenAI, fault: str) -> None:
    fake.answer("slow one", fault, delay_s=1.0)
    p = OpenAIProvider(make_settings(fake.base_url), timeout=0.3, max_retries=0)
    got = embed_each(p, ["green tea", "slow one"])
    assert all(isinstance(g, EmbeddingError) and g.transient for g in got)
    assert len(fake.requests) == 1  # a transient failure is not split: the request is retried later


@pytest.mark.parametrize("poison", [
    np.full(1536, np.nan, "<f4").tobytes(), (np.ones(1536, "<f4") * 1e30).tobytes(), np.zeros(1536, "<f4").tobytes(),
], ids=["nan", "huge", "zero"])
def test_a_poisoned_shared_cache_entry_is_ignored_re_embedded_and_overwritten(fake: FakeOpenAI, poison: bytes) -> None:
    cache = DictCache(fake)
    pe = PhraseEmbedder(provider(fake), cache, ttl=60)
    cache.data[pe.key("green tea")] = poison
    out = pe.embed(["Green Tea"])
    expected = HashProvider(1536).embed_one("green tea")
    assert fake.inputs() == [["green tea"]] and np.array_equal(out["Green Tea"], expected)
    assert cache.data[pe.key("green tea")] == expected.astype("<f4").tobytes()


@pytest.mark.parametrize("text", ["!!!", "   ", "___"])
def test_the_hash_providers_no_words_refusal_is_per_input(text: str) -> None:
    got = embed_each(HashProvider(64), ["green tea", text, "hats"])
    assert isinstance(got[1], InputRefused) and "no words" in str(got[1])
    assert np.array_equal(np.stack([got[0], got[2]]), HashProvider(64).embed(["green tea", "hats"]))


class _Reply:
    def __init__(self, data: object):
        self.data = data


class _Item:
    def __init__(self, index: object, embedding: object):
        self.index, self.embedding = index, embedding


_EMBEDDINGS = st.one_of(
    st.builds(lambda v: base64.b64encode(np.asarray(v, "<f4").tobytes()).decode(),
              st.lists(st.floats(width=32), min_size=0, max_size=6)),
    st.lists(st.floats(), max_size=6), st.text(max_size=8), st.none(), st.integers(), st.binary(max_size=8),
    st.lists(st.one_of(st.none(), st.text(max_size=2), st.integers()), max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 5), items=st.lists(st.tuples(st.one_of(st.integers(-2, 6), st.none(), st.booleans(),
                                                                st.text(max_size=2)), _EMBEDDINGS), max_size=8))
def test_reply_rows_is_total_one_result_per_input(n: int, items: list) -> None:
    rows = reply_rows(_Reply([_Item(i, e) for i, e in items] + ["not an item"]), n)
    assert len(rows) == n
    for row in rows:
        assert isinstance(row, InputRefused | np.ndarray)
        checked = row if isinstance(row, InputRefused) else usable_vector(row, 4)
        assert isinstance(checked, InputRefused | str | np.ndarray)
    with pytest.raises(EmbeddingError):
        reply_rows(_Reply(None), n)


class _Refusing(HashProvider):
    """Refuses as a whole (RequestRefused) every request holding one of ``refused``; counts requests."""

    def __init__(self, refused: set[str]):
        super().__init__(8)
        self.refused, self.requests = refused, 0

    def embed_request(self, texts):
        self.requests += 1
        if self.refused & set(texts):
            raise RequestRefused("embeddings provider refused (400): bad input")
        return super().embed_request(texts)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 40))
def test_splitting_finds_exactly_the_refused_inputs_within_2n_minus_2_extra_requests(data, n: int) -> None:
    texts = [f"text {i}" for i in range(n)]
    refused = set(data.draw(st.lists(st.sampled_from(texts), max_size=n)))
    p = _Refusing(refused)
    got = embed_each(p, texts)
    assert [t for t, g in zip(texts, got, strict=True) if isinstance(g, InputRefused)] == [
        t for t in texts if t in refused]
    assert all(isinstance(g, np.ndarray) for t, g in zip(texts, got, strict=True) if t not in refused)
    assert p.requests - 1 <= 2 * (n - 1)
    if len(refused) == 1:
        assert p.requests - 1 <= 2 * math.ceil(math.log2(n))
