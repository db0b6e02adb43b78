"""failed_messages and user_erasures documents are read through total parsers: anyone with MongoDB access can write
any BSON type into any field of a record. `failed show` (table, one id, --stats, --json, --filter, --since),
`failed retry/remove` and `user delete` never raise; a record that cannot be read is shown as unreadable with its key
and why, the good records beside it still work, and retry/remove by id still act on the queue message."""

from __future__ import annotations

import contextlib
import hashlib
import json
from datetime import UTC, datetime, timedelta

import bson
import pika
import pytest
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from hypothesis import given, settings
from hypothesis import strategies as st
from pymongo.errors import DuplicateKeyError

from myshop_ops.adapters import broker
from myshop_ops.adapters.store import Store, erasure_key
from myshop_ops.cli import failed as failed_cli
from myshop_ops.cli.user import erasure_lines
from myshop_ops.tools.erasure import erase_user
from myshop_ops.tools.failed_queue import FailedBox
from myshop_ops.tools.failed_record import FailedRecord, UnreadableRecord, read_record
from tests.integration.test_stored_documents import ANY_BSON, ANY_BSON_OR_OUT_OF_RANGE_DATE, HYPOTHESIS
from tests.support.services import run_cli

pytestmark = pytest.mark.integration

FAILED_FIELDS = ("failure_id", "message_id", "user_id", "event_type", "error_class", "error_message", "retry_count",
                 "first_failure_at", "last_failure_at", "worker_host", "original_queue", "body", "headers", "history",
                 "original_size", "expires_at")
NOW = datetime.now(UTC).replace(microsecond=0)
_DROP = object()
FEW = settings(HYPOTHESIS, max_examples=12)  # real queues: a walk or three per example

def fid(key: str) -> str:
    """The failure id of the failed copy KEY (32 hex, as a worker makes them)."""
    return hashlib.md5(key.encode()).hexdigest()


GOOD, EVIL = fid("good"), fid("evil")


def record(key: str, **fields) -> dict:
    """A failed_messages document as a worker writes it, with ``fields`` over it."""
    return {"failure_id": fid(key), "message_id": f"m-{key}", "user_id": "u1", "event_type": "search",
            "error_class": "EmbeddingError", "error_message": "provider said no", "retry_count": 3,
            "first_failure_at": NOW, "last_failure_at": NOW, "worker_host": "w1", "original_queue": "events",
            "body": json.dumps({"user_id": "u1", "event_type": "search"}), "headers": {"x-retry-count": 3},
            "history": [{"at": NOW.isoformat(), "error_class": "EmbeddingError", "error_message": "no"}], **fields}


def hostile_record(i: int) -> st.SearchStrategy[dict]:
    """A record with up to four fields replaced by any BSON value or removed (the Mongo-wire server refuses dates
    outside years 1..9999: the decoded-document property covers those)."""
    value = st.one_of(st.just(_DROP), ANY_BSON)
    changes = st.dictionaries(st.sampled_from(FAILED_FIELDS), value, min_size=1, max_size=4)
    return changes.map(lambda c: {k: v for k, v in {**record(f"bad{i}"), **c}.items() if v is not _DROP})


def queue_message(failed_box: FailedBox, key: str) -> None:
    """A failed copy of message ``m-KEY`` in the failed queue, failure id ``fid(KEY)``."""
    ch = failed_box.connection.channel()
    ch.confirm_delivery()
    ch.basic_publish("", failed_box.topo.failed_queue, json.dumps({"user_id": "u1", "n": key}).encode(),
                     pika.BasicProperties(message_id=f"m-{key}", headers={"x-failure-id": fid(key)}))
    ch.close()


def insert(store: Store, docs: list[dict]) -> None:
    for doc in docs:
        with contextlib.suppress(DuplicateKeyError):  # two generated records with one failure id: the index keeps one
            store.failed.insert_one(doc)


def empty(failed_box: FailedBox) -> None:
    for queue in (failed_box.topo.queue, failed_box.topo.failed_queue):
        broker.purge(failed_box.connection, queue)
    failed_box.store.delete_failures()


def show_all(failed_box: FailedBox, capsys) -> str:
    """Everything `failed show` prints, every way, for the current records (the functions the command calls)."""
    drift = failed_box.check()
    records = failed_box.records(limit=100)
    for as_json in (False, True):
        failed_cli._show_list(records, drift, as_json)
        failed_cli._show_stats(failed_box.stats(), drift, as_json)
    failed_cli._show_list(failed_box.records(text="a", limit=100), drift, False)
    failed_cli._show_list(failed_box.records(since=timedelta(hours=1), limit=100), drift, True)
    for r in records:
        failed_cli._print_one(r)
        if r.key is not None:
            failed_cli._show_one(failed_box.matching(r.key), r.key, True)
    return capsys.readouterr().out


def cli(env, *args: str):
    done = run_cli(*args, env=env.subprocess_env(COLUMNS="300"))
    assert "Traceback" not in done.stderr, (args, done.stdout, done.stderr)
    return done


# ---- generated records ------------------------------------------------------------------------------------


def test_property_any_failed_record_fails_only_itself(env, failed_box, capsys):
    """Generated records beside a good one whose message is in the failed queue, in the real store: every way of
    showing them works, each is read or unreadable with a reason, the good one is read; removing a bad one by its
    key and retrying the good one by its failure id work."""
    s = env.settings()
    owners = Store(s.mongodb_url, s.mongodb_db)

    @FEW
    @given(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True).flatmap(
        lambda ids: st.tuples(*(hostile_record(i) for i in ids))))
    def check(docs: tuple[dict, ...]) -> None:
        empty(failed_box)
        queue_message(failed_box, "good")
        insert(failed_box.store, [record("good"), *docs])
        show_all(failed_box, capsys)
        records = failed_box.records(limit=100)
        assert all(isinstance(r, FailedRecord | UnreadableRecord) for r in records)
        assert all(r.reason for r in records if isinstance(r, UnreadableRecord))
        assert [r.key for r in records if isinstance(r, FailedRecord) and r.key == GOOD] == [GOOD]
        assert sum(n for _, n in failed_box.stats()) == failed_box.store.count_failures()
        assert all(isinstance(m, str) and (u is None or isinstance(u, str))
                   for m, u in owners.failure_owners(["m-good", "m-bad0", "m-bad1", "m-bad2"]))
        failed_box.remove([r.key for r in records if r.key not in (None, GOOD, "m-good")][:1])
        assert failed_box.retry([GOOD]).done == [GOOD]
        assert broker.queue_depth(failed_box.connection, failed_box.topo.queue)[0] == 1

    try:
        check()
    finally:
        owners.close()


def test_property_any_decoded_failed_record_is_read_or_refused():
    """Any document as the store's codec options decode it (dates outside years 1..9999 included) is a record or
    unreadable with a reason, and is printed in full and as JSON."""
    store = Store("mongodb://127.0.0.1:1", "x")
    codec = store.client.codec_options
    store.close()

    @HYPOTHESIS
    @given(st.dictionaries(st.sampled_from(FAILED_FIELDS), ANY_BSON_OR_OUT_OF_RANGE_DATE, max_size=6), st.booleans())
    def check(fields: dict, base: bool) -> None:
        doc = bson.decode(bson.encode({**(record("x") if base else {}), **fields}), codec_options=codec)
        rec = read_record(doc)
        if isinstance(rec, UnreadableRecord):
            assert rec.reason
        json.dumps(rec.as_json(), default=str)
        failed_cli._print_one(rec)

    check()


# ---- the concrete hostile records, by name ----------------------------------------------------------------


HOSTILE = {
    "error_message_a_document": record("evil", error_message={"text": "[bold]x", "n": 1}),
    "message_id_a_number": {**record("evil", message_id=Int64(2**63 - 1)), "failure_id": None},
    "failure_id_an_array": record("evil", failure_id=[EVIL, 1]),
    "retry_count_decimal128": record("evil", retry_count=Decimal128("1E+6000")),
    "first_failure_at_not_a_time": record("evil", first_failure_at="yesterday"),
    "history_nested_arrays": record("evil", history=[[["x"]], {"at": 5}]),
    "headers_a_string": record("evil", headers="x-death"),
    "nothing_but_an_error_class": {"error_class": "[/x]"},
}
NO_KEY = ("message_id_a_number", "failure_id_an_array", "nothing_but_an_error_class")


@pytest.mark.parametrize("name", list(HOSTILE))
def test_failed_show_lists_a_hostile_record_beside_good_ones(env, failed_box, name):
    """`failed show` (table, --json) over a hostile record and a good one: exit 0, no traceback; the hostile one is
    listed as unreadable with its key (None: its ids are not text), the good one as it is."""
    queue_message(failed_box, "good")
    insert(failed_box.store, [record("good"), HOSTILE[name]])
    table = cli(env, "failed", "show")
    assert table.returncode == 0 and GOOD in table.stdout and "provider said no" in table.stdout
    assert "unreadable record" in table.stdout
    listed = json.loads(cli(env, "failed", "show", "--json").stdout)["messages"]
    assert [m.get("failure_id") for m in listed if "unreadable" not in m] == [GOOD]
    assert [m["key"] for m in listed if m.get("unreadable")] == [HOSTILE[name].get("failure_id")
                                                                  if name not in NO_KEY else None]


def test_a_record_whose_error_message_is_a_document_is_shown_unreadable_and_its_message_retried(env, failed_box):
    """`failed show EVIL` (full, --json), --stats, --filter/--since list it as unreadable with why; `failed retry
    EVIL` republishes the queue message and removes the record."""
    queue_message(failed_box, "evil")
    insert(failed_box.store, [record("evil", error_message={"text": "[bold]x"})])
    one = cli(env, "failed", "show", EVIL)
    assert one.returncode == 0 and EVIL in one.stdout and "unreadable record" in one.stdout
    assert "error_message is dict, not text" in one.stdout
    assert json.loads(cli(env, "failed", "show", EVIL, "--json").stdout) == {
        "key": EVIL, "unreadable": "error_message is dict, not text"}
    assert "EmbeddingError" in cli(env, "failed", "show", "--stats").stdout
    listed = cli(env, "failed", "show", "--filter", "evil", "--since", "1h")
    assert listed.returncode == 0 and EVIL in listed.stdout and "unreadable record" in listed.stdout
    retried = cli(env, "failed", "retry", EVIL, "--force")  # the queue message, whatever its record holds
    assert retried.returncode == 0 and "retried 1 message(s)" in retried.stdout
    assert failed_box.store.count_failures() == 0
    assert broker.queue_depth(failed_box.connection, failed_box.topo.queue)[0] == 1


def test_remove_by_id_deletes_an_orphan_record_whose_failure_id_is_not_text(env, failed_box):
    """A record named by its message id whose failure id is a number (no message left in the queue): removed."""
    insert(failed_box.store, [record("evil", failure_id=Int64(7))])
    done = cli(env, "failed", "remove", "m-evil", "--force")
    assert done.returncode == 0 and "removed 1 message(s)" in done.stdout, done.stdout
    assert failed_box.store.count_failures() == 0


def test_failure_owners_leaves_out_a_record_whose_message_id_is_an_array(env, failed_box):
    """`verify` marks events in failed by (message id, user): an array holding the id matches ``$in`` too."""
    insert(failed_box.store, [record("a", message_id=["m-a", 1], user_id={"x": 1}), record("b", user_id=5)])
    assert sorted(failed_box.store.failure_owners(["m-a", "m-b"])) == [("m-b", None)]


# ---- erasure records --------------------------------------------------------------------------------------


def test_an_erasure_record_dated_9999_is_unreadable_and_user_delete_replaces_it(env, topology):
    """A forged erasure time at the end of time (the worker's cutoff, the time plus the contract's tolerance,
    overflowed on it): unreadable, so the user's
    events fail with a reason; `user delete` records a real time over it and prints its report."""
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    try:
        store.erasures.insert_one({"_id": erasure_key("u9"), "erased_at": datetime(9999, 12, 31, tzinfo=UTC)})
        times, unreadable = store.erasure_times(["u9"])
        assert times == {} and "no readable erased_at" in str(unreadable["u9"])
        done = erase_user(s, "u9")
        assert abs(done.erased_at - datetime.now(UTC)) < timedelta(minutes=1)
        assert erasure_lines(done, s.mongodb_db, s.idempotency_ttl)
        assert store.erasure_times(["u9"]) == ({"u9": done.erased_at}, {})
    finally:
        store.close()


def test_user_delete_prints_a_profile_whose_version_and_count_are_markup(env, topology):
    s = env.settings()
    store = Store(s.mongodb_url, s.mongodb_db)
    store.users.insert_one({"user_id": "u-markup", "version": "[/x]", "event_count": {"[bold]": 1}})
    store.close()
    done = cli(env, "user", "delete", "u-markup", "--force")
    assert done.returncode == 0 and "erased user u-markup: profile (version ?, ? events)" in done.stdout
