"""An OpenAI-compatible ``/v1/embeddings`` server for tests: stdlib HTTP, numpy, hashing vectors.

Tests drive the REAL ``openai`` SDK over real HTTP against it (never a transport mock: openai 3.x moved
from ``httpx`` to ``httpx2``, so transport mocks are tied to one SDK major version; a socket is not).

* Binds 127.0.0.1 only, port 0 by default; ``base_url`` is ``http://127.0.0.1:PORT/v1``.
* Models: ``text-embedding-3-small`` (1536), ``text-embedding-ada-002`` (1536, rejects ``dimensions``),
  ``text-embedding-3-large`` (3072). Vectors are ``HashProvider(dim).embed_one(text)``, so the SDK's
  decoded vectors are bit-identical to the offline ``hash`` provider at the same dimension.
* ``dimensions`` truncates and L2-renormalises (what text-embedding-3 returns); ``encoding_format``
  ``base64`` (float32 little-endian, what the SDK sends by default) or ``float`` (the API default).
* Validation as the real API: empty input 400, > 2048 inputs 400, > 8192 tokens per input or > 300k per
  request 400 (see ``estimate_tokens``), unknown model 404, bad key 401, bad ``dimensions`` /
  ``encoding_format`` 400. Error bodies are ``{"error": {message, type, param, code}}`` with an
  ``x-request-id`` header.
* ``requests`` records every POST (``{"body", "headers", "path"}``, header names lower-cased), including
  the ones refused; ``fail_next(...)`` queues faults; ``answer(text, fault)`` answers one input badly in every
  request that holds it (its own vector NaN, infinite, ~1e30, zero, half size or missing; or the whole request
  refused with 400, 429 or 5xx, or slow); ``clear()`` forgets all three.

Run ``python -m tests.support.fake_openai --port N`` (from the repository root) for a demo server; it
prints ``READY <base_url>`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
import signal
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from myshop_ops.adapters.embeddings import EmbeddingError, HashProvider

MAX_INPUTS = 2048
MAX_TOKENS_PER_INPUT = 8192
MAX_TOKENS_PER_REQUEST = 300_000
DEFAULT_MODELS = {"text-embedding-3-small": 1536, "text-embedding-ada-002": 1536, "text-embedding-3-large": 3072}
NO_DIMENSIONS = frozenset({"text-embedding-ada-002"})

_PIECE = re.compile(r"\w+|[^\w\s]")
VECTOR_FAULTS = frozenset({"nan", "inf", "huge", "zero", "short", "missing"})  # one input's own vector
REQUEST_FAULTS = frozenset({"400", "429", "500", "503", "timeout"})  # every request holding the input


def estimate_tokens(text: str) -> int:
    """A rough token count: each word or symbol is ceil(chars/4) tokens, at least 1.

    It never exceeds the UTF-8 byte length, so a client that bounds bytes (as ``request_batches``
    does) never trips the server's limits, and a client that sends more bytes than allowed may.
    """
    return sum(max(1, math.ceil(len(p) / 4)) for p in _PIECE.findall(text))


def _vector(backend: HashProvider, text: str) -> np.ndarray:
    try:
        return backend.embed_one(text)
    except EmbeddingError:
        # The real API embeds any non-empty string; HashProvider refuses texts without words
        # ("!!!", "   "). Give those a deterministic vector of their bytes instead of an error.
        return backend.embed_one("nowords " + text.encode().hex())


def _shorten(v: np.ndarray, dims: int, texts: list[str]) -> np.ndarray:
    """The first ``dims`` coordinates, L2-renormalised (what text-embedding-3 does for ``dimensions``).

    Hash vectors are sparse, so a short prefix can be all zeros; such a row becomes a deterministic
    one-hot vector (the API never returns a zero vector).
    """
    out = v[:, :dims].astype(np.float64)
    norms = np.linalg.norm(out, axis=1)
    for i in np.flatnonzero(norms == 0.0):
        out[i, zlib.crc32(texts[i].encode()) % dims] = 1.0
        norms[i] = 1.0
    return (out / norms[:, None]).astype(np.float32)


def _faulty_rows(rows: list[np.ndarray], answers: list[tuple[int, str, float]]) -> list[np.ndarray | None]:
    """``rows`` with the vector faults of ``answers`` applied (None: the row is left out of ``data``)."""
    out: list[np.ndarray | None] = list(rows)
    for i, fault, _ in answers:
        row = rows[i].copy()
        if fault == "nan":
            row[:] = np.nan
        elif fault == "inf":
            row[0] = np.inf
        elif fault == "huge":
            row *= np.float32(1e30)
        elif fault == "zero":
            row[:] = 0.0
        elif fault == "short":
            row = row[: len(row) // 2]
        elif fault == "missing":
            row = None
        out[i] = row
    return out


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that gave up (timeout tests) leave broken pipes behind; they are expected.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            super().handle_error(request, client_address)


class FakeOpenAI:
    """An in-process OpenAI-compatible embeddings server.

    ``dimensions`` changes the native size of the served models: an int applies to every model, a
    mapping ``{model_id: dim}`` overrides or adds models (e.g. ``{"all-minilm-l6-v2": 384}``).
    ``api_key=None`` accepts any (or no) key.
    """

    def __init__(
        self,
        api_key: str | None = "test-key",
        host: str = "127.0.0.1",
        port: int = 0,
        dimensions: int | Mapping[str, int] | None = None,
    ):
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"FakeOpenAI binds the loopback only (127.0.0.1), not {host!r}")
        native = dict(DEFAULT_MODELS)
        if isinstance(dimensions, int):
            native = dict.fromkeys(native, dimensions)
        elif dimensions is not None:
            native.update(dimensions)
        if any(not isinstance(d, int) or d < 1 for d in native.values()):
            raise ValueError(f"model dimensions must be positive ints: {native}")
        self.api_key = api_key
        self.models: dict[str, HashProvider] = {m: HashProvider(d) for m, d in native.items()}
        self.no_dimensions = set(NO_DIMENSIONS)
        self.requests: list[dict[str, Any]] = []
        self.reverse_data = False  # answer with ``data`` in reverse index order (clients must sort)
        self.on_request: Callable[[Any], None] | None = None  # called with each parsed body before answering
        self.quote_key: str | None = None  # "full" or "partial": a 401 quotes the key it was sent (see ``refusal``)
        self._faults: deque[tuple[int, dict[str, str], float]] = deque()
        self._answers: dict[str, tuple[str, float]] = {}  # input text -> (fault, delay_s), see ``answer``
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._httpd = _QuietServer(("127.0.0.1", port), self._make_handler())

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(
        self,
        status: int,
        *,
        retry_after: float | str | None = None,
        retry_after_ms: float | str | None = None,
        delay_s: float = 0.0,
        times: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``times`` authorised requests sleep ``delay_s``, then answer ``status`` with an error
        body (or, for status 200, are served normally after the delay)."""
        h = dict(headers or {})
        if retry_after is not None:
            h["retry-after"] = str(retry_after)
        if retry_after_ms is not None:
            h["retry-after-ms"] = str(retry_after_ms)
        with self._lock:
            self._faults.extend([(status, h, delay_s)] * times)

    def answer(self, text: str, fault: str, *, delay_s: float = 0.0) -> None:
        """From now on (until ``clear``), every request holding the input ``text`` (as sent) answers it with
        ``fault``. Its own vector (the other inputs' are served normally): "nan" (all NaN), "inf" (one infinite
        value), "huge" (times 1e30), "zero", "short" (half the size) or "missing" (no entry in ``data``). The whole
        request: "400" (refused naming that input, as a moderation filter or a tokenizer would), "429", "500",
        "503", or "timeout" (served normally after ``delay_s`` seconds)."""
        if fault not in VECTOR_FAULTS | REQUEST_FAULTS:
            raise ValueError(f"unknown fault {fault!r}: one of {sorted(VECTOR_FAULTS | REQUEST_FAULTS)}")
        with self._lock:
            self._answers[text] = (fault, delay_s)

    def pending_faults(self) -> int:
        """How many queued faults (``fail_next``) have not been served yet."""
        with self._lock:
            return len(self._faults)

    def refusal(self, authorization: str | None) -> str:
        """The 401 message: with ``quote_key``, quoting the key sent in full (a hostile or careless server) or
        as OpenAI does (``sk-proj-****...WXYZ``: a prefix, stars, the last four characters)."""
        key = (authorization or "").removeprefix("Bearer ")
        quoted = {"full": key, "partial": key[:8] + "*" * 36 + key[-4:]}.get(self.quote_key or "")
        if quoted is None:
            return "Incorrect API key provided"
        return f"Incorrect API key provided: {quoted}. You can find your API key at https://platform.openai.com/account/api-keys."

    def clear(self) -> None:
        """Forget recorded requests and pending faults (call it between tests on a shared server)."""
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self._answers.clear()
            self.reverse_data = False

    def inputs(self) -> list[list[Any]]:
        """The ``input`` of every recorded request, as a list."""
        out = []
        for r in self.requests:
            inp = r["body"].get("input") if isinstance(r["body"], dict) else None
            out.append([inp] if isinstance(inp, str) else list(inp or []))
        return out

    # -- the HTTP side ------------------------------------------------------------------------------

    def _make_handler(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go in two sends: ~45 ms per call without this
            server_version = "FakeOpenAI/1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("x-request-id", "req_" + uuid.uuid4().hex)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _err(
                self,
                status: int,
                message: str,
                etype: str = "invalid_request_error",
                param: str | None = None,
                code: str | None = None,
                headers: Mapping[str, str] | None = None,
            ) -> None:
                error = {"message": message, "type": etype, "param": param, "code": code}
                self._send(status, {"error": error}, headers)

            def do_GET(self) -> None:
                path = self.path.split("?")[0].rstrip("/")
                if path in ("/health", "/v1/health"):
                    return self._send(200, {"status": "ok"})
                if path == "/v1/models":
                    if not self._authorised():
                        return self._err(401, srv.refusal(self.headers.get("Authorization")), code="invalid_api_key")
                    data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in srv.models]
                    return self._send(200, {"object": "list", "data": data})
                return self._err(404, f"Unknown request URL: GET {self.path}", code="unknown_url")

            def _authorised(self) -> bool:
                return srv.api_key is None or self.headers.get("Authorization") == f"Bearer {srv.api_key}"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body: Any = json.loads(raw or b"{}")
                except ValueError:
                    body = None
                with srv._lock:
                    srv.requests.append(
                        {
                            "body": body,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "path": self.path,
                            "at": time.monotonic(),
                        }
                    )
                if srv.on_request is not None:
                    srv.on_request(body)
                if self.path.split("?")[0].rstrip("/") != "/v1/embeddings":
                    return self._err(404, f"Unknown request URL: POST {self.path}", code="unknown_url")
                if not self._authorised():
                    return self._err(401, srv.refusal(self.headers.get("Authorization")), code="invalid_api_key")
                with srv._lock:
                    fault = srv._faults.popleft() if srv._faults else None
                if fault is not None:
                    status, hdrs, delay = fault
                    if delay:
                        time.sleep(delay)
                    if status != 200:
                        etype = (
                            "server_error"
                            if status >= 500
                            else "requests"
                            if status == 429
                            else "invalid_request_error"
                        )
                        code = "rate_limit_exceeded" if status == 429 else None
                        return self._err(status, f"fake fault {status}", etype, code=code, headers=hdrs)
                try:
                    self._embeddings(body)
                except (BrokenPipeError, ConnectionResetError):
                    raise
                except Exception as exc:  # a bug in the fake must not hang the client
                    self._err(500, f"fake server error: {type(exc).__name__}: {exc}", "server_error")

            def _request_fault(self, answers: list[tuple[int, str, float]]) -> bool:
                """Answer the request as its inputs' request faults say (``answer``); False: serve it."""
                for i, fault, delay in answers:
                    if fault == "timeout":
                        time.sleep(delay)
                    elif fault == "400":
                        self._err(400, f"input[{i}] was refused by the fake's filter", param="input")
                        return True
                    elif fault in REQUEST_FAULTS:
                        status = int(fault)
                        etype = "requests" if status == 429 else "server_error"
                        self._err(status, f"fake fault {status} for input[{i}]", etype,
                                  headers={"retry-after-ms": "1"})
                        return True
                return False

            def _embeddings(self, body: Any) -> None:
                if not isinstance(body, dict):
                    return self._err(400, "We could not parse the JSON body of your request.")
                model = body.get("model")
                if not isinstance(model, str) or not model:
                    return self._err(400, "you must provide a model parameter", param="model")
                if model not in srv.models:
                    return self._err(
                        404,
                        f"The model `{model}` does not exist or you do not have access to it.",
                        param="model",
                        code="model_not_found",
                    )
                inp = body.get("input")
                tokens_array = (
                    isinstance(inp, list)
                    and bool(inp)
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in inp)
                )
                items = [inp] if isinstance(inp, str) or tokens_array else inp
                if not isinstance(items, list) or not items:
                    return self._err(400, "'input' must be a non-empty string or array", param="input")
                if len(items) > MAX_INPUTS:
                    return self._err(
                        400, f"'input' must have at most {MAX_INPUTS} items, got {len(items)}", param="input"
                    )
                texts: list[str] = []
                total = 0
                for i, it in enumerate(items):
                    if isinstance(it, str):
                        if it == "":
                            return self._err(400, f"'input[{i}]' cannot be an empty string", param="input")
                        n = estimate_tokens(it)
                        texts.append(it)
                    elif (
                        isinstance(it, list) and it and all(isinstance(x, int) and not isinstance(x, bool) for x in it)
                    ):
                        n = len(it)
                        texts.append("tok " + " ".join(map(str, it)))
                    else:
                        return self._err(400, f"'input[{i}]' must be a non-empty string or token array", param="input")
                    if n > MAX_TOKENS_PER_INPUT:
                        return self._err(
                            400,
                            f"This model's maximum context length is {MAX_TOKENS_PER_INPUT} tokens, however you "
                            f"requested {n} tokens in input[{i}]",
                            param="input",
                        )
                    total += n
                if total > MAX_TOKENS_PER_REQUEST:
                    return self._err(
                        400,
                        f"Requested {total} tokens, max {MAX_TOKENS_PER_REQUEST} tokens per request",
                        param="input",
                        code="max_tokens_per_request",
                    )
                backend = srv.models[model]
                native = backend.dimensions
                dims = body.get("dimensions")
                if dims is not None:
                    if model in srv.no_dimensions:
                        return self._err(
                            400, f"This model does not support specifying dimensions: {model}", param="dimensions"
                        )
                    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= native:
                        return self._err(400, f"'dimensions' must be an integer in 1..{native}", param="dimensions")
                fmt = body.get("encoding_format", "float")
                if fmt not in ("float", "base64"):
                    return self._err(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
                with srv._lock:
                    answers = [(i, *srv._answers[t]) for i, t in enumerate(texts) if t in srv._answers]
                if self._request_fault(answers):
                    return
                v = np.stack([_vector(backend, t) for t in texts]).astype(np.float32)
                if dims is not None and dims != native:
                    v = _shorten(v, dims, texts)
                rows = _faulty_rows(list(v), answers)
                data = [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                        if fmt == "base64"
                        else row.tolist(),
                    }
                    for i, row in enumerate(rows)
                    if row is not None
                ]
                if srv.reverse_data:
                    data.reverse()
                self._send(
                    200,
                    {
                        "object": "list",
                        "data": data,
                        "model": model,
                        "usage": {"prompt_tokens": total, "total_tokens": total},
                    },
                )

        return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A fake OpenAI embeddings server on 127.0.0.1 (hashing vectors).")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    ap.add_argument("--api-key", default="test-key", help="the accepted key; '' accepts any")
    args = ap.parse_args(argv)
    server = FakeOpenAI(api_key=args.api_key or None, port=args.port).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(f"READY {server.base_url}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
