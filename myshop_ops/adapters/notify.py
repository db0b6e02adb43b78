"""sd_notify for systemd Type=notify units: READY, STATUS, WATCHDOG, STOPPING. A no-op without NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        pid = os.environ.get("WATCHDOG_PID")
        enabled = usec > 0 and (pid is None or pid == str(os.getpid()))
        self.watchdog_interval = usec / 2e6 if enabled else None
        self._last_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):  # systemd gone or socket full: never break the worker for it
            self._sock.sendto("\n".join(lines).encode(), self._address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        """Ping the watchdog (throttled to half of WATCHDOG_USEC); call only while the loop is healthy."""
        now = time.monotonic()
        if self._sock is not None and now - self._last_watchdog >= (self.watchdog_interval or 1.0):
            self._last_watchdog = now
            self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")
