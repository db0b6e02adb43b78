"""Lines of a file handed to an operator (a catalog, an events file), read in bounded memory.

Iterating a file object holds each whole line: one 50 MB line is 50 MB (and more once decoded) before anyone can
refuse it. ``bounded_lines`` keeps at most ``max_bytes + 2`` bytes of a line; the rest of a longer one is read in
chunks, only counted, and skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

SKIP_CHUNK = 64 * 1024  # bytes read at a time past a line's limit


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
