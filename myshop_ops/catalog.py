"""Product catalog import: JSONL lines -> embedding text -> vectors in ``product_embeddings``.

Each line is one product: ``product_id`` (string, or an integer taken as its decimal string), ``name``,
optional ``description`` (HTML allowed), ``category``, ``stock`` and ``price``. The embedding text is the
cleaned name, category and description, cut at a word boundary to a byte budget well under the
provider's 8191-token input limit. Its sha256 (``text_hash``) is stored with the vector, so a re-run
embeds only products whose text, model or dimensions changed; other field changes (stock, price) are
written without a provider call.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from pymongo import UpdateOne

from myshop_ops.contract import MAX_ID_CHARS, json_kind
from myshop_ops.embeddings import Provider
from myshop_ops.store import SCAN_BATCH, Store

MAX_TEXT_BYTES = 6000  # tokens <= UTF-8 bytes, so <= 6000 tokens: well under the 8191-token input limit
MAX_REPORTED_BAD = 1000  # bad lines kept for the report (all are counted)
MAX_CHARS = {"name": 1000, "category": 200}  # stored as given: bounded (the description is only embedded)
MAX_STOCK = 2**63 - 1  # BSON int64
DEFAULT_BATCH_SIZE = 256
_BLOCK_TAGS = frozenset({"p", "div", "br", "li", "ul", "ol", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6",
                         "section", "article", "table", "dt", "dd", "blockquote", "pre", "hr"})
_SKIP_TAGS = frozenset({"script", "style", "template", "noscript"})
_WORD = re.compile(r"\w", re.UNICODE)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_META_FIELDS = ("name", "category", "stock", "price")


class _TextExtractor(HTMLParser):
    """Visible text of an HTML fragment: tags dropped (block tags become spaces), entities decoded."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skipping = max(0, self._skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def clean_text(text: str) -> str:
    """Plain text of a possibly-HTML string: tags stripped, entities decoded, whitespace collapsed."""
    if "<" in text or "&" in text:
        parser = _TextExtractor()
        parser.feed(text)
        parser.close()
        text = html.unescape("".join(parser.parts))  # entities left in an unterminated tail
    return " ".join(_CONTROL.sub(" ", text).split())


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

    pid = data.get("product_id")
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    if pid is None:
        errors.append("product_id: required")
    elif not isinstance(pid, str):
        errors.append(f"product_id: must be a string or an integer (got {json_kind(pid)})")
    elif not 1 <= len(pid) <= MAX_ID_CHARS or pid != pid.strip():
        errors.append(f"product_id: must be 1..{MAX_ID_CHARS} characters without surrounding spaces")
    elif not _encodable(pid):
        errors.append("product_id: not valid Unicode (lone surrogate)")

    texts: dict[str, str] = {}
    for key, required in (("name", True), ("description", False), ("category", False)):
        value = data.get(key)
        if value is None:
            if required:
                errors.append(f"{key}: required")
        elif not isinstance(value, str):
            errors.append(f"{key}: must be a string (got {json_kind(value)})")
        elif not _encodable(value):
            errors.append(f"{key}: not valid Unicode (lone surrogate)")
        else:
            texts[key] = clean_text(value)
            if len(texts[key]) > MAX_CHARS.get(key, len(texts[key])):
                errors.append(f"{key}: at most {MAX_CHARS[key]} characters (got {len(texts[key])})")
    if "name" in texts and not _WORD.search(texts["name"]):
        errors.append("name: must contain letters or digits")

    stock = data.get("stock")
    if stock is not None and (isinstance(stock, bool) or not isinstance(stock, int) or not 0 <= stock <= MAX_STOCK):
        got = stock if isinstance(stock, int) and not isinstance(stock, bool) else json_kind(stock)
        errors.append(f"stock: must be a non-negative 64-bit integer (got {got})")
    price = data.get("price")
    if price is not None:
        if isinstance(price, bool) or not isinstance(price, int | float):
            errors.append(f"price: must be a non-negative number (got {json_kind(price)})")
        elif price < 0 or not math.isfinite(price):
            errors.append(f"price: must be a non-negative number (got {price})")
    if errors:
        raise BadProduct("; ".join(errors))
    return Product(
        product_id=pid,
        name=texts["name"],
        description=texts.get("description", ""),
        category=texts.get("category") or None,
        stock=stock,
        price=None if price is None else float(price),
    )


@dataclass(frozen=True, slots=True)
class BadLine:
    line: int
    error: str


def read_catalog(path: Path) -> Iterator[tuple[int, Product | BadLine]]:
    """(line number, product or bad line) for every non-blank line; a repeated product_id is a bad line."""
    first_seen: dict[str, int] = {}
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
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

    ``on_bad`` is called for each bad line as it is read, ``on_batch`` after each batch is written. Vectors are
    stored in ``layout`` (STORE_LAYOUT, layout.py): arrays the shop's ranking reads, or compact BSON vectors.
    Raises EmbeddingError (provider) or PyMongoError (store); batches already written stay written, so a
    re-run resumes where it stopped.
    """
    result = ImportResult(model=provider.model, dimensions=provider.dimensions)
    batch: list[Product] = []
    for number, item in read_catalog(path):
        result.lines = number
        if isinstance(item, BadLine):
            result.bad += 1
            if len(result.bad_lines) < MAX_REPORTED_BAD:
                result.bad_lines.append(item)
            if on_bad is not None:
                on_bad(item)
            continue
        batch.append(item)
        if len(batch) >= batch_size:
            _import_batch(batch, store, provider, result, layout)
            batch = []
            if on_batch is not None:
                on_batch(result)
    if batch:
        _import_batch(batch, store, provider, result, layout)
        if on_batch is not None:
            on_batch(result)
    return result


def _import_batch(batch: list[Product], store: Store, provider: Provider, result: ImportResult, layout: str) -> None:
    stored = {
        d["product_id"]: d
        for d in store.products.find(
            {"product_id": {"$in": [p.product_id for p in batch]}},
            {"_id": 0, "product_id": 1, "text_hash": 1, "model": 1, "dimensions": 1, **dict.fromkeys(_META_FIELDS, 1)},
            batch_size=SCAN_BATCH,
        )
    }
    to_embed: list[tuple[Product, str, str]] = []
    to_update: list[Product] = []
    for p in batch:
        text = p.text
        digest = text_hash(text)
        doc = stored.get(p.product_id)
        if (
            doc is None
            or doc.get("text_hash") != digest
            or doc.get("model") != provider.model
            or doc.get("dimensions") != provider.dimensions
        ):
            to_embed.append((p, text, digest))
        elif any(doc.get(k) != v for k, v in p.fields().items()):
            to_update.append(p)
        else:
            result.unchanged += 1
    if to_embed:
        vectors = provider.embed([text for _, text, _ in to_embed])
        store.upsert_products([
            {"product_id": p.product_id, **p.fields(), "embedding": vec, "model": provider.model,
             "dimensions": provider.dimensions, "text_hash": digest}
            for (p, _, digest), vec in zip(to_embed, vectors, strict=True)
        ], layout)
        result.imported += len(to_embed)
    if to_update:
        now = datetime.now(UTC)
        store.products.bulk_write(
            [UpdateOne({"product_id": p.product_id}, {"$set": {**p.fields(), "updated_at": now}}) for p in to_update],
            ordered=False,
        )
        result.updated += len(to_update)
