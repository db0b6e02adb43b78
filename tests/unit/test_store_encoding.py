"""Encodings of a profile document: the packed id rings (store.pack_ring, ring_has, message_ids) and vectors."""

from __future__ import annotations

import hashlib

from bson.binary import Binary

from myshop_ops.adapters.store import ID_BYTES, TOKEN_BYTES, message_ids, pack_ring, ring_has


def ids(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def test_a_binary_ring_is_kept_as_is_and_unpacks_to_hex():
    hexes = ids(5)
    ring = Binary(b"".join(bytes.fromhex(h) for h in hexes))
    assert pack_ring(ring, ID_BYTES) == bytes(ring)
    assert message_ids({"recent_message_ids": ring}) == hexes


def test_the_array_layout_written_by_push_is_read():
    hexes = ids(3)
    assert pack_ring(hexes, ID_BYTES) == b"".join(bytes.fromhex(h) for h in hexes)
    assert message_ids({"recent_message_ids": hexes}) == hexes
    assert pack_ring(["0123456789abcdef", "not-a-token", 7], TOKEN_BYTES) == bytes.fromhex("0123456789abcdef")


def test_missing_rings_are_empty():
    assert pack_ring(None, ID_BYTES) == b"" and message_ids({}) == []


def test_membership_is_item_aligned():
    ring = bytes(range(1, 17))  # two 8-byte tokens: 01..08 and 09..10
    assert ring_has(ring, bytes(range(1, 9))) and ring_has(ring, bytes(range(9, 17)))
    assert not ring_has(ring, bytes(range(5, 13)))  # straddles the two items
    assert not ring_has(b"", bytes(8))
    # a match straddling two items before the real one is skipped, the real one found
    assert ring_has(b"\x00" * 4 + b"\x01" * 8 + b"\x01" * 4, b"\x01" * 8)
    assert ring_has(b"\x00" * 4 + b"\x01" * 12 + b"\x01" * 8, b"\x01" * 8)


def test_encode_vector_is_bson_float32_vector():
    import numpy as np
    from bson.binary import BinaryVectorDtype

    from myshop_ops.base.layout import decode_vector, encode_vector

    rng = np.random.default_rng(7)
    for vec in (rng.standard_normal(1536).astype(np.float32), rng.standard_normal(64), rng.standard_normal(8)[::2],
                np.array([0.0, -0.0, np.finfo(np.float32).max, np.finfo(np.float32).tiny], dtype=np.float32)):
        got = encode_vector(vec)
        assert got == Binary.from_vector(np.asarray(vec, dtype=np.float32), BinaryVectorDtype.FLOAT32)
        assert got.subtype == 9 and np.array_equal(decode_vector(got), np.asarray(vec, dtype=np.float32))


def test_timeouts_set_in_mongodb_url_are_the_operators_and_win():
    """MONGODB_URL's serverSelectionTimeoutMS / connectTimeoutMS / socketTimeoutMS (any case) are kept; the store's
    defaults fill only what the URL does not set. No server is contacted: the client connects lazily."""
    from myshop_ops.adapters.store import Store

    given = Store("mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300&connecttimeoutms=400", "x", timeout_ms=5000)
    default = Store("mongodb://127.0.0.1:1/", "x", timeout_ms=5000)
    try:
        assert given.client.options.server_selection_timeout == 0.3
        assert given.client.options.pool_options.connect_timeout == 0.4
        assert given.client.options.pool_options.socket_timeout == 30.0
        assert default.client.options.server_selection_timeout == 5.0
    finally:
        given.close()
        default.close()
