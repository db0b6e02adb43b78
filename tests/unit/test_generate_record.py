"""`generate-test-events --record FILE` never writes through a symbolic link (a link planted where the file will be
would have it overwrite the link's target), nor into a FIFO, a device or a file with other hard links; a new file
is created and an existing regular file is overwritten."""

from __future__ import annotations

import os

import pytest

from myshop_ops.tools.generate import Recorder, RecordRefused
from tests.support.services import ROOT, run_cli

pytestmark = pytest.mark.timeout(30)  # a plain open() of a FIFO waits forever for a reader


def test_record_refuses_a_symlink_and_leaves_its_target_alone(tmp_path):
    """The attack: `--record FILE` where FILE is a symlink to a file of the operator's overwrote that file."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    link = tmp_path / "events.jsonl"
    link.symlink_to(target)
    with pytest.raises(RecordRefused, match="symbolic link"):
        Recorder(link)
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "not-yet")
    with pytest.raises(RecordRefused, match="symbolic link"):
        Recorder(dangling)
    assert target.read_text() == "keep me\n" and not (tmp_path / "not-yet").exists()


def test_record_refuses_a_fifo_without_waiting_and_a_hard_link(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(RecordRefused, match="not a regular file"):
        Recorder(fifo)  # no reader: would block forever in a plain open()
    other = tmp_path / "other.txt"
    other.write_text("keep me\n")
    os.link(other, tmp_path / "hard.jsonl")
    with pytest.raises(RecordRefused, match="hard links"):
        Recorder(tmp_path / "hard.jsonl")
    assert other.read_text() == "keep me\n"


def test_record_creates_a_file_or_overwrites_a_regular_one(tmp_path):
    path = tmp_path / "events.jsonl"
    for bodies in ([b"a", b"b", b"c"], [b"d"]):
        rec = Recorder(path)
        for body in bodies:
            rec.write(body)
        rec.close()
        assert path.read_bytes().splitlines() == bodies


def test_the_command_refuses_a_symlinked_record_in_one_line(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (tmp_path / "events.jsonl").symlink_to(target)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "EMBEDDING_PROVIDER": "hash", "HOME": str(tmp_path)}
    done = run_cli("generate-test-events", "--users", "1", "--events-per-user", "1", "--event-type", "search",
                   "--yes", "--record", str(tmp_path / "events.jsonl"), env=env, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "symbolic link" in done.stderr and "Traceback" not in done.stderr
    assert target.read_text() == "keep me\n"
