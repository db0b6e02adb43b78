"""A race the hot-users scenario could only hit by chance, made deterministic (found by this suite).

`Store.write_profiles` must tell which version-filtered updates of an unordered bulk landed. It used to look for
each write's message ids among the profile's last 256 ids: when other workers appended more than that to the
same profile between the bulk_write and the check, a landed write was taken for a conflict, re-read, re-folded
and its evicted events applied twice. Each write now leaves one token in a bounded `recent_writes` ring, so the
check holds unless 128 other writes hit the same profile within one round trip."""

from __future__ import annotations

from datetime import timedelta

import pytest
from bson.binary import Binary

from myshop_ops.adapters.dedup import RedisState
from myshop_ops.adapters.embeddings import HashProvider, PhraseEmbedder
from myshop_ops.adapters.store import ID_BYTES, RECENT_IDS, RECENT_WRITES, TOKEN_BYTES, Store, pack_ring
from myshop_ops.base.contract import make_event, serialise
from myshop_ops.core.pipeline import Pipeline
from tests.support.events import T0

pytestmark = pytest.mark.reliability


class ConcurrentWriters:
    """``store.users`` with two other workers' writes simulated at the exact moments of the race."""

    def __init__(self, coll, u: str, v: str):
        self.coll, self.u, self.v, self.stage = coll, u, v, 0

    def __getattr__(self, name):
        return getattr(self.coll, name)

    def bulk_write(self, ops, **kw):
        if self.stage == 0:  # another worker wrote v after this batch read it: v's update will not match
            self.coll.update_one({"user_id": self.v}, {"$inc": {"version": 1}})
            self.stage = 1
        return self.coll.bulk_write(ops, **kw)

    def find(self, flt, projection=None, **kw):
        if self.stage == 1 and "recent_writes" in (projection or {}):
            # the landed check is about to read: another worker appends 300 events to u first (one write)
            doc = self.coll.find_one({"user_id": self.u})
            ids = b"".join(i.to_bytes(ID_BYTES) for i in range(300))
            writes = pack_ring(doc["recent_writes"], TOKEN_BYTES) + b"otherwkr"
            self.coll.update_one({"user_id": self.u},
                                 {"$inc": {"version": 1, "event_count": 300},
                                  "$set": {"recent_message_ids": Binary(ids[-RECENT_IDS * ID_BYTES:]),
                                           "recent_writes": Binary(writes[-RECENT_WRITES * TOKEN_BYTES:])}})
            self.stage = 2
        return self.coll.find(flt, projection, **kw)


def test_a_landed_write_is_never_applied_again(env):
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    store.setup_indexes()
    redis = RedisState("redis://127.0.0.1:1/0", timeout=0.2)  # unreachable: the profile's ids are the only dedup
    pipe = Pipeline(s, store, redis, PhraseEmbedder(HashProvider(s.embedding_dimensions, s.model), None, ttl=60))
    u, v = f"{env['MONGODB_DB']}-u", f"{env['MONGODB_DB']}-v"
    try:
        first = [make_event(x, "search", "first", T0) for x in (u, v)]
        assert {i.status for i in pipe.process([serialise(e) for e in first]).items} == {"applied"}
        batch = [make_event(u, "search", f"phrase {k}", T0 + timedelta(minutes=k + 1)) for k in range(300)]
        batch.append(make_event(v, "search", "v phrase", T0 + timedelta(minutes=1)))
        raw = store.users
        store.users = ConcurrentWriters(raw, u, v)
        pipe.process([serialise(e) for e in batch])
        assert store.users.stage == 2, "the race was not staged"
        count = raw.find_one({"user_id": u})["event_count"]
    finally:
        store.close()
    assert count == 1 + 300 + 300, f"u holds {count} events, expected 601 (1 + this batch's 300 + the other's 300)"
