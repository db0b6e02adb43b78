"""Product catalog import: JSONL lines -> embedding text -> vectors in ``product_embeddings``.

Each line is one product: ``product_id`` (string, or an integer taken as its decimal string), ``name``,
optional ``description`` (HTML allowed), ``category``, ``stock`` and ``price``. The embedding text is the
cleaned name, category and description, cut at a word boundary to a byte budget well under the
provider's 8191-token input limit. Its sha256 (``text_hash``) is stored with the vector, so a re-run
embeds only products whose text, model or dimensions changed; other field changes (stock, price) are
written without a provider call. A product the provider refuses (embeddings.InputRefused: refused alone, or an
unusable vector) is a bad line by its number; the others of its batch are imported.

A catalog is a file someone hands the operator: every step is linear in its input and bounded per line. A line over
MAX_LINE_BYTES is refused by number without being held (lines.bounded_lines); markup is stripped by one forward scan
(no html.parser: it raised AssertionError on ``<![<`` and was quadratic on ``<a<a<a...``); text fields have control
characters replaced by spaces and product ids with any are refused, by the contract's rule (contract.CONTROL).
Stored text is text, never markup the shop's pages could render: after tags are stripped and character references
decoded, a ``<`` that would open a tag, comment or declaration gets a space after it (``&lt;img&gt;`` is stored as
``< img>``). The catalog must be a regular file (lines.open_regular): a FIFO or a device is refused.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from myshop_ops.adapters.embeddings import EmbeddingError, InputRefused, Provider, embed_each
from myshop_ops.adapters.store import Store
from myshop_ops.base.contract import CONTROL, MAX_ID_CHARS, json_kind
from myshop_ops.tools.lines import bounded_lines, open_regular

# A product line is a few KB (name <= 1000 and category <= 200 characters, and a description of which only the first
# 6000 bytes of text are embedded); a shop editor's HTML with inline styles can reach tens of KB. 1 MiB leaves room
# for any real product and bounds a line's memory (JSON and text: a few MB at most).
MAX_LINE_BYTES = 1024 * 1024
MAX_TEXT_BYTES = 6000  # tokens <= UTF-8 bytes, so <= 6000 tokens: well under the 8191-token input limit
MAX_REPORTED_BAD = 1000  # bad lines kept for the report (all are counted)
MAX_CHARS = {"name": 1000, "category": 200}  # stored as given: bounded (the description is only embedded)
MAX_STOCK = 2**63 - 1  # BSON int64
DEFAULT_BATCH_SIZE = 256
_BLOCK_TAGS = frozenset({"p", "div", "br", "li", "ul", "ol", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6",
                         "section", "article", "table", "dt", "dd", "blockquote", "pre", "hr"})
_SKIP_TAGS = frozenset({"script", "style", "template", "noscript"})
_WORD = re.compile(r"\w", re.UNICODE)
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_OPENER = re.compile(r"<[A-Za-z!?]|</[A-Za-z]")  # what starts a tag, comment or declaration ("a < b" is text)
_MARKUP_OPENER = re.compile(r"<(?=[/!?]|[^\W\d_])")  # what an HTML parser would open markup with (any letter)
_PLAIN_TAG = re.compile(r"</?([A-Za-z][A-Za-z0-9]*)[^<>\"']*>")  # no quotes: the common case, one match
# one character reference, bounded: html.unescape of "&#" + 5000 digits raises ValueError (int digit limit)
_ENTITY = re.compile(r"&(?:#[0-9]{1,10};?|#[xX][0-9a-fA-F]{1,8};?|[A-Za-z][A-Za-z0-9]{0,31};?)")
_SPACE = " \t\n\r\f"
_META_FIELDS = ("name", "category", "stock", "price")


class _Next:
    """The next position of a string (or pattern) at or after ``start``, for starts that never go back: a position
    found is reused until passed and a miss holds for every later start, so each part of the text is searched once."""

    __slots__ = ("_at", "_find")

    def __init__(self, find: Callable[[int], int]) -> None:
        self._find = find
        self._at = -2  # not searched yet

    def __call__(self, start: int) -> int:
        if self._at == -1 or self._at >= start:
            return self._at
        self._at = self._find(start)
        return self._at


def _pattern_finder(text: str, pattern: re.Pattern[str]) -> Callable[[int], int]:
    def find(start: int) -> int:
        m = pattern.search(text, start)
        return -1 if m is None else m.start()
    return find


def _decode_entities(text: str) -> str:
    return _ENTITY.sub(lambda m: html.unescape(m.group()), text) if "&" in text else text


class _MarkupScan:
    """The forward-only finders of one :func:`strip_markup` scan, and where each construct it meets ends."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.gt = _Next(lambda i: text.find(">", i))
        self.opener = _Next(_pattern_finder(text, _OPENER))
        self.quotes = {q: _Next(lambda i, q=q: text.find(q, i)) for q in "\"'"}
        self.comment_end = _Next(lambda i: text.find("-->", i))
        self.skip_ends: dict[str, _Next] = {}

    def construct(self, pos: int) -> tuple[int, str | None]:
        """The index after the tag, comment or declaration opening at ``pos`` (-1 if never closed), and the tag's
        lowercase name (None for a comment or declaration)."""
        text = self.text
        if text[pos + 1] in "!?":
            return self.declaration_end(pos), None
        if (plain := _PLAIN_TAG.match(text, pos)) is not None:
            return plain.end(), plain[1].lower()
        name_at = pos + 2 if text[pos + 1] == "/" else pos + 1
        return self.tag_end(pos), text[name_at:_TAG_NAME.match(text, name_at).end()].lower()

    def declaration_end(self, pos: int) -> int:
        """The index after the comment, or the ``<!...>`` / ``<?...>`` up to its first ">", at ``pos``; -1 if none."""
        if self.text.startswith("<!--", pos):
            k = self.comment_end(pos + 4)
            return -1 if k == -1 else k + 3
        k = self.gt(pos + 2)
        return -1 if k == -1 else k + 1

    def tag_end(self, pos: int) -> int:
        """The index after the tag opening at ``pos`` (quoted attribute values may hold ">"), -1 if never closed."""
        text, i = self.text, pos + 2
        while (g := self.gt(i)) != -1:
            q = min((p for p in (self.quotes['"'](i), self.quotes["'"](i)) if p != -1), default=-1)
            if q == -1 or q > g:
                return g + 1
            k = q - 1
            while k > i and text[k] in _SPACE:
                k -= 1
            if text[k] != "=":  # not a value: a stray quote
                i = q + 1
                continue
            close = self.quotes[text[q]](q + 1)
            if close == -1:  # never closed: the tag ends at the first ">"
                return g + 1
            i = close + 1
        return -1

    def skipped_end(self, name: str, start: int) -> int:
        """Where the content of a ``name`` element (script, style...) from ``start`` ends: its closing tag, else the
        end of the text."""
        if name not in self.skip_ends:
            self.skip_ends[name] = _Next(_pattern_finder(self.text, re.compile(f"</{name}", re.IGNORECASE)))
        k = self.skip_ends[name](start)
        return len(self.text) if k == -1 else k


def strip_markup(text: str) -> str:
    """The visible text of an HTML fragment in one forward scan (linear in its length): tags and comments dropped
    (block tags become spaces), script/style/template/noscript content dropped, character references decoded.
    A ``<`` that opens no tag stays text, and so does everything after a tag or comment that is never closed."""
    scan = _MarkupScan(text)
    parts: list[str] = []
    data = at = 0  # data: start of the text not emitted yet; at: where to look for the next opener
    while (pos := scan.opener(at)) != -1:
        end, name = scan.construct(pos)
        if end == -1:  # never closed: the rest is text
            break
        parts.append(_decode_entities(text[data:pos]))
        data = at = end
        if name in _BLOCK_TAGS:
            parts.append(" ")
        elif name in _SKIP_TAGS and text[pos + 1] != "/" and text[end - 2] != "/":
            data = at = scan.skipped_end(name, end)  # a script never closed runs to the end
    parts.append(_decode_entities(text[data:]))
    return "".join(parts)


def clean_text(text: str) -> str:
    """Plain text of a possibly-HTML string: markup stripped, character references decoded, control characters
    (contract.CONTROL: C0, DEL, C1, line separators, bidi controls) made spaces, whitespace collapsed, and text
    never markup: a ``<`` that would open a tag, comment or declaration (followed by a letter, ``/``, ``!`` or
    ``?``: decoded from ``&lt;``, left by a tag never closed, or joined by stripping) gets a space after it."""
    if "<" in text or "&" in text:
        text = strip_markup(text)
    text = " ".join(CONTROL.sub(" ", text).split())
    return _MARKUP_OPENER.sub("< ", text) if "<" in text else text


def truncate_words(text: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes at a word boundary (mid-word only for one huge word)."""
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    head = raw[:max_bytes].decode(errors="ignore")  # the longest prefix within budget, no split character
    if text[len(head)].isspace():
        return head.rstrip()
    space = head.rfind(" ")
    return head[:space].rstrip() if space > 0 else head


def text_hash(text: str) -> str:
    """The sha256 hex of an embedding text: what decides whether a product must be re-embedded."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Product:
    """One valid catalog line, its text fields cleaned."""

    product_id: str
    name: str
    description: str = ""
    category: str | None = None
    stock: int | None = None
    price: float | None = None

    @property
    def text(self) -> str:
        """The embedding text: name, category, description; at most MAX_TEXT_BYTES bytes."""
        head = f"{self.name}. {self.category}." if self.category else f"{self.name}."
        return truncate_words(f"{head} {self.description}".strip())

    def fields(self) -> dict[str, Any]:
        """The stored fields besides the vector (missing optional values stored as null)."""
        return {"name": self.name, "category": self.category, "stock": self.stock, "price": self.price}


class BadProduct(ValueError):
    """A catalog line that cannot be imported; ``str()`` lists every problem on one line."""


def _encodable(text: str) -> bool:
    """False when the string holds a lone surrogate (possible through JSON ``\\ud800`` escapes)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _product_id(value: Any, errors: list[str]) -> str | None:
    """1..MAX_ID_CHARS characters, no surrounding spaces, no control characters; an integer is its decimal string."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None:
        errors.append("product_id: required")
    elif not isinstance(value, str):
        errors.append(f"product_id: must be a string or an integer (got {json_kind(value)})")
    elif not 1 <= len(value) <= MAX_ID_CHARS or value != value.strip():
        errors.append(f"product_id: must be 1..{MAX_ID_CHARS} characters without surrounding spaces")
    elif not _encodable(value):
        errors.append("product_id: not valid Unicode (lone surrogate)")
    elif (bad := CONTROL.search(value)) is not None:  # an id is a key: cleaning it would match another product
        errors.append(f"product_id: must not contain control characters (U+{ord(bad.group()):04X} at {bad.start()})")
    else:
        return value
    return None


def _text_field(key: str, value: Any, required: bool, errors: list[str]) -> str | None:
    """The cleaned text of a string field (also when it is over its MAX_CHARS bound, which is reported)."""
    if value is None:
        if required:
            errors.append(f"{key}: required")
        return None
    if not isinstance(value, str):
        errors.append(f"{key}: must be a string (got {json_kind(value)})")
        return None
    if not _encodable(value):
        errors.append(f"{key}: not valid Unicode (lone surrogate)")
        return None
    text = clean_text(value)
    if len(text) > MAX_CHARS.get(key, len(text)):
        errors.append(f"{key}: at most {MAX_CHARS[key]} characters (got {len(text)})")
    return text


def _text_fields(data: dict[str, Any], errors: list[str]) -> dict[str, str]:
    """The cleaned text fields given: name (required, with letters or digits), description, category."""
    texts: dict[str, str] = {}
    for key, required in (("name", True), ("description", False), ("category", False)):
        if (text := _text_field(key, data.get(key), required, errors)) is not None:
            texts[key] = text
    if "name" in texts and not _WORD.search(texts["name"]):
        errors.append("name: must contain letters or digits")
    return texts


def _stock(value: Any, errors: list[str]) -> int | None:
    """An optional non-negative 64-bit integer."""
    if value is None:
        return None
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and 0 <= value <= MAX_STOCK:
        return value
    errors.append(f"stock: must be a non-negative 64-bit integer (got {value if is_int else json_kind(value)})")
    return None


def _price(value: Any, errors: list[str]) -> float | None:
    """An optional non-negative finite number, as a float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        errors.append(f"price: must be a non-negative number (got {json_kind(value)})")
        return None
    try:
        price = float(value)
    except OverflowError:  # an integer beyond any float: never a price
        errors.append("price: must be a non-negative number (got an integer too large for a float)")
        return None
    if price < 0 or not math.isfinite(price):
        errors.append(f"price: must be a non-negative number (got {value})")
        return None
    return price


def parse_line(line: str) -> Product:
    """A product from one JSONL line; raises BadProduct naming every broken field."""
    try:
        data = json.loads(line, parse_constant=_reject_constant)
    except RecursionError:
        raise BadProduct("invalid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise BadProduct(f"invalid JSON ({str(exc).splitlines()[0][:100]})") from None
    if not isinstance(data, dict):
        raise BadProduct(f"must be a JSON object (got {json_kind(data)})")
    errors: list[str] = []
    pid = _product_id(data.get("product_id"), errors)
    texts = _text_fields(data, errors)
    stock = _stock(data.get("stock"), errors)
    price = _price(data.get("price"), errors)
    if errors:
        raise BadProduct("; ".join(errors))
    return Product(
        product_id=pid,
        name=texts["name"],
        description=texts.get("description", ""),
        category=texts.get("category") or None,
        stock=stock,
        price=price,
    )


@dataclass(frozen=True, slots=True)
class BadLine:
    line: int
    error: str


def read_catalog(path: Path) -> Iterator[tuple[int, Product | BadLine]]:
    """(line number, product or bad line) for every non-blank line; a repeated product_id is a bad line, and so is
    a line over MAX_LINE_BYTES (never read whole: memory stays bounded by the limit). OSError (lines.NotARegularFile
    for a FIFO, a device or a directory) when ``path`` cannot be read as a file."""
    first_seen: dict[str, int] = {}
    with open_regular(path) as fh:  # a FIFO or /dev/zero would never end
        for number, raw, size in bounded_lines(fh, MAX_LINE_BYTES):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, size = raw[3:], size - 3
            if size > MAX_LINE_BYTES:
                yield number, BadLine(number, f"line too long: {size} bytes, at most {MAX_LINE_BYTES} (MAX_LINE_BYTES)")
                continue
            if not raw.strip():
                continue
            try:
                product = parse_line(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield number, BadLine(number, f"not valid UTF-8 (at byte {exc.start})")
                continue
            except BadProduct as exc:
                yield number, BadLine(number, str(exc))
                continue
            first = first_seen.setdefault(product.product_id, number)
            if first != number:
                yield number, BadLine(number, f"product_id {product.product_id!r} repeats line {first}")
                continue
            yield number, product


@dataclass
class ImportResult:
    """What an import did. ``imported``: embedded and stored; ``updated``: same text, other fields rewritten."""

    model: str
    dimensions: int
    lines: int = 0
    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    bad: int = 0
    bad_lines: list[BadLine] = field(default_factory=list)

    @property
    def products(self) -> int:
        return self.imported + self.updated + self.unchanged

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "dimensions": self.dimensions, "lines": self.lines, "products": self.products,
            "imported": self.imported, "updated": self.updated, "unchanged": self.unchanged, "bad": self.bad,
            "bad_lines": [{"line": b.line, "error": b.error} for b in self.bad_lines],
        }


def import_catalog(
    path: Path,
    store: Store,
    provider: Provider,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_bad: Callable[[BadLine], None] | None = None,
    on_batch: Callable[[ImportResult], None] | None = None,
    layout: str = "shop",
) -> ImportResult:
    """Import a JSONL catalog in batches of ``batch_size`` products: one ``$in`` read of stored hashes, one
    provider call for the products whose text, model or dimensions changed, one bulk write.

    ``on_bad`` is called for each bad line as it is read (for a line the provider cannot embed: once its batch is
    embedded), ``on_batch`` after each batch is written. Vectors are stored in ``layout`` (STORE_LAYOUT, layout.py):
    arrays the shop's ranking reads, or compact BSON vectors. Raises EmbeddingError when the provider fails as a
    whole (unreachable, rate limited, a refused key or model) or PyMongoError (store); batches already written stay
    written, so a re-run resumes where it stopped.
    """
    result = ImportResult(model=provider.model, dimensions=provider.dimensions)

    def bad(line: BadLine) -> None:
        result.bad += 1
        if len(result.bad_lines) < MAX_REPORTED_BAD:
            result.bad_lines.append(line)
        if on_bad is not None:
            on_bad(line)

    batch: list[tuple[int, Product]] = []
    for number, item in read_catalog(path):
        result.lines = number
        if isinstance(item, BadLine):
            bad(item)
            continue
        batch.append((number, item))
        if len(batch) >= batch_size:
            _import_batch(batch, store, provider, result, layout, bad)
            batch = []
            if on_batch is not None:
                on_batch(result)
    if batch:
        _import_batch(batch, store, provider, result, layout, bad)
        if on_batch is not None:
            on_batch(result)
    return result


def _import_batch(batch: list[tuple[int, Product]], store: Store, provider: Provider, result: ImportResult,
                  layout: str, bad: Callable[[BadLine], None]) -> None:
    stored = store.products_by_id([p.product_id for _, p in batch],
                                  ("text_hash", "model", "dimensions", *_META_FIELDS))
    to_embed: list[tuple[int, Product, str, str]] = []
    to_update: list[Product] = []
    for number, p in batch:
        text = p.text
        digest = text_hash(text)
        doc = stored.get(p.product_id)
        if (
            doc is None
            or doc.get("text_hash") != digest
            or doc.get("model") != provider.model
            or doc.get("dimensions") != provider.dimensions
        ):
            to_embed.append((number, p, text, digest))
        elif any(doc.get(k) != v for k, v in p.fields().items()):
            to_update.append(p)
        else:
            result.unchanged += 1
    if to_embed:
        _embed_and_store(to_embed, store, provider, result, layout, bad)
    if to_update:
        store.update_products({p.product_id: p.fields() for p in to_update})
        result.updated += len(to_update)


def _embed_and_store(to_embed: list[tuple[int, Product, str, str]], store: Store, provider: Provider,
                     result: ImportResult, layout: str, bad: Callable[[BadLine], None]) -> None:
    """Embed the products and store those that got a vector; a product the provider refused (InputRefused) is a bad
    line by its number. Any other provider failure is raised before the batch is written (a re-run redoes it)."""
    vectors = embed_each(provider, [text for _, _, text, _ in to_embed])
    for got in vectors:
        if isinstance(got, EmbeddingError) and not isinstance(got, InputRefused):
            raise got
    docs = []
    for (number, p, _, digest), got in zip(to_embed, vectors, strict=True):
        if isinstance(got, EmbeddingError):
            bad(BadLine(number, f"product_id {p.product_id!r} not embedded: {got}"))
            continue
        docs.append({"product_id": p.product_id, **p.fields(), "embedding": got, "model": provider.model,
                     "dimensions": provider.dimensions, "text_hash": digest})
    if docs:
        store.upsert_products(docs, layout)
    result.imported += len(docs)
