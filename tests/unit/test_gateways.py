"""One gateway per store (ARCHITECTURE.md): no module of the package but store.py touches a pymongo collection or
database. A grep, so that a new raw query elsewhere fails here instead of in review."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "myshop_ops"
RAW = re.compile(r"\bstore\.(users|products|failed|db|client)\b|\.(find|find_one)\(\s*\{|\.(find_one_and_delete|"
                 r"count_documents|estimated_document_count|delete_many|delete_one|update_one|update_many|insert_one|"
                 r"insert_many|bulk_write|aggregate)\(|pymongo\.collection|pymongo import .*MongoClient")


def test_only_the_store_touches_mongodb_collections():
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path.name != "store.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if RAW.search(line)]
    assert offenders == []


REDIS = re.compile(r"^\s*(import redis\b|from redis\b)")


def test_only_dedup_talks_to_redis():
    """Redis keys are named and touched in adapters/dedup.py alone (other modules catch its RedisError)."""
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path.name != "dedup.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if REDIS.search(line)]
    assert offenders == []
