"""Lines of a file handed to an operator (a catalog, an events file), read in bounded memory.

Iterating a file object holds each whole line: one 50 MB line is 50 MB (and more once decoded) before anyone can
refuse it. ``bounded_lines`` keeps at most ``max_bytes + 2`` bytes of a line; the rest of a longer one is read in
chunks, only counted, and skipped.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

SKIP_CHUNK = 64 * 1024  # bytes read at a time past a line's limit


class NotARegularFile(OSError):
    """The path names a FIFO, a device, a socket or a directory: reading it may never end (``/dev/zero``, a FIFO
    nobody writes to) or is not a file's lines."""


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for reading in binary, or OSError (NotARegularFile when it is not a regular file). Decided
    on the opened descriptor (fstat), so the path cannot be swapped between the check and the read; opened
    non-blocking, so a FIFO without a writer is refused at once instead of blocking the open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"not a regular file ({_kind(mode)}): give a file, not a pipe or a device")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def bounded_lines(fh: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes, int]]:
    """``(number, content, size)`` for every line of ``fh``, numbered from 1: ``content`` without its line end
    (``\\n`` or ``\\r\\n``), ``size`` its length in bytes. A line longer than ``max_bytes`` has ``size > max_bytes``
    and ``content`` cut to ``max_bytes + 1`` bytes (enough for any size check to refuse it)."""
    number = 0
    while raw := fh.readline(max_bytes + 2):  # room for the content and "\r\n"
        number += 1
        if raw.endswith(b"\n"):
            content = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            yield number, content[:max_bytes + 1], len(content)
            continue
        size, last = len(raw), raw[-1:]
        if size > max_bytes + 1:  # the line goes on: count and skip its rest, never holding it
            while chunk := fh.readline(SKIP_CHUNK):
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    size -= 2 if (chunk[-2:-1] or last) == b"\r" else 1
                    break
                last = chunk[-1:]
        yield number, raw[:max_bytes + 1], size


def count_lines(fh: BinaryIO, chunk: int = 1024 * 1024) -> int:
    """The number of lines ``bounded_lines`` yields for ``fh``, read in chunks of ``chunk`` bytes."""
    count, last = 0, b"\n"
    while data := fh.read(chunk):
        count += data.count(b"\n")
        last = data[-1:]
    return count + (last != b"\n")
