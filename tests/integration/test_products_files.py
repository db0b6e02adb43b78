"""`myshop products import` on hostile files and names: special files, markup in the path and in bad lines,
entity-encoded markup in names (the stored fields are checked on the real Mongo-wire server)."""

from __future__ import annotations

import json
import os

import pytest

from myshop_ops.adapters.store import Store
from tests.support.services import run_cli

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
def test_products_import_dev_zero_and_fifo_are_refused_at_once(env, tmp_path):
    """`products import /dev/zero` never finished (it read zeros forever); a FIFO blocked the open. One line,
    exit 2, checked on the opened descriptor."""
    fifo = tmp_path / "catalog.fifo"
    os.mkfifo(fifo)
    for path, kind in (("/dev/zero", "a character device"), (fifo, "a FIFO")):
        done = run_cli("products", "import", str(path), env=env.subprocess_env(COLUMNS="300"), timeout=30)
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert done.stderr == (f"error: catalog {path}: not a regular file ({kind}): give a file, not a pipe or a "
                               "device (give a JSONL file, one product per line)\n")


def test_products_import_markup_in_path_and_bad_lines_is_text(env, tmp_path):
    """A catalog path containing `[/z]` and a duplicate product_id `[/x]` crashed the import with rich's
    MarkupError; both are shown as written. The name `&lt;img src=x onerror=alert(1)&gt; Headphones` was stored
    as a tag the shop's PHP may render; it is stored as text now."""
    folder = tmp_path / "cat[/z]"  # the directory "z]" in "cat["
    folder.mkdir(parents=True)
    path = folder / "c[bold]x.jsonl"
    rows = [{"product_id": "[/x]", "name": "&lt;img src=x onerror=alert(1)&gt; Headphones"},
            {"product_id": "[/x]", "name": "again"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run_cli("products", "import", str(path), env=env.subprocess_env(COLUMNS="400"))
    assert "Traceback" not in done.stderr and done.returncode == 1, done.stderr
    assert "line 2: product_id '[/x]' repeats line 1" in done.stderr
    assert (f"{path}: 1 embedded (new or changed text), 0 price/stock-only updates (not re-embedded), 0 unchanged, "
            "1 bad line(s) skipped") in done.stdout
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    try:
        doc = store.products.find_one({"product_id": "[/x]"})
    finally:
        store.close()
    assert doc["name"] == "< img src=x onerror=alert(1)> Headphones"
