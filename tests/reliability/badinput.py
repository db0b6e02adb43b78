"""Malformed bodies for the bad-input scenario: a hand-written catalogue, a deterministic mutation generator for
the volume, and hypothesis strategies for the property test. Every body produced here is rejected by the
contract (``parse`` raises InvalidMessage) — generators check it and draw again otherwise."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from myshop_ops.base.contract import InvalidMessage, make_event, parse, serialise
from tests.reliability.harness.plan import Body
from tests.support.events import T0

FIELDS = ("message_id", "version", "user_id", "event_type", "search_phrase", "product_id", "occurred_at", "metadata")
MB = 1024 * 1024


def rejected(body: bytes) -> bool:
    try:
        parse(body)
    except InvalidMessage:
        return True
    return False


def _event(user: str, k: int, event_type: str = "product_view") -> dict:
    ref = f"phrase {k}" if event_type == "search" else f"p{k % 7}"
    return json.loads(serialise(make_event(user, event_type, ref, T0 - timedelta(minutes=k))))


def _dump(d: object, **kw) -> bytes:
    return json.dumps(d, separators=(",", ":"), **kw).encode()


def _with(base: dict, **changes) -> bytes:
    d = dict(base)
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k, None)
        else:
            d[k] = v
    return _dump(d)


_DROP = object()


def catalogue(user: str) -> list[tuple[str, bytes, str | None, str]]:
    """(kind, body, content type, fragment of the expected error message) — one of each kind of damage."""
    ev = _event(user, 1)
    search = _event(user, 2, "search")
    good = _dump(ev)
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    out = [
        ("empty body", b"", "application/json", "not valid JSON"),
        ("whitespace only", b"  \n\t ", "application/json", "not valid JSON"),
        ("plain text", b"hello, world", "text/plain", "not valid JSON"),
        ("truncated JSON", good[:-7], "application/json", "not valid JSON"),
        ("trailing garbage", good + b"xyz", "application/json", "not valid JSON"),
        ("two objects", good + good, "application/json", "not valid JSON"),
        ("JSON array", b"[1,2,3]", "application/json", "must be a JSON object (got an array)"),
        ("array of the event", b"[" + good + b"]", "application/json", "must be a JSON object (got an array)"),
        ("JSON number", b"42", "application/json", "must be a JSON object (got a number)"),
        ("JSON string", b'"an event"', "application/json", "must be a JSON object (got a string)"),
        ("JSON null", b"null", "application/json", "must be a JSON object (got null)"),
        ("JSON true", b"true", "application/json", "must be a JSON object (got a boolean)"),
        ("NaN literal", good[:-1] + b',"x":NaN}', "application/json", "NaN is not valid JSON"),
        ("Infinity literal", good.replace(b'"version":"1.0"', b'"version":Infinity'), "application/json",
         "Infinity is not valid JSON"),
        ("-Infinity literal", good[:-1] + b',"metadata2":-Infinity}', "application/json",
         "-Infinity is not valid JSON"),
        ("invalid UTF-8 byte", good.replace(b'"user_id":"', b'"user_id":"\xff'), "application/json",
         "not valid UTF-8"),
        ("overlong UTF-8", good.replace(b'"user_id":"', b'"user_id":"\xc0\xaf'), "application/json",
         "not valid UTF-8"),
        ("truncated UTF-8 sequence", good[:-2] + b'\xe2\x82"}', "application/json", "not valid UTF-8"),
        ("UTF-16 body", good.decode().encode("utf-16"), "application/json", "not valid UTF-8"),
        ("UTF-8 BOM", b"\xef\xbb\xbf" + good, "application/json", "not valid JSON"),
        # (a lone surrogate in user_id or event_type hits a known bug: see test_known_bad_input_bugs)
        ("lone surrogate escape", _dump(search).replace(b'"search_phrase":"', b'"search_phrase":"\\ud800'),
         "application/json", "lone surrogate"),
        ("raw control character", good.replace(b'"user_id":"', b'"user_id":"\x01'), "application/json",
         "not valid JSON"),
        ("nested arrays 500 deep", b"[" * 500 + b"]" * 500, "application/json", "must be a JSON object"),
        ("nested objects 500 deep", b'{"a":' * 500 + b"1" + b"}" * 500, "application/json", "user_id: required"),
        ("huge user_id (60k chars)", _with(ev, user_id="u" * 60_000), "application/json",
         "user_id: must be a string of 1..128 characters (got 60000)"),
        ("body just over 64 KiB", _with(ev, metadata={"pad": "x" * 65_536}), "application/json",
         "larger than 65536 bytes"),
        ("1 MB body", _with(ev, metadata={"pad": "x" * MB}), "application/json", "larger than 65536 bytes"),
        ("metadata over 4 KiB", _with(ev, metadata={"pad": "x" * 5000}), "application/json", "at most 4096 bytes"),
        ("metadata not an object", _with(ev, metadata=[1, 2]), "application/json", "metadata: must be a JSON object"),
        ("integer past the digit limit", good[:-1] + b',"n":1' + b"0" * 5000 + b"}", "application/json",
         "not valid JSON"),
        ("missing user_id", _with(ev, user_id=_DROP), "application/json", "user_id: required"),
        ("missing event_type", _with(ev, event_type=_DROP), "application/json", "event_type: required"),
        ("missing occurred_at", _with(ev, occurred_at=_DROP), "application/json", "occurred_at: required"),
        ("missing message_id", _with(ev, message_id=_DROP), "application/json", "message_id: required"),
        ("missing product_id", _with(ev, product_id=_DROP), "application/json", "product_id: required"),
        ("missing search_phrase", _with(search, search_phrase=_DROP), "application/json",
         "search_phrase: required for search"),
        ("empty object", b"{}", "application/json", "user_id: required"),
        ("user_id boolean", _with(ev, user_id=True), "application/json", "user_id: must be a string"),
        ("user_id float", _with(ev, user_id=1.5), "application/json", "user_id: must be a string"),
        ("user_id object", _with(ev, user_id={"id": 1}), "application/json", "user_id: must be a string"),
        ("user_id empty", _with(ev, user_id=""), "application/json", "user_id: must be a string of 1..128"),
        ("user_id 129 chars", _with(ev, user_id="u" * 129), "application/json", "(got 129)"),
        ("event_type number", _with(ev, event_type=5), "application/json", "event_type: must be one of"),
        ("event_type unknown", _with(ev, event_type="purchase"), "application/json", "event_type: must be one of"),
        ("phrase on a product event", _with(ev, search_phrase="shoes"), "application/json",
         "search_phrase: must be null or absent"),
        ("product_id on a search", _with(search, product_id="p1"), "application/json",
         "product_id: must be null or absent for search"),
        ("phrase blank", _with(search, search_phrase="   "), "application/json", "after trimming"),
        ("phrase 256 chars", _with(search, search_phrase="s" * 256), "application/json", "after trimming (got 256)"),
        ("occurred_at a number", _with(ev, occurred_at=1_700_000_000), "application/json",
         "occurred_at: must be an ISO-8601 string"),
        ("occurred_at naive", _with(ev, occurred_at="2026-11-01T12:00:00"), "application/json", "naive time"),
        ("occurred_at in the future", _with(ev, occurred_at=future), "application/json", "in the future"),
        ("occurred_at not a date", _with(ev, occurred_at="yesterday"), "application/json", "not an ISO-8601 time"),
        ("occurred_at impossible", _with(ev, occurred_at="2026-13-45T00:00:00+00:00"), "application/json",
         "not an ISO-8601 time"),
        ("message_id upper case", _with(ev, message_id=ev["message_id"].upper()), "application/json",
         "message_id: must be 64 lowercase hex"),
        ("message_id short", _with(ev, message_id=ev["message_id"][:63]), "application/json", "(got 63 characters)"),
        ("message_id not hex", _with(ev, message_id="z" * 64), "application/json", "message_id: must be 64"),
        ("message_id number", _with(ev, message_id=12345), "application/json", "message_id: must be 64"),
        ("version 2.0", _with(ev, version="2.0"), "application/json", "version: must be"),
        ("version a number", _with(ev, version=1.0), "application/json", "version: must be"),
        ("duplicate keys, last one bad", good[:-1] + b',"event_type":"bogus"}', "application/json",
         "event_type: must be one of"),
        ("snake and camel keys disagree", _with(ev, userId=ev["user_id"] + "x"), "application/json",
         "both given with different values"),
        ("wrong content type, bad body", b"<event><user>1</user></event>", "application/xml", "not valid JSON"),
        ("no content type, bad body", b"user=1&type=search", None, "not valid JSON"),
        ("form content type, bad body", _with(ev, user_id=None), "application/x-www-form-urlencoded",
         "user_id: required"),
    ]
    for kind, body, _, _ in out:
        assert rejected(body), f"catalogue entry {kind!r} is accepted by the contract"
    return out


JUNK = (None, True, False, 0, -1, 1.5, 10**30, "", " ", "x" * 300, [], [1], {}, {"a": 1}, "2026-11-01",
        "\u0000", "ünïcødé", "12345678901234567890")


def mutate(base: dict, rng: random.Random) -> bytes:
    """One random kind of damage to a valid event (the caller checks the result is rejected)."""
    op = rng.randrange(9)
    if op == 0:  # a required field removed
        return _with(base, **{rng.choice(("user_id", "event_type", "occurred_at", "message_id")): _DROP})
    if op == 1:  # a field set to junk
        return _with(base, **{rng.choice(FIELDS): rng.choice(JUNK)})
    raw = _dump(base)
    if op == 2:  # cut short
        return raw[: rng.randrange(len(raw))]
    if op == 3:  # an invalid UTF-8 byte somewhere
        i = rng.randrange(len(raw))
        return raw[:i] + bytes([rng.choice((0x80, 0xBF, 0xC0, 0xFE, 0xFF))]) + raw[i:]
    if op == 4:  # a structural character removed
        spots = [i for i, c in enumerate(raw) if c in b'{}[]:,"']
        i = rng.choice(spots)
        return raw[:i] + raw[i + 1:]
    if op == 5:  # a bad time
        when = T0 + timedelta(seconds=rng.randrange(10**6))
        return _with(base, occurred_at=rng.choice((
            when.replace(tzinfo=None).isoformat(), (datetime.now(UTC) + timedelta(hours=rng.randrange(1, 10**4)))
            .isoformat(), when.strftime("%d/%m/%Y %H:%M"), str(int(when.timestamp())))))
    if op == 6:  # a non-object JSON document
        return _dump(rng.choice(([base], base["user_id"], len(raw), None, [])))
    if op == 7:  # a random event type or version
        return _with(base, **rng.choice(({"event_type": rng.choice(("view", "SEARCH", "click ", ""))},
                                         {"version": rng.choice(("2.0", "0.9", "1", "v1"))})))
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))  # noise


def generated(tag: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    """``n`` deterministic malformed bodies (kind, body) by mutation of valid events."""
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    k = 0
    while len(out) < n:
        k += 1
        base = _event(f"{tag}-g{k % 50}", k, rng.choice(("search", "product_view", "product_click")))
        body = mutate(base, rng)
        if rejected(body):
            out.append(("generated", body))
    return out


def bad_bodies(tag: str, n: int, *, seed: int = 8, megabyte_bodies: int = 3) -> list[Body]:
    """At least ``n`` malformed bodies: the catalogue (its 1 MB entry ``megabyte_bodies`` times), then
    generated ones; each with a message id of its own (``{tag}-bad-NNNNN``)."""
    entries = []
    for kind, body, ctype, expect in catalogue(f"{tag}-cat"):
        repeat = megabyte_bodies if kind == "1 MB body" else 1
        entries += [(kind, body, ctype, expect)] * repeat
    entries += [(kind, body, "application/json", "") for kind, body in generated(tag, max(0, n - len(entries)), seed)]
    return [Body(body, f"{tag}-bad-{i:05d}", valid=False, content_type=ctype, kind=kind, expect=expect)
            for i, (kind, body, ctype, expect) in enumerate(entries)]


def unusual_valid(tag: str, n: int, rng: random.Random) -> list[Body]:
    """Valid bodies other producers may send: camelCase keys, integer user ids, spaces, metadata, version 1.x,
    a text/plain content type (the worker judges the body, not the header)."""
    base_int = int(tag[1:], 16) * 1000  # integer user ids unique to this run
    out = []
    for i in range(n):
        style = i % 5
        user: str | int = base_int + i % 20 if style == 1 else f"{tag}-x{i % 20}"
        event = make_event(user, "product_purchase" if i % 2 else "search",
                           f"{tag}-p{i % 5}" if i % 2 else f"{tag} unusual phrase {i % 7}",
                           T0 - timedelta(hours=i, microseconds=rng.randrange(10**6)),
                           metadata={"source": "php", "i": i} if style == 3 else None)
        d = json.loads(serialise(event))
        if style == 1:
            d["user_id"] = user  # a JSON integer
        if style == 0:
            camel = {"user_id": "userId", "event_type": "eventType", "search_phrase": "searchPhrase",
                     "product_id": "productId", "occurred_at": "occurredAt", "message_id": "messageId"}
            d = {camel.get(k, k): v for k, v in d.items()}
        if style == 4:
            d["version"] = "1.7"
        body = json.dumps(d, ensure_ascii=style != 2).encode() if style == 2 else _dump(d)
        out.append(Body(body, event.message_id, content_type="text/plain" if style == 2 else "application/json",
                        kind=f"unusual-{style}"))
        assert not rejected(body)
    return out


# ---- hypothesis -----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def mutated_events(draw) -> bytes:
    base = _event(draw(st.sampled_from(("hyp-a", "hyp-b"))), draw(st.integers(0, 10**6)),
                  draw(st.sampled_from(("search", "product_view", "product_purchase"))))
    field = draw(st.sampled_from(FIELDS))
    if draw(st.booleans()):
        base.pop(field, None)
    else:
        base[field] = draw(json_values)
    raw = json.dumps(base).encode()
    cut = draw(st.none() | st.integers(0, len(raw)))
    return raw if cut is None else raw[:cut]


def _to_json(v) -> bytes:
    try:
        return json.dumps(v, allow_nan=True).encode()
    except ValueError:  # out-of-range floats
        return b"[]"


malformed = (st.binary(max_size=300) | json_values.map(_to_json) | mutated_events()
             | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))).filter(rejected)
