"""Settings from the environment and `.env`: parsed once, validated, secrets masked in every output."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values

from myshop_ops.base.contract import DEFAULT_WEIGHTS

DEV_DEFAULTS = {
    "RABBITMQ_DSN": "amqp://guest:guest@127.0.0.1:5672/%2f",
    "MONGODB_URL": "mongodb://127.0.0.1:27017/?directConnection=true",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
}
PROVIDER_MODELS = {"hash": "hash-v1"}
SECRET_VARS = frozenset({"OPENAI_API_KEY"})
APP_ENVS = ("prod", "dev", "test")
RECOMMEND_BACKENDS = ("numpy", "atlas")
STORE_LAYOUTS = ("shop", "compact")  # layout.LAYOUTS: the shop's PHP code reads the first, only myshop the second


class ConfigError(ValueError):
    """A setting is missing or invalid. ``str()`` is one line for the operator."""

    def __init__(self, var: str, value: str | None, allowed: str):
        self.var = var
        shown = "(unset)" if value is None else repr(mask(var, value))
        super().__init__(f"{var}={shown} is invalid: {allowed}")


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# query parameters that carry secrets: password=, tlsCertificateKeyFilePassword=, authMechanismProperties=..., token=
_SECRET_PARAM = re.compile(r"(?i)([?&;][^=&;#?]*(?:pass|secret|token|key|credential|authmechanismproperties)"
                           r"[^=&;#?]*=)[^&;#]*")


def mask_url(url: str) -> str:
    """The URL, URL list (RabbitMQ's comma-separated DSNs, MongoDB's multi-host URIs) or any text holding URLs,
    with every password and secret query parameter replaced by ``***``. Never parses: a password with unencoded
    ``/ ? # , @ :`` is masked too (everything up to the last ``@`` before the next URL is the user part)."""
    starts = [m.start() for m in _SCHEME.finditer(url)] or [0]
    pieces = [url[:starts[0]], *(url[a:b] for a, b in zip(starts, [*starts[1:], len(url)], strict=True))]
    return "".join(_mask_one(p) for p in pieces if p)


def _mask_one(url: str) -> str:
    scheme = _SCHEME.match(url)
    head, rest = (url[:scheme.end()], url[scheme.end():]) if scheme else ("", url)
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        rest = (userinfo.split(":", 1)[0] + ":***@" if ":" in userinfo else "***@") + rest
    return head + _SECRET_PARAM.sub(r"\1***", rest)


def mask_text(text: str) -> str:
    """Free text (an error message, a library's exception) with every URL in it masked."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: mask_url(m.group()), text)


def mask(var: str, value: str) -> str:
    """How a setting's value may be shown: keys hidden, passwords in URLs masked."""
    if var in SECRET_VARS or "KEY" in var or "SECRET" in var or "PASSWORD" in var:
        return f"***{value[-4:]}" if len(value) > 12 else "***"
    if "://" in value or var.endswith(("_URL", "_DSN")):
        return mask_url(value)
    return value


def _url_secrets(url: str) -> Iterator[str]:
    """The passwords and secret query parameter values of a URL or URL list (what mask_url hides)."""
    starts = [m.start() for m in _SCHEME.finditer(url)] or [0]
    for one in (url[a:b] for a, b in zip(starts, [*starts[1:], len(url)], strict=True)):
        rest = one[_SCHEME.match(one).end():] if _SCHEME.match(one) else one
        userinfo = rest.rpartition("@")[0]
        if ":" in userinfo:
            yield userinfo.split(":", 1)[1]
        yield from (m.group()[len(m.group(1)):] for m in _SECRET_PARAM.finditer(rest))


MIN_SECRET_CHARS = 4  # a shorter "secret" would mask ordinary words all over the output (and hides little)
PUBLIC_PASSWORDS = frozenset({"guest"})  # RabbitMQ's built-in default: public knowledge, and a common word in output
# an API key as providers quote it in part: a prefix, a run of * or ... and the key's last four characters
_PARTIAL = r"[\w-]*(?:\*|\.\.\.|\u2026)[\w*.\u2026-]*?{tail}(?![\w])"


class _Redactor:
    """The secrets of every Settings loaded in this process, each masked in any text handed to ``redact``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._masks: dict[str, str] = {}  # a form of a secret (as is, URL-decoded, JSON-escaped) -> what shows
        self._partials: dict[str, str] = {}  # a pattern of an API key's partial form -> what shows
        self._compiled: tuple[re.Pattern | None, dict[str, str], list[tuple[re.Pattern, str]]] = (None, {}, [])

    def remember(self, secrets: Iterator[tuple[str, str]]) -> None:
        with self._lock:
            for var, secret in secrets:
                if len(secret) < MIN_SECRET_CHARS or secret in PUBLIC_PASSWORDS:
                    continue
                shown = mask(var, secret) if var in SECRET_VARS else "***"  # a key's last 4 tell which key it is
                for form in (secret, unquote(secret), json.dumps(secret)[1:-1]):
                    if len(form) >= MIN_SECRET_CHARS:
                        self._masks[form] = shown
                if var in SECRET_VARS and len(secret) > 12:
                    self._partials[_PARTIAL.format(tail=re.escape(secret[-4:]))] = shown
            forms = sorted(self._masks, key=len, reverse=True)  # the longest form first: no half-masked secret
            exact = re.compile("|".join(map(re.escape, forms))) if forms else None
            self._compiled = (exact, dict(self._masks), [(re.compile(p), m) for p, m in self._partials.items()])

    def __call__(self, text: str) -> str:
        exact, masks, partials = self._compiled
        text = mask_text(text)
        if exact is not None:
            text = exact.sub(lambda m: masks[m.group()], text)
        for pattern, shown in partials:
            text = pattern.sub(shown, text)
        return text


redact = _Redactor()
"""``redact(text)``: text from outside (a provider's or broker's error, a database error, a reply) with every URL's
password masked and every secret of the settings loaded in this process (OPENAI_API_KEY, also in the partial forms
providers quote, and the passwords and secret parameters of every URL setting, as written, URL-decoded or
JSON-escaped) replaced by its mask. Applied wherever text leaves the process: the log formatters, ``cli.common.fail``
and ``shown``, JSON output, the failed copy's x-error-message and its failed_messages record."""


def _secrets(s: Settings) -> Iterator[tuple[str, str]]:
    """(variable, secret) of every secret value in ``s``."""
    if s.openai_api_key:
        yield "OPENAI_API_KEY", s.openai_api_key
    for var, url in (("RABBITMQ_DSN", s.rabbitmq_dsn), ("RABBITMQ_MANAGEMENT_URL", s.rabbitmq_management_url),
                     ("MONGODB_URL", s.mongodb_url), ("REDIS_URL", s.redis_url),
                     ("OPENAI_BASE_URL", s.openai_base_url)):
        yield from ((var, secret) for secret in _url_secrets(url or ""))


@dataclass(frozen=True)
class Settings:
    """Every setting of SPEC section 1, validated."""

    app_env: str = "dev"
    rabbitmq_dsn: str = DEV_DEFAULTS["RABBITMQ_DSN"]
    rabbitmq_queue_type: str = "quorum"
    rabbitmq_management_url: str | None = None
    queue: str = "user_embedding_updates"
    failed_queue: str = "failed"
    rabbitmq_binding_keys: tuple[str, ...] = ("user.embedding.update",)
    mongodb_url: str = DEV_DEFAULTS["MONGODB_URL"]
    mongodb_db: str = "myshop"
    redis_url: str = DEV_DEFAULTS["REDIS_URL"]
    redis_prefix: str = "myshop:"  # every Redis key of this deployment starts with it
    failed_retention_days: int = 30  # failed messages (queue and records) are kept this long; 0: until removed
    embedding_provider: str = "openai"
    openai_api_key: str | None = None
    openai_embedding_model: str = "text-embedding-3-small"
    openai_base_url: str | None = None
    embedding_dimensions: int = 1536
    decay_lambda: float = 0.023
    batch_enabled: bool = False
    batch_window: float = 5.0
    cache_ttl: int = 3600
    idempotency_ttl: int = 3600
    max_retries: int = 5
    retry_delay_ms: int = 5000
    log_format: str = "json"
    log_level: str = "info"
    recommend_backend: str = "numpy"
    atlas_vector_index: str = "product_embedding_index"
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    store_layout: str = "shop"  # how profiles and imported products are written (layout.py): shop | compact

    @property
    def retry_delays_ms(self) -> list[int]:
        """Delay of each retry attempt: WORKER_RETRY_DELAY doubled per attempt, capped at 60 s."""
        return [min(self.retry_delay_ms * 2**i, 60_000) for i in range(self.max_retries)]

    @property
    def model(self) -> str:
        """The model id that profiles and product vectors are tagged with (with ``embedding_dimensions``)."""
        return self.openai_embedding_model if self.embedding_provider == "openai" else PROVIDER_MODELS[
            self.embedding_provider
        ]

    def describe(self) -> dict[str, str]:
        """The effective settings for display, secrets masked."""
        shown = {
            "APP_ENV": self.app_env,
            "RABBITMQ_DSN": self.rabbitmq_dsn,
            "RABBITMQ_QUEUE_TYPE": self.rabbitmq_queue_type,
            "MONGODB_URL": self.mongodb_url,
            "MONGODB_DB": self.mongodb_db,
            "REDIS_URL": self.redis_url,
            "EMBEDDING_PROVIDER": self.embedding_provider,
            "OPENAI_API_KEY": self.openai_api_key or "",
            "OPENAI_EMBEDDING_MODEL": self.openai_embedding_model,
            "EMBEDDING_DIMENSIONS": str(self.embedding_dimensions),
            "RECOMMEND_BACKEND": self.recommend_backend,
            "ATLAS_VECTOR_INDEX": self.atlas_vector_index,
            "STORE_LAYOUT": self.store_layout,
        }
        return {k: mask(k, v) for k, v in shown.items()}


def _int(env: Mapping[str, str], var: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(var)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(var, raw, f"an integer in {lo}..{hi}") from None
    if not lo <= value <= hi:
        raise ConfigError(var, raw, f"an integer in {lo}..{hi}")
    return value


def _float(env: Mapping[str, str], var: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(var)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(var, raw, f"a number in {lo}..{hi}") from None
    if not lo <= value <= hi:
        raise ConfigError(var, raw, f"a number in {lo}..{hi}")
    return value


def _choice(env: Mapping[str, str], var: str, default: str, allowed: tuple[str, ...]) -> str:
    value = (env.get(var) or default).strip().lower()
    if value not in allowed:
        raise ConfigError(var, env.get(var), "one of " + ", ".join(allowed))
    return value


def _bool(env: Mapping[str, str], var: str, default: bool) -> bool:
    raw = env.get(var)
    if raw is None or raw == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(var, raw, "true or false")


_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_ROUTING_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,255}$")


def _url(env: Mapping[str, str], var: str, schemes: tuple[str, ...], prod: bool, required: bool = True) -> str | None:
    raw = (env.get(var) or "").strip()
    if not raw:
        if prod and required:
            raise ConfigError(var, None, "required when APP_ENV=prod (no default in production)")
        return DEV_DEFAULTS.get(var) if required else None
    for one in raw.split(","):
        try:
            parts = urlsplit(one.strip())
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ConfigError(var, raw, "a URL like " + schemes[0] + "://host:port") from None
        if parts.scheme not in schemes or not parts.hostname:
            raise ConfigError(var, raw, "a URL with scheme " + " or ".join(schemes) + " and a host")
    return raw


ENV_FILE_VAR = "MYSHOP_ENV_FILE"  # the settings file; `myshop --env-file PATH` sets it
SYSTEM_ENV_FILE = Path("/etc/myshop/myshop.env")  # the file the systemd units, supervisor and the checklist use


class _Discover:
    def __repr__(self) -> str:
        return "DISCOVER"


DISCOVER = _Discover()  # env_file default: settings_file() decides


def settings_file(env: Mapping[str, str] | None = None) -> Path | None:
    """The settings file: MYSHOP_ENV_FILE (which must exist), else /etc/myshop/myshop.env when it exists, else
    none. Never a `.env` of the current directory: a directory handed to an operator must not be able to set
    OPENAI_BASE_URL (and receive the API key) or any other unset variable."""
    explicit = ((os.environ if env is None else env).get(ENV_FILE_VAR) or "").strip()
    if explicit:
        if not Path(explicit).is_file():
            raise ConfigError(ENV_FILE_VAR, explicit, "an existing settings file of KEY=value lines (--env-file)")
        return Path(explicit)
    return SYSTEM_ENV_FILE if SYSTEM_ENV_FILE.is_file() else None


def _redis_prefix(e: Mapping[str, str]) -> str:
    value = (e.get("REDIS_KEY_PREFIX") or "myshop:").strip()
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value):
        raise ConfigError("REDIS_KEY_PREFIX", value, "letters, digits and _ . : - (1..64 characters), e.g. myshop:")
    return value


def merged_env(env: Mapping[str, str] | None = None, env_file: str | Path | _Discover | None = DISCOVER
               ) -> dict[str, str]:
    """``env`` (default: the process environment) over the values of ``env_file`` (default: settings_file())."""
    if isinstance(env_file, _Discover):
        env_file = settings_file(env)
    merged: dict[str, str] = {}
    if env_file:
        try:
            merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(ENV_FILE_VAR, str(env_file), f"a readable settings file ({exc})") from None
    merged.update(os.environ if env is None else env)
    return merged


def load_settings(env: Mapping[str, str] | None = None, env_file: str | Path | _Discover | None = DISCOVER, *,
                  embeds: bool = True) -> Settings:
    """Settings from ``env`` (default: the process environment) over the values of ``env_file`` (default: the
    file settings_file() names, if any). ``embeds=False``: the caller never calls the embeddings provider, so its
    API key is not required (every value given is still validated)."""
    e = merged_env(env, env_file)
    settings = _settings(e, embeds)
    redact.remember(_secrets(settings))
    return settings


def _settings(e: Mapping[str, str], embeds: bool) -> Settings:
    app_env = _choice(e, "APP_ENV", "dev", APP_ENVS)
    prod = app_env == "prod"
    provider, api_key = _provider(e, prod, embeds)
    queue, failed_queue = (_name(e, var, default, "letters, digits and _ . : - (1..200 characters)")
                           for var, default in (("RABBITMQ_QUEUE", "user_embedding_updates"),
                                                ("RABBITMQ_FAILED_QUEUE", "failed")))
    index = _name(e, "ATLAS_VECTOR_INDEX", "product_embedding_index",
                  "an Atlas search index name of letters, digits, _ and -", forbid=".:")
    db = _name(e, "MONGODB_DB", "myshop", "a database name of letters, digits, _ and - (no dots)", forbid=".")

    return Settings(
        app_env=app_env,
        rabbitmq_dsn=_url(e, "RABBITMQ_DSN", ("amqp", "amqps"), prod),
        rabbitmq_queue_type=_choice(e, "RABBITMQ_QUEUE_TYPE", "quorum", ("quorum", "classic")),
        rabbitmq_management_url=_url(e, "RABBITMQ_MANAGEMENT_URL", ("http", "https"), prod, required=False),
        queue=queue,
        failed_queue=failed_queue,
        rabbitmq_binding_keys=_binding_keys(e),
        mongodb_url=_url(e, "MONGODB_URL", ("mongodb", "mongodb+srv"), prod),
        mongodb_db=db,
        redis_url=_url(e, "REDIS_URL", ("redis", "rediss", "unix"), prod),
        redis_prefix=_redis_prefix(e),
        failed_retention_days=_int(e, "FAILED_RETENTION_DAYS", 30, 0, 3650),
        embedding_provider=provider,
        openai_api_key=api_key,
        openai_embedding_model=(e.get("OPENAI_EMBEDDING_MODEL") or "text-embedding-3-small").strip(),
        openai_base_url=_url(e, "OPENAI_BASE_URL", ("http", "https"), prod, required=False),
        embedding_dimensions=_int(e, "EMBEDDING_DIMENSIONS", 1536, 8, 8192),
        decay_lambda=_float(e, "EMBEDDING_DECAY_LAMBDA", 0.023, 1e-6, 10.0),
        batch_enabled=_bool(e, "EMBEDDING_BATCH_ENABLED", False),
        batch_window=_float(e, "EMBEDDING_BATCH_WINDOW", 5.0, 1.0, 60.0),
        cache_ttl=_int(e, "EMBEDDING_CACHE_TTL", 3600, 1, 30 * 86_400),
        idempotency_ttl=_int(e, "IDEMPOTENCY_TTL", 3600, 60, 7 * 86_400),
        max_retries=_int(e, "WORKER_MAX_RETRIES", 5, 1, 10),
        retry_delay_ms=_int(e, "WORKER_RETRY_DELAY", 5000, 1, 60_000),
        log_format=_choice(e, "LOG_FORMAT", "json", ("json", "console")),
        log_level=_choice(e, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        recommend_backend=_choice(e, "RECOMMEND_BACKEND", "numpy", RECOMMEND_BACKENDS),
        atlas_vector_index=index,
        weights={t: _float(e, f"EVENT_WEIGHT_{t.upper()}", w, 0.0, 100.0) for t, w in DEFAULT_WEIGHTS.items()},
        store_layout=_choice(e, "STORE_LAYOUT", "shop", STORE_LAYOUTS),
    )


def _provider(e: Mapping[str, str], prod: bool, embeds: bool) -> tuple[str, str | None]:
    """EMBEDDING_PROVIDER and its API key (required only when the caller embeds)."""
    provider = _choice(e, "EMBEDDING_PROVIDER", "openai", ("openai", "hash"))
    if provider == "hash" and prod:
        raise ConfigError("EMBEDDING_PROVIDER", "hash", "openai in APP_ENV=prod (hash has no semantics; a self-hosted "
                          "model: openai with OPENAI_BASE_URL of an OpenAI-compatible server)")
    api_key = (e.get("OPENAI_API_KEY") or "").strip() or None
    if provider == "openai" and not api_key and embeds:
        raise ConfigError("OPENAI_API_KEY", None, "required when EMBEDDING_PROVIDER=openai")
    return provider, api_key


def _name(e: Mapping[str, str], var: str, default: str, expected: str, forbid: str = "") -> str:
    """A queue, database or index name: letters, digits and _ . : -, without the characters in ``forbid``."""
    value = (e.get(var) or default).strip()
    if not _NAME.match(value) or any(c in value for c in forbid):
        raise ConfigError(var, value, expected)
    return value


def _binding_keys(e: Mapping[str, str]) -> tuple[str, ...]:
    raw = e.get("RABBITMQ_BINDING_KEYS") or "user.embedding.update"
    keys = tuple(dict.fromkeys(k.strip() for k in raw.split(",")))
    if not all(_ROUTING_KEY.match(k) for k in keys):
        raise ConfigError("RABBITMQ_BINDING_KEYS", raw,
                          "comma-separated routing keys of letters, digits and _ . : -, e.g. user.embedding.update")
    return keys
