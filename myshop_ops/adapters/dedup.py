"""Redis: processed messages (by ``Event.key``: message id and user), the phrase-vector cache, the stop-workers flag,
the per-user claims that keep two workers from folding the same user at once (and hand a user's profile over from
the worker that wrote it to the one waiting for it).

Redis is an accelerator, never the source of truth: every error is logged, counted and
degraded (a miss), and the authoritative duplicate check is inside the MongoDB update.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import redis
from bson.objectid import ObjectId
from redis import RedisError  # the one Redis error type callers catch (re-exported)

from myshop_ops.adapters.config import Settings, mask_url
from myshop_ops.adapters.store import ID_BYTES, RECENT_IDS, RECENT_WRITES, TOKEN_BYTES, StoredProfile
from myshop_ops.base.basis import decode_basis, encode_basis
from myshop_ops.base.profile import Profile
from myshop_ops.base.values import count_value, epoch_value

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "myshop:"  # REDIS_KEY_PREFIX: every key below starts with it (one deployment, one prefix)
PROCESSED = "processed:"
ATTEMPTS = "attempts:"
STOP_FLAG = "stop-workers"
VECTORS = "emb:"
CLAIM, CLAIM_WAIT = "claim:", "claim-wait:"  # + user id: the worker folding the user now / the one waiting next
HANDOFF = "handoff:"  # + user id: the profile as its last holder wrote it, left for the waiting worker
HANDOFF_TTL_MS = 30_000
# a released claim is 'free:' + the token of its last holder for this long (that worker's cached profile is current)
FREE_TTL_MS = 600_000
SCAN_COUNT = 1000  # keys examined per SCAN round trip (forget_user)
# SET key 1 NX EX ttl for every key, as a pipeline of SETs would (NX: a retry after a partial run changes nothing)
_MARK_SCRIPT = "for _, key in ipairs(KEYS) do redis.call('SET', key, '1', 'NX', 'EX', ARGV[1]) end"

# Claim each user (KEYS[i], its wait key KEYS[n + i], its handoff KEYS[2n + i]) for the worker ARGV[1] for ARGV[2]
# ms, unless another worker holds it or waits for it first (then this worker becomes its waiter, if none). Returns
# {codes, handoffs}: per user 0 refused, 1 granted, 2 granted and this worker held it last (nobody wrote the profile
# since); with a 1, the profile its last holder left (taken: '' when none). Holding it already renews it.
_CLAIM_SCRIPT = """
local n, token = #KEYS / 3, ARGV[1]
local codes, handoffs = {}, {}
for i = 1, n do
  local held, waiter = redis.call('GET', KEYS[i]), redis.call('GET', KEYS[n + i])
  local free = (not held) or string.sub(held, 1, 5) == 'free:'
  handoffs[i] = ''
  if held == token or (free and (not waiter or waiter == token)) then
    redis.call('SET', KEYS[i], token, 'PX', ARGV[2])
    if waiter == token then redis.call('DEL', KEYS[n + i]) end
    if held == token or held == 'free:' .. token then
      codes[i] = 2
    else
      codes[i] = 1
      handoffs[i] = redis.call('GET', KEYS[2 * n + i]) or ''
      redis.call('DEL', KEYS[2 * n + i])
    end
  else
    if not waiter or waiter == token then redis.call('SET', KEYS[n + i], token, 'PX', ARGV[2]) end
    codes[i] = 0
  end
end
return {codes, handoffs}
"""
# Release the users this worker (ARGV[1]) still holds (KEYS[i], their wait keys KEYS[n + i]): the claim becomes
# 'free:' .. token for ARGV[2] ms. Returns per user 1 where another worker waits for it, else 0.
_RELEASE_SCRIPT = """
local n, token = #KEYS / 2, ARGV[1]
local waited = {}
for i = 1, n do
  waited[i] = 0
  if redis.call('GET', KEYS[i]) == token then
    redis.call('SET', KEYS[i], 'free:' .. token, 'PX', ARGV[2])
    waited[i] = redis.call('EXISTS', KEYS[n + i])
  end
end
return waited
"""
# Leave the profile as written (ARGV[2 + i]) in KEYS[n + i] for ARGV[2] ms where the claim KEYS[i] is still the one
# this worker (ARGV[1]) released: a waiter that claimed it meanwhile read the profile, and gets no stale copy later
_HANDOFF_SCRIPT = """
local n, free = #KEYS / 2, 'free:' .. ARGV[1]
for i = 1, n do
  if redis.call('GET', KEYS[i]) == free then redis.call('SET', KEYS[n + i], ARGV[2 + i], 'PX', ARGV[2]) end
end
"""


@dataclass(slots=True)
class Claimed:
    """What ``RedisState.claim`` got: a code per user (0 refused, 1 granted, 2 granted and held last by this worker)
    and, of the users granted with a 1, the profiles their last holder left (usable as read)."""

    codes: list[int]
    profiles: dict[str, StoredProfile] = field(default_factory=dict)


class RedisState:
    """Thin wrapper over one Redis connection pool; every call degrades instead of raising."""

    def __init__(self, url: str, *, idempotency_ttl: int = 3600, timeout: float = 1.0, prefix: str = DEFAULT_PREFIX):
        self.url = url
        self.idempotency_ttl = idempotency_ttl
        self.prefix = prefix
        self.processed, self.attempts_key, self.stop_flag = prefix + PROCESSED, prefix + ATTEMPTS, prefix + STOP_FLAG
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.errors = 0
        self._last_warning = 0.0

    @classmethod
    def from_settings(cls, s: Settings, **kw) -> RedisState:
        return cls(s.redis_url, idempotency_ttl=s.idempotency_ttl, prefix=s.redis_prefix, **kw)

    def _degraded(self, what: str, exc: Exception) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning(
                "redis unavailable, degrading", extra={"op": what, "redis": mask_url(self.url), "error": str(exc)}
            )

    def ping(self) -> None:
        """Raises RedisError when Redis cannot be reached (used at start-up and by preflight)."""
        self.client.ping()

    def eviction_policy(self) -> str | None:
        """Redis's maxmemory-policy; None when CONFIG GET is disabled. Raises RedisError when unreachable."""
        try:
            return self.client.config_get("maxmemory-policy").get("maxmemory-policy", "?")
        except redis.ResponseError:
            return None

    def seen(self, keys: Sequence[str]) -> set[str]:
        """The event keys (``Event.key``) already recorded as processed (empty when Redis is down)."""
        if not keys:
            return set()
        try:
            values = self.client.mget([self.processed + k for k in keys])
        except RedisError as exc:
            self._degraded("seen", exc)
            return set()
        return {k for k, v in zip(keys, values, strict=True) if v is not None}

    def mark(self, event_keys: Iterable[str]) -> None:
        """Record event keys as processed for IDEMPOTENCY_TTL seconds (called after the MongoDB write)."""
        keys = [self.processed + k for k in event_keys]
        if not keys:
            return
        try:
            try:  # one command: far less client CPU per id than a pipelined SET each (docs/PERFORMANCE.md)
                self.client.eval(_MARK_SCRIPT, len(keys), *keys, self.idempotency_ttl)
            except redis.ResponseError:  # scripting refused (ACL, disabled) or a SET failed: the same SETs, pipelined
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    pipe.set(key, b"1", nx=True, ex=self.idempotency_ttl)
                pipe.execute()
        except RedisError as exc:
            self._degraded("mark", exc)

    def forget_user(self, user_id: str) -> int | None:
        """Drop every processed key of ``user_id`` (user erasure); returns how many, None when Redis failed.

        Keys end with the user id, so they are found by SCAN: one pass over the whole keyspace, SCAN_COUNT keys a
        round trip (2 s per 500,000 keys measured; docs/RELIABILITY.md), for a rare operation instead of an index on
        the hot path. The pattern fixes the message id's 64 characters, so user ``b`` never matches ``a:b``."""
        pattern = _glob_escape(self.processed) + "?" * 64 + ":" + _glob_escape(user_id)
        pattern = pattern.encode("utf-8", "surrogatepass")  # an operator's argv may hold a lone surrogate
        removed = 0
        try:
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=pattern, count=SCAN_COUNT):
                batch.append(key)
                if len(batch) >= SCAN_COUNT:
                    removed += self.client.delete(*batch)
                    batch = []
            if batch:
                removed += self.client.delete(*batch)
            self.client.delete(*self._claim_keys([user_id]))
        except RedisError as exc:
            self._degraded("forget_user", exc)
            return None
        return removed

    def attempts(self, message_ids: Sequence[str]) -> list[int] | None:
        """Attempts recorded at each message by ``count_attempts`` (0 when none, or when what is stored is no
        count); None when Redis is down."""
        try:
            values = self.client.mget([self.attempts_key + m for m in message_ids])
        except RedisError as exc:
            self._degraded("attempts", exc)
            return None
        return [count_value(v) for v in values]

    def count_attempts(self, message_ids: Sequence[str], ttl: int = 86400) -> None:
        """Record one more attempt at each message, in a journal that outlives the worker: a message that keeps
        killing workers shows up as a growing count."""
        pipe = self.client.pipeline(transaction=False)
        for m in message_ids:
            pipe.incr(self.attempts_key + m)
            pipe.expire(self.attempts_key + m, ttl)
        try:
            pipe.execute()
        except RedisError as exc:
            self._degraded("count_attempts", exc)

    def attempts_done(self, message_ids: Sequence[str]) -> None:
        if message_ids:
            try:
                self.client.delete(*(self.attempts_key + m for m in message_ids))
            except RedisError as exc:
                self._degraded("attempts_done", exc)

    def _user_keys(self, kinds: Sequence[str], user_ids: Iterable[str]) -> list[bytes]:
        """The keys of each kind for these users, as bytes: a user id is read from a body before the contract
        checks it, and one holding a lone surrogate must still make a key (UTF-8 would refuse it)."""
        return [(self.prefix + kind + u).encode("utf-8", "surrogatepass") for kind in kinds for u in user_ids]

    def _claim_keys(self, user_ids: Sequence[str]) -> list[bytes]:
        return self._user_keys((CLAIM, CLAIM_WAIT, HANDOFF), user_ids)

    def claim(self, user_ids: Sequence[str], token: str, ttl_ms: int, model: str, dimensions: int
              ) -> Claimed | None:
        """Claim ``user_ids`` for the worker ``token`` for ``ttl_ms`` (one round trip): per user 0 (another worker
        holds it, or waits for it first), 1 (granted) or 2 (granted, and this worker held it last), and the profiles
        left by their last holder in the space (``model``, ``dimensions``). None when Redis is down or refuses
        scripts, or answers anything else: no claims, the conditional write alone decides."""
        if not user_ids:
            return Claimed([])
        keys = self._claim_keys(user_ids)
        try:
            raw = self.client.eval(_CLAIM_SCRIPT, len(keys), *keys, token, ttl_ms)
        except RedisError as exc:  # ResponseError included: scripting refused (ACL, disabled)
            self._degraded("claim", exc)
            return None
        return claim_reply(raw, user_ids, model, dimensions)

    def release(self, user_ids: Sequence[str], token: str, profiles: Mapping[str, StoredProfile] | None = None
                ) -> None:
        """Release the claims ``token`` still holds on ``user_ids`` (one round trip), then leave ``profiles`` (as
        this worker wrote them) for the workers waiting for some of those users (a second one, only then); a failure
        leaves the claims to expire."""
        if not user_ids:
            return
        keys = self._user_keys((CLAIM, CLAIM_WAIT), user_ids)
        try:
            waited = self.client.eval(_RELEASE_SCRIPT, len(keys), *keys, token, FREE_TTL_MS)
            handed = {u: blob for u, w in zip(user_ids, waited if isinstance(waited, list) else [], strict=False)
                      if w == 1 and profiles and u in profiles and (blob := pack_profile(profiles[u]))}
            if handed:
                keys = self._user_keys((CLAIM, HANDOFF), handed)
                self.client.eval(_HANDOFF_SCRIPT, len(keys), *keys, token, HANDOFF_TTL_MS, *handed.values())
        except RedisError as exc:
            self._degraded("release", exc)

    def get_vectors(self, keys: Sequence[str]) -> list[bytes | None]:
        """Cached vectors by cache key (the embedder's, without the prefix)."""
        try:
            return self.client.mget([self.prefix + VECTORS + k for k in keys])
        except RedisError as exc:
            self._degraded("get_vectors", exc)
            return [None] * len(keys)

    def set_vectors(self, items: dict[str, bytes], ttl: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for k, v in items.items():
            pipe.set(self.prefix + VECTORS + k, v, ex=ttl)
        try:
            pipe.execute()
        except RedisError as exc:
            self._degraded("set_vectors", exc)

    def request_stop(self, at: float | None = None) -> float:
        """Ask every worker started before ``at`` (default now) to exit after its batch. Raises if Redis is down."""
        at = time.time() if at is None else at
        self.client.set(self.stop_flag, repr(at))
        return at

    def stop_requested(self, started_at: float) -> bool:
        """True when stop-workers was run after a worker that started at ``started_at``."""
        try:
            raw = self.client.get(self.stop_flag)
        except RedisError as exc:
            self._degraded("stop_requested", exc)
            return False
        at = epoch_value(raw)  # anything else stored there (garbage, NaN) is no request
        return at is not None and at >= started_at

    def close(self) -> None:
        self.client.close()


def claim_reply(raw: object, user_ids: Sequence[str], model: str, dimensions: int) -> Claimed | None:
    """The claim script's reply: a code in 0..2 and a handoff (bytes, empty: none) per user, else None (treated as
    no claims). A handoff that does not parse as a profile of that space is left out (the profile is read)."""
    n = len(user_ids)
    if not isinstance(raw, list) or len(raw) != 2 or not all(isinstance(part, list) and len(part) == n
                                                              for part in raw):
        return None
    codes, handoffs = raw
    if not all(type(c) is int and 0 <= c <= 2 for c in codes) or not all(isinstance(h, bytes) for h in handoffs):
        return None
    profiles = {u: p for u, c, h in zip(user_ids, codes, handoffs, strict=True)
                if c == 1 and h and (p := unpack_profile(h, model, dimensions)) is not None}
    return Claimed(codes, profiles)


# a handed-over profile: magic, version, event_count, magnitude, last_updated (days), erased_at (epoch s, NaN: none),
# dimensions, doc_id, then the lengths of the model name, the id ring and the write ring (entries); then those
# bytes, the float32 unit vector, the id ring, the write ring, and the rest: the item map (basis.encode_basis)
_HANDOFF = struct.Struct("<4sqqdddI12sHHH")
_MAGIC = b"MSH2"


def pack_profile(p: StoredProfile) -> bytes:
    """``p`` as a handoff (b"": not handed over, the next holder reads it: no document id, an adopted prior, or no
    item map)."""
    if p.doc_id is None or p.adopted or p.event_counts or p.basis is None:
        return b""
    model = p.profile.model.encode()
    erased = p.erased_at.timestamp() if p.erased_at is not None else math.nan
    head = _HANDOFF.pack(_MAGIC, p.version, p.event_count, p.profile.magnitude, p.profile.last_updated, erased,
                         p.profile.dimensions, p.doc_id.binary, len(model), len(p.recent_ids) // ID_BYTES,
                         len(p.recent_writes) // TOKEN_BYTES)
    return b"".join((head, model, np.asarray(p.profile.embedding, dtype="<f4").tobytes(), p.recent_ids,
                     p.recent_writes, encode_basis(p.basis)))


def unpack_profile(raw: bytes, model: str, dimensions: int) -> StoredProfile | None:
    """A handoff read back (total: None for anything that is not a well-formed profile of this space)."""
    try:
        (magic, version, count, magnitude, last, erased, dims, doc_id, model_len, n_ids,
         n_writes) = _HANDOFF.unpack_from(raw)
        sizes = (model_len, dims * 4, n_ids * ID_BYTES, n_writes * TOKEN_BYTES)
        if (magic != _MAGIC or len(raw) <= _HANDOFF.size + sum(sizes) or dims != dimensions or version < 1
                or count < 0 or n_ids > RECENT_IDS or n_writes > RECENT_WRITES
                or not (math.isfinite(magnitude) and magnitude >= 0 and math.isfinite(last))):
            return None
        at = _HANDOFF.size
        parts = []
        for size in sizes:
            parts.append(raw[at:at + size])
            at += size
        name, vector, ids, writes = parts
        basis = decode_basis(raw[at:])
        if name.decode() != model:
            return None
        embedding = np.frombuffer(vector, dtype="<f4").astype(np.float32)
        if not np.isfinite(embedding).all():
            return None
        erased_at = None if math.isnan(erased) else datetime.fromtimestamp(erased, UTC)
        return StoredProfile(Profile(embedding, magnitude, last, model, dims), version, ids, writes,
                             doc_id=ObjectId(doc_id), event_count=count, erased_at=erased_at, basis=basis)
    except (struct.error, ValueError, OverflowError, OSError, UnicodeDecodeError):
        return None


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)
