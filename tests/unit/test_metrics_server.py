"""The metrics/health server under slow and oversized clients: real sockets against the real server. Slow clients
cannot hold a connection past the whole-request deadline, cannot starve a prompt client of a slot, and cannot send
an unbounded request."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from contextlib import contextmanager, suppress

import pytest

from myshop_ops.adapters import metrics
from myshop_ops.adapters.metrics import Metrics, serve
from tests.support.services import wait_for

pytestmark = pytest.mark.timeout(60)


@contextmanager
def server_of(metrics_target=None):
    server = serve(metrics_target or Metrics(), 0)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def tricklers(address: tuple[str, int], count: int, every: float):
    """``count`` clients, each sending one byte of a never-ending request every ``every`` seconds and connecting
    again whenever the server drops it (a slowloris that does not give up)."""
    stop = threading.Event()
    socks: list[socket.socket | None] = [None] * count

    def run() -> None:
        while not stop.is_set():
            for i in range(count):
                try:
                    if socks[i] is None:
                        socks[i] = socket.create_connection(address, timeout=1)
                    socks[i].send(b"G")
                except OSError:
                    with suppress(OSError):
                        socks[i].close()
                    socks[i] = None
            stop.wait(every)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        for sock in socks:
            if sock is not None:
                sock.close()


def get(address: tuple[str, int], path: str) -> tuple[int, float]:
    start = time.monotonic()
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}{path}", timeout=10) as reply:
        return reply.status, time.monotonic() - start


def test_trickling_clients_do_not_keep_healthz_from_answering():
    """24 clients each trickle one byte at a time (the attack: 16 clients, one byte every 3 s, kept /healthz from
    answering anyone) and reconnect when dropped: every slot stays taken, yet each /healthz answers at once."""
    with server_of() as server, tricklers(server.server_address, 24, every=0.2):
        wait_for(lambda: server.connections() >= metrics.MAX_CONNECTIONS, timeout=10, what="every slot taken")
        for _ in range(10):
            status, seconds = get(server.server_address, "/healthz")
            assert status == 200
            assert seconds < 2.0  # a few ms normally; the bound is generous for a loaded machine
        assert server.connections() <= metrics.MAX_CONNECTIONS


def test_a_request_must_arrive_whole_within_the_deadline(monkeypatch):
    """A client sending a byte every 0.1 s is dropped once the whole-request deadline has passed (each byte reset
    the old per-read timeout, so it was held forever)."""
    monkeypatch.setattr(metrics, "REQUEST_DEADLINE_S", 1.0)
    with server_of() as server:
        sock = socket.create_connection(server.server_address, timeout=5)
        start = time.monotonic()

        def dropped() -> bool:
            try:
                sock.send(b"X")
            except OSError:
                return True
            return server.connections() == 0

        try:
            wait_for(dropped, timeout=8, interval=0.1, what="the trickling client dropped")
            assert time.monotonic() - start < 6.0  # deadline 1 s; generous margin
        finally:
            sock.close()


def test_an_oversized_request_is_refused_with_431():
    with server_of() as server, socket.create_connection(server.server_address, timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n" + b"X-Pad: " + b"a" * (metrics.MAX_REQUEST_BYTES + 100))
        reply = sock.recv(1024)
        assert reply.startswith(b"HTTP/1.0 431")


def test_a_prompt_request_is_answered_and_the_others_still_work():
    with server_of() as server:
        for path, expected in (("/healthz", 200), ("/metrics", 200)):
            assert get(server.server_address, path)[0] == expected
        wait_for(lambda: server.connections() == 0, timeout=5, what="slots released")
