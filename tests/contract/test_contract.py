"""The event message contract v1 (SPEC section 2)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from myshop_ops.base.contract import (
    CONTRACT_VERSION,
    DEFAULT_WEIGHTS,
    EVENT_TYPES,
    MAX_BODY_BYTES,
    MAX_METADATA_BYTES,
    Event,
    InvalidMessage,
    event_key,
    loose_field,
    make_event,
    message_id,
    parse,
    serialise,
)

pytestmark = pytest.mark.contract

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
WHEN = "2024-05-01T11:30:00.250000+00:00"
MID = "a" * 64


def body(**fields: Any) -> dict[str, Any]:
    """A valid product_view body, with ``fields`` overriding (None values are dropped: absent)."""
    data: dict[str, Any] = {
        "user_id": "u-1",
        "event_type": "product_view",
        "product_id": "p-9",
        "occurred_at": WHEN,
        "message_id": MID,
        "version": "1.0",
    }
    data.update(fields)
    return {k: v for k, v in data.items() if v is not None}


def search_body(**fields: Any) -> dict[str, Any]:
    return body(**({"event_type": "search", "product_id": None, "search_phrase": "red shoes"} | fields))


def enc(data: Any) -> bytes:
    return json.dumps(data).encode()


def errors_of(raw: bytes | str) -> list[str]:
    with pytest.raises(InvalidMessage) as info:
        parse(raw, now=NOW)
    assert info.value.errors, "InvalidMessage without errors"
    assert str(info.value) == "; ".join(info.value.errors)
    return info.value.errors


# ------------------------------------------------------------------------------------ constants


def test_weights_and_constants() -> None:
    assert EVENT_TYPES == ("search", "product_view", "product_click", "product_purchase")
    assert DEFAULT_WEIGHTS == {
        "product_purchase": 1.0,
        "search": 0.7,
        "product_click": 0.5,
        "product_view": 0.3,
    }
    assert set(DEFAULT_WEIGHTS) == set(EVENT_TYPES)
    assert MAX_BODY_BYTES == 65536 and MAX_METADATA_BYTES == 4096
    assert CONTRACT_VERSION == "1.0"


# ----------------------------------------------------------------------- required fields per type


def test_valid_search_event() -> None:
    event = parse(enc(search_body(search_phrase="  red shoes \n")), now=NOW)
    assert event == Event(
        user_id="u-1",
        event_type="search",
        search_phrase="red shoes",
        product_id=None,
        occurred_at=datetime(2024, 5, 1, 11, 30, 0, 250000, tzinfo=UTC),
        message_id=MID,
    )
    assert event.reference == "red shoes"
    assert event.occurred_at.tzinfo is UTC


@pytest.mark.parametrize("event_type", ["product_view", "product_click", "product_purchase"])
def test_valid_product_events(event_type: str) -> None:
    event = parse(enc(body(event_type=event_type, search_phrase=None)), now=NOW)
    assert (event.event_type, event.product_id, event.search_phrase) == (event_type, "p-9", None)
    assert event.reference == "p-9"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (search_body(search_phrase=None), "search_phrase"),  # search needs a phrase
        (search_body(product_id="p-1"), "product_id"),  # ... and forbids a product id
        (body(event_type="product_click", product_id=None), "product_id"),
        (body(event_type="product_purchase", search_phrase="shoes"), "search_phrase"),
        (body(user_id=None), "user_id"),
        (body(event_type=None), "event_type"),
        (body(occurred_at=None), "occurred_at"),
        (body(message_id=None), "message_id"),
    ],
)
def test_required_and_forbidden_fields(data: dict[str, Any], field: str) -> None:
    errors = errors_of(enc(data))
    assert len(errors) == 1 and errors[0].startswith(f"{field}: "), errors


def test_explicit_null_is_absent() -> None:
    event = parse(enc(search_body(product_id=None) | {"product_id": None, "metadata": None}), now=NOW)
    assert event.product_id is None and event.metadata is None
    errors = errors_of(enc(search_body() | {"search_phrase": None}))
    assert errors[0].startswith("search_phrase: required")


# --------------------------------------------------------------------------- every error message


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"user_id": "x" * 129}, "user_id"),
        ({"user_id": True}, "user_id"),
        ({"user_id": 4.5}, "user_id"),
        ({"user_id": ["u"]}, "user_id"),
        ({"user_id": "\ud800"}, "user_id"),  # lone surrogate via a JSON escape
        ({"event_type": "product_like"}, "event_type"),
        ({"event_type": 3}, "event_type"),
        ({"event_type": "search", "product_id": None, "search_phrase": "   "}, "search_phrase"),
        ({"event_type": "search", "product_id": None, "search_phrase": "x" * 256}, "search_phrase"),
        ({"event_type": "search", "product_id": None, "search_phrase": 7}, "search_phrase"),
        ({"product_id": ""}, "product_id"),
        ({"product_id": "p" * 129}, "product_id"),
        ({"product_id": False}, "product_id"),
        ({"product_id": {"id": 1}}, "product_id"),
        ({"occurred_at": "yesterday"}, "occurred_at"),
        ({"occurred_at": "2024-05-01T11:00:00"}, "occurred_at"),
        ({"occurred_at": "2024-05-01"}, "occurred_at"),
        ({"occurred_at": 1714561200}, "occurred_at"),
        ({"occurred_at": "0001-01-01T00:00:00+05:00"}, "occurred_at"),  # underflows in UTC
        ({"metadata": [1, 2]}, "metadata"),
        ({"metadata": "x"}, "metadata"),
        ({"message_id": "A" * 64}, "message_id"),
        ({"message_id": "a" * 63}, "message_id"),
        ({"message_id": "g" * 64}, "message_id"),
        ({"message_id": 12}, "message_id"),
        ({"version": "2.0"}, "version"),
        ({"version": "1"}, "version"),
        ({"version": "1.0\n"}, "version"),
        ({"version": 1.0}, "version"),
    ],
)
def test_each_rule_names_its_field(overrides: dict[str, Any], field: str) -> None:
    errors = errors_of(enc(body() | overrides))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{field}: ") and "\n" not in errors[0]


def test_error_messages_say_what_is_allowed() -> None:
    assert errors_of(enc(body(user_id=""))) == ["user_id: must be a string of 1..128 characters (got 0)"]
    assert errors_of(enc(body(occurred_at="2024-05-01T11:00:00"))) == [
        "occurred_at: naive time, a UTC offset is required"
    ]
    assert "search / product_view / product_click / product_purchase" in errors_of(enc(body(event_type="x")))[0]


def test_multiple_errors_reported_together() -> None:
    data = {
        "userId": "",
        "event_type": "search",
        "product_id": "p",
        "occurred_at": "2024-01-01T00:00:00",
        "metadata": [1],
        "message_id": "XYZ",
        "version": "2.0",
    }
    errors = errors_of(enc(data))
    fields = [e.split(":", 1)[0] for e in errors]
    assert fields == [
        "user_id",
        "search_phrase",
        "product_id",
        "occurred_at",
        "metadata",
        "message_id",
        "version",
    ]


def test_integer_ids_become_decimal_strings() -> None:
    event = parse(enc(body(user_id=42, product_id=1234567)), now=NOW)
    assert (event.user_id, event.product_id) == ("42", "1234567")
    assert errors_of(enc(body(user_id=10**130)))[0].startswith("user_id: ")


def test_unknown_keys_are_ignored() -> None:
    event = parse(enc(body(extra={"x": 1}, _type="App\\Message\\UserEvent")), now=NOW)
    assert event == parse(enc(body()), now=NOW)


# ----------------------------------------------------------------------------------- message id


def test_message_id_exact_formula() -> None:
    when = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    expected = hashlib.sha256(b"u-1|search|red shoes|2024-05-01T12:00:00.000000+00:00").hexdigest()
    assert message_id("u-1", "search", "red shoes", when) == expected
    event = make_event("u-1", "search", "  red shoes ", occurred_at=when)
    assert event.message_id == expected
    assert make_event("u-1", "search", "red shoes", occurred_at=when) == event  # deterministic


def test_message_id_same_instant_in_other_offsets() -> None:
    utc = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    paris = utc.astimezone(timezone(timedelta(hours=2)))
    ny = utc.astimezone(timezone(timedelta(hours=-4)))
    ids = {message_id("u", "product_view", "p", t) for t in (utc, paris, ny)}
    assert len(ids) == 1
    assert make_event("u", "product_view", "p", paris) == make_event("u", "product_view", "p", ny)
    assert message_id("u", "product_view", "p", utc + timedelta(microseconds=1)) not in ids


def test_message_id_hashes_int_user_id_as_string() -> None:
    when = datetime(2024, 5, 1, tzinfo=UTC)
    expected = hashlib.sha256(b"42|product_purchase|7|2024-05-01T00:00:00.000000+00:00").hexdigest()
    event = make_event(42, "product_purchase", 7, occurred_at=when)
    assert (event.user_id, event.product_id, event.message_id) == ("42", "7", expected)
    assert message_id("42", "product_purchase", "7", when) == expected


def test_consumer_does_not_recompute_message_id() -> None:
    assert parse(enc(body(message_id="0" * 64)), now=NOW).message_id == "0" * 64


def test_make_event_rejects_bad_input() -> None:
    with pytest.raises(InvalidMessage) as info:
        make_event(True, "product_like", "", occurred_at=datetime(2024, 1, 1))
    fields = [e.split(":", 1)[0] for e in info.value.errors]
    assert fields == ["user_id", "event_type", "occurred_at"]
    with pytest.raises(InvalidMessage, match="search_phrase"):
        make_event("u", "search", "   ")
    with pytest.raises(InvalidMessage, match="metadata"):
        make_event("u", "search", "x", metadata={"n": float("nan")})
    assert make_event("u", "search", "x").occurred_at.tzinfo is UTC  # defaults to now


# ------------------------------------------------------------------------------------- metadata


def test_metadata_round_trip_and_limit() -> None:
    meta = {"source": "web", "page": 3, "tags": ["a", "é"], "nested": {"ok": True, "n": None}}
    event = make_event("u", "product_click", "p", occurred_at=NOW, metadata=meta)
    assert parse(serialise(event), now=NOW).metadata == meta

    overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
    at_limit = {"k": "x" * (MAX_METADATA_BYTES - overhead)}
    assert len(json.dumps(at_limit, separators=(",", ":"))) == MAX_METADATA_BYTES
    assert parse(enc(body(metadata=at_limit)), now=NOW).metadata == at_limit
    over = {"k": "x" * (MAX_METADATA_BYTES - overhead + 1)}
    errors = errors_of(enc(body(metadata=over)))
    assert errors[0].startswith("metadata: ") and "4096" in errors[0]


# ------------------------------------------------------------------------------- camelCase aliases


def test_php_camelcase_body_parses_like_snake_case() -> None:
    php = {
        "userId": 42,
        "eventType": "search",
        "searchPhrase": "red shoes",
        "productId": None,
        "occurredAt": "2024-05-01T13:30:00.250000+02:00",
        "messageId": MID,
    }
    snake = {
        "user_id": "42",
        "event_type": "search",
        "search_phrase": "red shoes",
        "occurred_at": "2024-05-01T11:30:00.250Z",
        "message_id": MID,
        "version": "1.0",
    }
    assert parse(enc(php), now=NOW) == parse(enc(snake), now=NOW)
    product = {"userId": "u", "eventType": "product_view", "productId": 9, "occurredAt": WHEN, "messageId": MID}
    assert parse(enc(product), now=NOW).product_id == "9"


def test_alias_conflicts() -> None:
    assert parse(enc(body(userId="u-1")), now=NOW).user_id == "u-1"  # same value: fine
    errors = errors_of(enc(body(userId="u-2", productId="p-9", messageId="b" * 64)))
    assert [e.split(":", 1)[0] for e in errors] == ["user_id", "message_id"]
    assert "userId" in errors[0]


def test_a_key_given_twice_takes_its_last_value() -> None:
    """Like Python's json and most parsers: the later duplicate wins (an alias conflict is an error instead)."""
    raw = enc(body(user_id="first"))
    raw = raw[:-1] + b', "user_id": "second"}'
    assert parse(raw, now=NOW).user_id == "second"


# ------------------------------------------------------------------------------------------ time


@pytest.mark.parametrize(
    ("ahead", "ok"),
    [(timedelta(minutes=4), True), (timedelta(minutes=5), True), (timedelta(minutes=5, seconds=1), False)],
)
def test_future_tolerance(ahead: timedelta, ok: bool) -> None:
    raw = enc(body(occurred_at=(NOW + ahead).isoformat()))
    if ok:
        assert parse(raw, now=NOW).occurred_at == NOW + ahead
    else:
        assert errors_of(raw)[0].startswith("occurred_at: ")


def test_default_now_is_current_time() -> None:
    soon = datetime.now(UTC) + timedelta(minutes=1)
    assert parse(enc(body(occurred_at=soon.isoformat()))).occurred_at == soon
    with pytest.raises(InvalidMessage, match="occurred_at"):
        parse(enc(body(occurred_at=(soon + timedelta(minutes=10)).isoformat())))


@pytest.mark.parametrize(
    "text",
    ["2024-05-01T11:30:00Z", "2024-05-01T07:30:00-04:00", "2024-05-01T17:00:00.000+05:30", "20240501T113000Z"],
)
def test_offsets_are_converted_to_utc(text: str) -> None:
    assert parse(enc(body(occurred_at=text)), now=NOW).occurred_at == datetime(2024, 5, 1, 11, 30, tzinfo=UTC)


# ------------------------------------------------------------------------------ body-level errors


def test_oversize_body_rejected_before_decoding() -> None:
    padded = body(pad="x" * MAX_BODY_BYTES)
    assert errors_of(enc(padded))[0].startswith("body: ")
    raw = b"\xff" * (MAX_BODY_BYTES + 1)  # not even UTF-8: the size check comes first
    assert "larger than" in errors_of(raw)[0]
    assert "larger than" in errors_of("é" * (MAX_BODY_BYTES // 2 + 1))[0]  # str counted in UTF-8 bytes
    exact = enc(body())
    exact = exact[:-1] + b" " * (MAX_BODY_BYTES - len(exact)) + b"}"
    assert len(exact) == MAX_BODY_BYTES and parse(exact, now=NOW).user_id == "u-1"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe{}",
        b'{"user_id": "\xc3"}',
        b"",
        b"{",
        b"not json",
        b'{"user_id": NaN}',
        b'{"metadata": {"x": Infinity}}',
        b'{"user_id": ' + b"1" * 5000 + b"}",
        b"\xef\xbb\xbf{}",
    ],
)
def test_invalid_utf8_and_json(raw: bytes) -> None:
    errors = errors_of(raw)
    assert len(errors) == 1 and errors[0].startswith("body: ")


@pytest.mark.parametrize("raw", [b"[]", b"[1, 2]", b'"text"', b"42", b"null", b"true", b"3.5"])
def test_non_object_json(raw: bytes) -> None:
    assert errors_of(raw)[0].startswith("body: must be a JSON object")


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 30_000 + b"1" + b"}" * 30_000])
def test_deep_nesting_is_invalid_message(raw: bytes) -> None:
    raw = raw[:MAX_BODY_BYTES] if len(raw) > MAX_BODY_BYTES else raw
    errors_of(raw)  # size limit or nesting: InvalidMessage either way, never RecursionError


def test_deep_nesting_within_size_limit() -> None:
    depth = MAX_BODY_BYTES // 2 - 10
    assert errors_of("[" * depth + "]" * depth)[0].startswith("body: ")
    nested = '{"metadata":' + '{"a":' * 9000 + "1" + "}" * 9000 + "}"
    assert len(nested) < MAX_BODY_BYTES
    assert errors_of(nested)[0].startswith("body: ")


@pytest.mark.parametrize("raw", [None, 42, ["x"], {"user_id": "u"}])
def test_wrong_body_type(raw: Any) -> None:
    errors_of(raw)


def test_bytearray_and_str_bodies() -> None:
    raw = enc(body())
    assert parse(bytearray(raw), now=NOW) == parse(raw.decode(), now=NOW) == parse(raw, now=NOW)


# ------------------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("1.0", True),
        ("1.3", True),
        ("1.10", True),
        (None, True),
        ("2.0", False),
        ("0.9", False),
        ("1.x", False),
        ("v1.0", False),
    ],
)
def test_versions(version: str | None, ok: bool) -> None:
    data = body(version=None) if version is None else body(version=version)
    if ok:
        assert parse(enc(data), now=NOW).version == (version or "1.0")
    else:
        assert errors_of(enc(data))[0].startswith("version: ")


def test_explicit_null_version_means_default() -> None:
    assert parse(enc(body() | {"version": None}), now=NOW).version == "1.0"


# ---------------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize(
    "event",
    [
        make_event("u-1", "search", "  Zapatos rojos ñ ", occurred_at=NOW - timedelta(hours=1)),
        make_event(
            42,
            "product_purchase",
            1001,
            occurred_at=datetime(2024, 4, 30, 23, 0, tzinfo=timezone(timedelta(hours=-7))),
            metadata={"qty": 2, "price": 19.99},
        ),
        make_event("u", "product_view", "p", occurred_at=datetime(2024, 5, 1, 10, 0, 0, 1, tzinfo=UTC)),
    ],
)
def test_serialise_parse_round_trip(event: Event) -> None:
    raw = serialise(event)
    assert parse(raw, now=NOW) == event
    decoded = json.loads(raw)
    assert set(decoded) == {
        "message_id",
        "version",
        "user_id",
        "event_type",
        "search_phrase",
        "product_id",
        "occurred_at",
        "metadata",
    }
    assert decoded["occurred_at"].endswith("+00:00") and "." in decoded["occurred_at"]
    assert b", " not in raw and b": " not in raw.replace(b"Zapatos rojos", b"")
    assert serialise(parse(raw, now=NOW)) == raw


def test_parsed_version_survives_round_trip() -> None:
    event = parse(enc(body(version="1.3")), now=NOW)
    assert parse(serialise(event), now=NOW) == event


# ------------------------------------------------------------------------------------ properties

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "user_id",
        "userId",
        "event_type",
        "eventType",
        "search_phrase",
        "searchPhrase",
        "product_id",
        "productId",
        "occurred_at",
        "occurredAt",
        "metadata",
        "message_id",
        "messageId",
        "version",
    ]
)
field_values = (
    json_values
    | st.sampled_from([*EVENT_TYPES, MID, "1.0", "2.0", WHEN, "2024-05-01T11:00:00", "red shoes", 42])
    | st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
)
messages = st.dictionaries(field_names | st.text(max_size=8), field_values, max_size=10)


@st.composite
def mutated_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with a few keys dropped or replaced, so both outcomes are exercised."""
    data = draw(st.sampled_from([body(), search_body(), body(event_type="product_purchase", user_id=7)]))
    for key in draw(st.sets(field_names, max_size=2)):
        data.pop(key, None)
    data.update(draw(st.dictionaries(field_names, field_values, max_size=2)))
    return data


def _parse_or_invalid(raw: Any) -> None:
    try:
        event = parse(raw, now=NOW)
    except InvalidMessage as exc:
        assert exc.errors and all(isinstance(e, str) and ":" in e for e in exc.errors)
    else:
        assert isinstance(event, Event)
        assert parse(serialise(event), now=NOW) == event


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_parse_or_invalid(raw: bytes) -> None:
    _parse_or_invalid(raw)


@settings(max_examples=500, deadline=None)
@given(mutated_messages() | messages | st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_arbitrary_json_objects_parse_or_invalid(data: dict[str, Any]) -> None:
    _parse_or_invalid(json.dumps(data).encode("utf-8", "surrogatepass"))
    _parse_or_invalid(json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    _parse_or_invalid(json.dumps(data))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_values_parse_or_invalid(value: Any) -> None:
    _parse_or_invalid(json.dumps(value))


# The shop's publisher (Symfony Messenger + Symfony serializer), one message exactly as it reaches the queue.
SHOP_BODY = (b'{"weight":0.7,"userId":"669a3f12-7b00-413f-f7e2-e25d19efe76b","eventType":"search",'
             b'"searchPhrase":"gaming laptop","productId":null,"occurredAt":"2026-11-26T09:29:44+00:00",'
             b'"metadata":[],"messageId":"7e783b9db3a84a79871b36989f0fb13e8bb6b7baea49f4ad7115f39e9fe72ecf"}')


def test_the_shops_wire_format_is_accepted_as_it_is() -> None:
    event = parse(SHOP_BODY, now=datetime(2026, 11, 27, tzinfo=UTC))
    assert event.user_id == "669a3f12-7b00-413f-f7e2-e25d19efe76b"
    assert event.event_type == "search" and event.search_phrase == "gaming laptop" and event.product_id is None
    assert event.message_id == "7e783b9db3a84a79871b36989f0fb13e8bb6b7baea49f4ad7115f39e9fe72ecf"
    assert event.metadata == {}  # PHP's empty array, "[]": empty metadata, not an error ("weight" is ignored)


def test_empty_array_metadata_is_empty_and_a_non_empty_array_is_refused() -> None:
    assert parse(enc(body(metadata=[])), now=NOW).metadata == {}
    assert parse(enc(body(metadata={})), now=NOW).metadata == {}
    assert errors_of(enc(body(metadata=["a"]))) == ["metadata: must be a JSON object or null (got an array)"]


def test_the_dedup_key_is_the_message_id_scoped_to_the_user() -> None:
    """The shop's ids collide across users (sprintf('%d', uuid)): the key must tell them apart."""
    a = parse(enc(body(user_id="669a3f12-aaaa", message_id="a" * 64)), now=NOW)
    b = parse(enc(body(user_id="669a3f12-bbbb", message_id="a" * 64)), now=NOW)
    assert a.message_id == b.message_id and a.key != b.key
    assert a.key == event_key("a" * 64, "669a3f12-aaaa")


def test_loose_field_reads_snake_then_camel_without_validating():
    """The one lenient snake/camel lookup (window, failed records, unrouted): snake_case wins when present, even
    as null; anything but a JSON object holds nothing."""
    assert loose_field({"user_id": "u1", "userId": "u2"}, "user_id", "userId") == "u1"
    assert loose_field({"userId": 42}, "user_id", "userId") == 42
    assert loose_field({"user_id": None, "userId": "u2"}, "user_id", "userId") is None
    assert loose_field({}, "user_id", "userId") is None
    assert loose_field(["user_id"], "user_id", "userId") is None and loose_field(None, "user_id", "userId") is None
