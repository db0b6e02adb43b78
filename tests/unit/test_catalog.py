"""myshop_ops.catalog, pure parts: line parsing, embedding text (HTML, whitespace, truncation), hashing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from myshop_ops.catalog import (
    MAX_TEXT_BYTES,
    BadLine,
    BadProduct,
    Product,
    clean_text,
    parse_line,
    read_catalog,
    text_hash,
    truncate_words,
)
from tools import make_catalog

ROOT = Path(__file__).resolve().parents[2]


def line(**fields) -> str:
    return json.dumps(fields)


@pytest.mark.parametrize(("raw", "clean"), [
    ("<p>Deep <b>bass</b></p><ul><li>USB-C</li><li>ANC</li></ul>", "Deep bass USB-C ANC"),
    ("Salt &amp; pepper&nbsp;mill &lt;3 &#8364;5", "Salt & pepper mill <3 €5"),
    ("Fast<script>alert('x')</script> charger<style>p{color:red}</style>", "Fast charger"),
    ("  many\t\n  spaces\r\nhere ", "many spaces here"),
    ("line<br/>break", "line break"),
    ("Quill & Co", "Quill & Co"),
    ("a < b and c > d", "a < b and c > d"),
    ("bell\x07 and \x00null", "bell and null"),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_truncate_at_a_word_boundary_within_the_byte_budget():
    text = " ".join(f"word{i}" for i in range(5000))
    cut = truncate_words(text, 100)
    assert len(cut.encode()) <= 100 and text.startswith(cut) and text[len(cut)] == " "
    assert truncate_words("short text", 100) == "short text"
    assert truncate_words("exactly ten", 11) == "exactly ten"
    assert truncate_words("abc defgh", 5) == "abc"
    assert truncate_words("abc defgh", 3) == "abc"  # the cut falls on the space


def test_truncate_never_splits_a_character_and_cuts_one_huge_word():
    text = "Grüße " + "ü" * 50
    assert truncate_words(text, 8) == "Grüße"
    huge = "é" * 1000
    cut = truncate_words(huge, 101)
    assert cut == "é" * 50 and len(cut.encode()) == 100


def test_product_text_puts_name_and_category_first_and_stays_under_the_budget():
    p = parse_line(line(product_id="p1", name="<b>Trail</b>  Shoes", category="sports",
                        description="<p>" + "grippy lugs " * 2000 + "</p>"))
    assert p.name == "Trail Shoes" and p.category == "sports"
    assert p.text.startswith("Trail Shoes. sports. grippy lugs grippy")
    assert len(p.text.encode()) <= MAX_TEXT_BYTES and "<" not in p.text and p.text.endswith(("grippy", "lugs"))
    assert parse_line(line(product_id="p2", name="Mug")).text == "Mug."


def test_parse_line_accepts_integer_ids_and_optional_fields():
    p = parse_line(line(product_id=42, name="Kettle", description=None, category=None, stock=0, price=19))
    assert p == Product("42", "Kettle", "", None, 0, 19.0)
    assert p.fields() == {"name": "Kettle", "category": None, "stock": 0, "price": 19.0}


@pytest.mark.parametrize(("raw", "error"), [
    ("{not json", "invalid JSON"),
    ('{"product_id": "p", "name": "x", "price": NaN}', "invalid JSON (NaN is not valid JSON)"),
    ("[1, 2]", "must be a JSON object (got an array)"),
    (line(name="x"), "product_id: required"),
    (line(product_id="p"), "name: required"),
    (line(product_id=True, name="x"), "product_id: must be a string or an integer (got a boolean)"),
    (line(product_id="", name="x"), "product_id: must be 1..128 characters"),
    (line(product_id=" p", name="x"), "without surrounding spaces"),
    (line(product_id="p", name=["x"]), "name: must be a string (got an array)"),
    (line(product_id="p", name="<br/>!!"), "name: must contain letters or digits"),
    (line(product_id="p", name="x", description=5), "description: must be a string (got a number)"),
    (line(product_id="p", name="x", category={}), "category: must be a string (got an object)"),
    (line(product_id="p", name="x", stock=-1), "stock: must be a non-negative 64-bit integer (got -1)"),
    (line(product_id="p", name="x", stock=2**63), f"stock: must be a non-negative 64-bit integer (got {2**63})"),
    (line(product_id="p", name="x", stock=2.5), "stock: must be a non-negative 64-bit integer (got a number)"),
    (line(product_id="p", name="x", stock=True), "stock: must be a non-negative 64-bit integer (got a boolean)"),
    ('{"product_id": "p\\ud800", "name": "x"}', "product_id: not valid Unicode (lone surrogate)"),
    ('{"product_id": "p", "name": "x", "description": "a\\udc00b"}', "description: not valid Unicode"),
    (line(product_id="p", name="n" * 1001), "name: at most 1000 characters (got 1001)"),
    (line(product_id="p", name="x", category="c" * 201), "category: at most 200 characters (got 201)"),
    (line(product_id="p", name="x", price="9.99"), "price: must be a non-negative number (got a string)"),
    (line(product_id="p", name="x", price=-1), "price: must be a non-negative number (got -1)"),
])
def test_parse_line_rejects(raw, error):
    with pytest.raises(BadProduct) as exc:
        parse_line(raw)
    assert error in str(exc.value) and "\n" not in str(exc.value)


def test_parse_line_lists_every_problem():
    with pytest.raises(BadProduct) as exc:
        parse_line(line(stock="many", price="free"))
    assert str(exc.value).split("; ") == [
        "product_id: required", "name: required",
        "stock: must be a non-negative 64-bit integer (got a string)",
        "price: must be a non-negative number (got a string)",
    ]


def test_text_hash_follows_the_text_only():
    a = parse_line(line(product_id="p", name="Lamp", description="warm light", price=10, stock=1))
    b = parse_line(line(product_id="p", name="Lamp", description="<p>warm   light</p>", price=12))
    c = parse_line(line(product_id="p", name="Lamp", description="cold light"))
    assert text_hash(a.text) == text_hash(b.text) != text_hash(c.text)
    assert len(text_hash(a.text)) == 64


def test_read_catalog_numbers_lines_and_reports_bad_ones(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + line(product_id="a", name="A").encode() + b"\n"
        b"\n"
        b"{oops\n"
        + line(product_id="b", name="B").encode() + b"\n"
        b"   \n"
        + line(product_id="a", name="A again").encode() + b"\n"
        b'{"product_id": "c", "name": "\xff"}\n'
        + line(product_id="d", name="D").encode()  # no final newline
    )
    got = list(read_catalog(path))
    assert [(n, type(x).__name__) for n, x in got] == [
        (1, "Product"), (3, "BadLine"), (4, "Product"), (6, "BadLine"), (7, "BadLine"), (8, "Product")]
    assert got[1][1] == BadLine(3, got[1][1].error) and got[1][1].error.startswith("invalid JSON")
    assert got[3][1].error == "product_id 'a' repeats line 1"
    assert got[4][1].error.startswith("not valid UTF-8")


def test_demo_catalog_is_the_generators_output():
    """examples/catalog.jsonl is what tools/make_catalog.py writes: >= 200 valid products, 8 categories, some HTML."""
    text = (ROOT / "examples" / "catalog.jsonl").read_text(encoding="utf-8")
    assert text == make_catalog.render()
    products = [parse_line(raw) for raw in text.splitlines()]
    assert len(products) >= 200 and len({p.product_id for p in products}) == len(products)
    assert len({p.category for p in products}) == 8
    assert sum("<p>" in raw for raw in text.splitlines()) >= 40
