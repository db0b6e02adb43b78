"""A RabbitMQ management API stand-in for tests: stdlib HTTP in a thread, answering what the test tells it.

``replies`` maps a path prefix (``/api/nodes``, ``/api/queues/%2F/q``; the longest matching prefix wins, the query
string ignored) to a reply: ``(status, body)`` with a body of bytes (sent as is) or anything else (sent as JSON), or
``("redirect", url)`` for a 302 to ``url``. Unmatched paths answer ``default``. Every request is recorded with its
path and Authorization header (``requests``), so a test can tell which host saw the credentials.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NOT_FOUND = (404, {"error": "Object Not Found", "reason": "Not Found"})


class FakeManagement:
    def __init__(self, host: str = "127.0.0.1", default: tuple = NOT_FOUND):
        self.replies: dict[str, tuple] = {}
        self.default = default
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                path = self.path.split("?")[0]
                fake.requests.append({"method": self.command, "path": path,
                                      "authorization": self.headers.get("Authorization")})
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, body = fake.reply_for(path)
                if status == "redirect":
                    self.send_response(302)
                    self.send_header("Location", body)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_DELETE = _answer

            def log_message(self, *args) -> None:  # quiet
                pass

        server_class = ThreadingHTTPServer
        if ":" in host:
            import socket

            server_class = type("IPv6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self.server = server_class((host, 0), Handler)
        self.server.daemon_threads = True
        self.host = host
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def reply_for(self, path: str) -> tuple:
        matches = [p for p in self.replies if path.startswith(p)]
        return self.replies[max(matches, key=len)] if matches else self.default

    def answer_as(self, cluster_name: str, vhost: str = "%2F", *, sees_probe: bool = True) -> FakeManagement:
        """Answer what ``management.for_connection`` asks as the API of cluster ``cluster_name`` would: its
        overview, the vhost, and (``sees_probe``: as the same broker) any server-named queue, the probe declared on
        the AMQP connection."""
        self.replies["/api/overview"] = (200, {"cluster_name": cluster_name, "node": "rabbit@fake"})
        self.replies[f"/api/vhosts/{vhost}"] = (200, {"name": "/"})
        if sees_probe:
            self.replies[f"/api/queues/{vhost}/amq.gen-"] = (200, {"name": "amq.gen-probe", "node": "rabbit@fake"})
        return self

    def url(self, user: str = "guest", password: str = "guest") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{user}:{password}@{host}:{self.port}"

    def start(self) -> FakeManagement:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeManagement:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
