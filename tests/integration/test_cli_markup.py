"""Outside text that looks like rich markup (`[/x]`) is shown as written by the commands of cli/setup.py and
cli/purge.py, never parsed (a closing tag without an opening one raised MarkupError)."""

from __future__ import annotations

import pytest

from myshop_ops.adapters import broker
from myshop_ops.adapters.store import Store
from tests.support.services import run_cli
from tests.support.workers import one_line

pytestmark = pytest.mark.integration


def test_setup_indexes_with_a_duplicate_product_id_of_markup(env):
    """The attack: a duplicate product_id `[/x]` crashed setup-indexes' refusal with MarkupError."""
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    try:
        store.products.insert_many([{"product_id": "[/x]", "name": "[/x]"}, {"product_id": "[/x]", "name": "[/x]"}])
        done = run_cli("setup-indexes", env=env.subprocess_env(COLUMNS="200"))
    finally:
        store.close()
    assert done.returncode == 1 and "Traceback" not in done.stderr and "MarkupError" not in done.stderr, done.stderr
    assert "product_id_unique" in done.stdout and "share a value of product_id" in one_line(done.stdout)


def test_purge_of_a_queue_named_like_markup(env):
    queue = f"{env['MONGODB_DB']}[/x]"
    conn = broker.connect(env.settings().rabbitmq_dsn)
    try:
        conn.channel().queue_declare(queue)
        done = run_cli("purge", queue, "--dry-run", env=env.subprocess_env())
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert f"would purge: '{queue}' holds 0 ready message(s)" in one_line(done.stdout)
    finally:
        conn.channel().queue_delete(queue)
        conn.close()
