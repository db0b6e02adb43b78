"""layout.py: how any profile or product document is read, and indexes matched by key (store.satisfying_index)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import bson
import numpy as np
import pytest
from bson.binary import Binary
from hypothesis import given, settings
from hypothesis import strategies as st

from myshop_ops.adapters.store import satisfying_index
from myshop_ops.base.layout import (
    ForeignVector,
    UnreadableProfile,
    adoption_record,
    encode_vector,
    id_forms,
    id_key,
    product_fields,
    product_vector,
    profile_fields,
    read_adoption,
    read_profile,
)
from myshop_ops.base.profile import Profile, VectorSpaceMismatch, to_days
from myshop_ops.base.rawbson import raw_document

T = datetime(2026, 11, 1, 12, 0, 7, tzinfo=UTC)
V = np.array([3.0, 4.0, 0.0, 0.0])


def test_a_shop_profile_is_a_prior_of_weight_one_at_its_last_updated():
    doc = {"user_id": "u", "vector": list(V / 5), "dimension_count": 4, "last_updated": T, "version": 7}
    read = read_profile(doc, "m", 4)
    assert read.adopted and read.version == 7 and read.event_count == 0
    assert read.profile == Profile(read.profile.embedding, 1.0, to_days(T), "m", 4)
    assert np.array_equal(read.profile.embedding, np.float32(V / 5))
    # the shop's reader also takes a string time; so do we
    assert read_profile({**doc, "last_updated": "2026-11-01T12:00:07+00:00"}, "m", 4).profile.last_updated == to_days(T)
    # a vector of another length without a tag is another space's
    with pytest.raises(VectorSpaceMismatch, match="untagged 4d vector, expected m/8d"):
        read_profile(doc, "m", 8)


def test_magnitude_is_trusted_only_with_the_vector_it_was_written_with():
    fields, unset = profile_fields(Profile(np.float32(V / 5), 2.5, to_days(T), "m", 4), "shop", 3)
    fields = bson.decode(raw_document(fields).raw)  # as stored
    assert unset == {"embedding": ""} and fields["dimension_count"] == 4
    assert fields["vector"] == [float(np.float32(0.6)), float(np.float32(0.8)), 0.0, 0.0]  # the float32 state
    ours = {"user_id": "u", **fields, "last_updated": T, "version": 3}
    assert not read_profile(ours, "m", 4).adopted and read_profile(ours, "m", 4).profile.magnitude == 2.5
    rewritten = {**ours, "version": 4}  # the shop's $set bumped the version and left our magnitude behind
    assert read_profile(rewritten, "m", 4).adopted and read_profile(rewritten, "m", 4).profile.magnitude == 1.0
    compact, unset = profile_fields(Profile(np.float32(V / 5), 2.5, to_days(T), "m", 4), "compact", 3)
    assert unset == {"vector": "", "dimension_count": ""} and compact["embedding"] == encode_vector(V / 5)
    legacy = {"embedding": compact["embedding"], "magnitude": 2.5, "model": "m", "dimensions": 4, "last_updated": T,
              "version": 9}  # written before myshop_version existed: only myshop writes `embedding` into profiles
    assert not read_profile(legacy, "m", 4).adopted


@pytest.mark.parametrize(("doc", "reason"), [
    ({"vector": "x", "last_updated": T, "version": 1}, "its vector is an unreadable vector"),
    ({"vector": list(V), "last_updated": T, "version": True}, "its version is a bool"),
    ({"vector": list(V), "last_updated": T, "version": 1.5}, "its version is 1.5"),
    ({"vector": list(V), "last_updated": 5, "version": 1}, "its last_updated is 5, not a UTC time"),
    ({"vector": list(V), "last_updated": T, "version": 1, "event_count": "3"}, "its event_count is a str"),
    ({"vector": list(V), "last_updated": T, "version": 1, "purchased_product_ids": {}}, "purchased_product_ids is a"),
])
def test_unreadable_profiles_say_why(doc, reason):
    with pytest.raises(UnreadableProfile, match=reason):
        read_profile(doc, "m", 4)


def test_product_ids_in_both_forms():
    assert id_forms(["42", "042", "x", "9" * 30]) == ["42", "042", "x", "9" * 30, 42]
    assert [id_key(v) for v in (42, "42", True, 4.2, None)] == ["42", "42", None, None, None]
    assert product_fields("42", V, "shop") == {"product_id": "42", "productId": "42", "embedding": list(V)}
    assert set(product_fields("42", V, "compact")) == {"product_id", "embedding"}


def test_indexes_match_by_key_and_options_not_by_name():
    shop = {"_id_": {"key": [("_id", 1)]}, "idx_user_id": {"key": [("user_id", 1)], "unique": True},
            "idx_last_updated": {"key": [("last_updated", 1)], "unique": False}}
    assert satisfying_index(shop, [("user_id", 1)], {"unique": True}, "user_id_unique") == "idx_user_id"
    assert satisfying_index(shop, [("last_updated", -1)], {}, "last_updated") == "idx_last_updated"  # one field
    assert satisfying_index(shop, [("user_id", 1)], {}, "x") is None  # unique is not the same index
    sparse = {"s": {"key": [("user_id", 1)], "unique": True, "sparse": True}}
    assert satisfying_index(sparse, [("user_id", 1)], {"unique": True}) is None
    both = {**shop, "user_id_unique": {"key": [("user_id", 1)], "unique": True}}
    assert satisfying_index(both, [("user_id", 1)], {"unique": True}, "user_id_unique") == "user_id_unique"
    assert satisfying_index({"t": {"key": [("a", "text")]}}, [("a", 1)], {}) is None


@pytest.mark.parametrize(("embedding", "reason"), [
    (Binary(b"\x27", 9), "not float32, or is cut short"),  # as_vector raised struct.error
    (Binary(b"", 9), "not float32, or is cut short"),
    (Binary(b"\x27\x00\x00\x00\x80", 9), "not float32, or is cut short"),
    (Binary(b"\x03\x00\x03\x04\x00\x00", 9), "not float32"),  # int8: was read as the floats 3, 4, 0, 0
    (Binary(b"\x10\x00\xff\x00\x00\x00", 9), "not float32"),  # packed bits
    (Binary(np.array(V, "<f4").tobytes(), 5), "a BSON binary of subtype 5"),  # an MD5 was read as 4 floats
    (b"\x00\x00\x80", "not whole float32 numbers"),
    (["3", "4", "0", "0"], "not of numbers"),  # numpy converted the strings
    ([3.0, None, 0.0, 0.0], "not of numbers"),
    ([[3.0], [4.0], [0.0], [0.0]], "not of numbers"),
    ({"0": 3.0}, "a dict, not an array"),
    (None, "missing"),
    ([], "empty"),
    ([3.0, float("nan"), 0.0, 0.0], "NaN or infinite"),
    ([1e39, 0.0, 0.0, 0.0], "NaN or infinite"),  # past float32: inf
    ([0.0, 0.0, 0.0, 0.0], "zero"),
    ([1e30, 0.0, 0.0, 0.0], "length 1e+30"),
    ([1e-30, 0.0, 0.0, 0.0], "length 1e-30"),
])
def test_a_stored_vector_that_is_not_one_is_refused_with_what_it_is(embedding, reason):
    with pytest.raises(ForeignVector, match="an unreadable vector") as caught:
        product_vector({"embedding": embedding, "model": "m", "dimensions": 4}, "m", 4)
    assert reason in str(caught.value)


@pytest.mark.parametrize("embedding", [encode_vector(V / 5), list(V / 5), [3, 4, 0, 0], np.array(V, "<f4").tobytes()])
def test_every_stored_vector_form_is_read(embedding):
    vec = product_vector({"embedding": embedding, "model": "m", "dimensions": 4}, "m", 4)
    assert vec.dtype == np.float32 and vec.flags.writeable and np.allclose(vec / np.linalg.norm(vec), V / 5)


# ---- adoption records --------------------------------------------------------------------------------------

PRIOR = Profile(np.float32(V / 5), 1.0, to_days(T), "m", 4)


def test_an_adoption_record_keeps_the_prior_bit_exact():
    record = adoption_record(PRIOR, 7, 3, {"search": 3})
    assert record["vector"] == encode_vector(PRIOR.embedding) and record["vector"].subtype == 9
    read = read_adoption(record, "m", 4)
    assert (read.version, read.last_updated, read.event_count, read.event_counts) == (7, to_days(T), 3, {"search": 3})
    assert np.array_equal(read.prior.embedding, PRIOR.embedding) and read.prior.embedding.dtype == np.float32
    assert (read.prior.magnitude, read.prior.last_updated, read.prior.model, read.prior.dimensions) == (1.0, to_days(T),
                                                                                                      "m", 4)
    # the shop layout's other vector forms are read too; a record of an earlier myshop holds no prior
    assert np.array_equal(read_adoption({**record, "vector": list(V / 5)}, "m", 4).prior.embedding, PRIOR.embedding)
    assert read_adoption({"version": 7, "last_updated": T, "event_count": 0}, "m", 4).prior is None
    # only the event types' counts are recorded: a stored key no update could write ($x, a.b) stays out
    assert adoption_record(PRIOR, 7, 5, {"$x": 1, "a.b": 1, "search": 3})["event_counts"] == {"search": 3}


@pytest.mark.parametrize(("change", "reason"), [
    ({"version": True}, "its version is a bool"),
    ({"version": -1}, "its version is -1"),
    ({"event_count": 1.5}, "its event_count is 1.5"),
    ({"last_updated": "yesterday"}, "its last_updated is a str"),
    ({"event_counts": ["search"]}, "its event_counts is a list"),
    ({"event_counts": {"search": "1"}}, "its event_counts is a dict"),
    ({"vector": None}, "its vector is an unreadable vector (missing)"),
    ({"vector": Binary(b"\x27", 9)}, "its vector is an unreadable vector (a BSON vector that is not float32"),
    ({"vector": [0.6, float("nan"), 0.0, 0.0]}, "a NaN or infinite element"),
    ({"vector": [3.0, 4.0, 0.0, 0.0]}, "its vector is not a 4d unit vector"),
    ({"vector": [0.6, 0.8]}, "its vector is not a 4d unit vector"),
    ({"magnitude": 0.0}, "its magnitude is 0.0"),
    ({"magnitude": -1}, "its magnitude is -1"),
    ({"magnitude": float("inf")}, "its magnitude is a float, not a positive sum of events"),
    ({"magnitude": 1e13}, "its magnitude is 10000000000000.0"),
    ({"magnitude": "1"}, "its magnitude is a str"),
    ({"magnitude": None}, "its magnitude is missing"),
])
def test_an_adoption_record_that_is_not_what_myshop_writes_says_why(change, reason):
    record = {k: v for k, v in {**adoption_record(PRIOR, 7, 3, {"search": 3}), **change}.items() if v is not None}
    with pytest.raises(UnreadableProfile, match=re.escape(reason)):
        read_adoption(record, "m", 4)
    with pytest.raises(UnreadableProfile, match="it is a list, not a document"):
        read_adoption([record], "m", 4)


_ANY = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                              st.binary(max_size=20), st.builds(lambda b: Binary(b, 9), st.binary(max_size=20)),
                              st.datetimes(timezones=st.just(UTC)), st.lists(st.floats(width=32), min_size=4,
                                                                             max_size=4)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3)), max_leaves=6)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.dictionaries(st.sampled_from(["version", "last_updated", "event_count", "event_counts", "vector",
                                        "magnitude"]), _ANY, max_size=3))
def test_property_any_adoption_record_is_read_or_refused_with_a_reason(change):
    try:
        read = read_adoption({**adoption_record(PRIOR, 7, 3, {"search": 3}), **change}, "m", 4)
    except UnreadableProfile as exc:
        assert str(exc)
    else:
        assert read.prior is None or (np.isfinite(read.prior.embedding).all() and read.prior.magnitude > 0)
