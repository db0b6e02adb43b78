"""When a worker should stop: message/time/memory/failure limits and signals; the worker adds its own reasons (the
stop-workers flag, a configuration error) through ``Limits.stop``."""

from __future__ import annotations

import os
import re
import resource
import signal
import time
from dataclasses import dataclass, field

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of a size like ``512M``, ``1.5G``, ``800000K`` or a plain byte count."""
    m = _SIZE.match(text or "")
    if not m:
        raise ValueError(f"'{text}' is not a size like 512M or 1G")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()])


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Limits:
    """Stop conditions; ``None`` means no limit."""

    messages: int | None = None
    seconds: float | None = None
    memory_bytes: int | None = None
    failures: int | None = None
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    processed: int = 0
    failed: int = 0
    signalled: int = 0
    reason: str | None = None

    def remaining_messages(self) -> int | None:
        return None if self.messages is None else max(self.messages - self.processed, 0)

    def count(self, processed: int, failed: int) -> None:
        self.processed += processed
        self.failed += failed

    def check(self) -> str | None:
        """The reason to stop now, if any (kept in ``reason``)."""
        if self.reason:
            return self.reason
        if self.signalled:
            self.reason = "signal"
        elif self.messages is not None and self.processed >= self.messages:
            self.reason = f"message limit {self.messages} reached"
        elif self.seconds is not None and time.monotonic() - self.started >= self.seconds:
            self.reason = f"time limit {self.seconds:g}s reached"
        elif self.memory_bytes is not None and rss_bytes() >= self.memory_bytes:
            self.reason = f"memory limit {self.memory_bytes // 2**20}M reached (RSS {rss_bytes() // 2**20}M)"
        elif self.failures is not None and self.failed >= self.failures:
            self.reason = f"failure limit {self.failures} reached"
        return self.reason

    def stop(self, reason: str) -> None:
        self.reason = self.reason or reason

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the batch and exit 0; a second signal exits at once."""

        def handler(signum, _frame):
            self.signalled += 1
            if self.signalled > 1:
                os._exit(128 + signum)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
