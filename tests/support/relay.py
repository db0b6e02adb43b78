"""A TCP relay in front of the real RabbitMQ that plays a node dying at a chosen moment.

The client connects to ``relay.url``; every byte goes on to the broker and back. ``hold_after`` publishes: once the
client has sent that many Basic.Publish frames (the relay reads the AMQP frames it forwards), nothing more comes
back from the broker (confirms and replies are kept back, ``held`` is set) while the client's frames still go through:
the broker has the messages, the client has no confirm. ``kill()`` then drops the listener and every connection at
once, both sides, as a dead node would: the client sees its connection lost, the broker requeues what the
connection had not acked."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

PROTOCOL_HEADER = 8  # b"AMQP\x00\x00\x09\x01"
BASIC_PUBLISH = (60, 40)


class Relay:
    def __init__(self, target_port: int, *, hold_after: int | None = None, host: str = "127.0.0.1"):
        self.target = (host, target_port)
        self.hold_after = hold_after
        self.publishes = 0  # Basic.Publish frames seen from clients
        self.held = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._dead = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"amqp://guest:guest@{host}:{self.port}/%2f"
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._dead.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for s in (client, upstream):  # no Nagle delay: a frame each way at once, as without the relay
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        frames = _FrameReader() if from_client else None
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if frames is not None:
                    self._count(frames.publishes(data))
                else:
                    self._flowing.wait()
                if self._dead.is_set():
                    return
                dst.sendall(data)
        self._close(src, dst)

    def _count(self, publishes: int) -> None:
        with self._lock:
            self.publishes += publishes
            if self.hold_after is not None and self.publishes >= self.hold_after and not self.held.is_set():
                self._flowing.clear()
                self.held.set()

    def kill(self) -> None:
        """The node dies: no new connection, every open one cut on both sides."""
        self._dead.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        self._close(*sockets)
        self._flowing.set()  # the held pipes wake up and end

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, as a crash
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


class _FrameReader:
    """Counts the Basic.Publish method frames of a client's AMQP 0-9-1 byte stream, fed in arbitrary pieces."""

    def __init__(self):
        self._buf = b""
        self._header = False

    def publishes(self, data: bytes) -> int:
        self._buf += data
        if not self._header:
            if len(self._buf) < PROTOCOL_HEADER:
                return 0
            self._buf, self._header = self._buf[PROTOCOL_HEADER:], True
        n = 0
        while len(self._buf) >= 7:
            kind, _channel, size = struct.unpack(">BHI", self._buf[:7])
            if len(self._buf) < 7 + size + 1:
                break
            if kind == 1 and size >= 4 and struct.unpack(">HH", self._buf[7:11]) == BASIC_PUBLISH:
                n += 1
            self._buf = self._buf[8 + size:]
        return n
