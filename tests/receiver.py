"""A tiny real HTTP sink on 127.0.0.1, in a thread, that records what it is sent."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    """One request as the receiver saw it, and what it answered."""

    headers: dict[str, str]
    body: dict[str, Any]
    status: int

    @property
    def seq(self) -> int:
        return int(self.body["seq"])


@dataclass
class Receiver:
    """Answers 500 to the next ``failures`` requests, then 200; keeps every request."""

    port: int = 0
    failures: int = 0
    flaky: bool = False  # answer 500 to the first request of each seq, then 200
    delay: float = 0.0  # seconds to wait before answering each request
    requests: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                time.sleep(receiver.delay)
                status = receiver._answer(dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _answer(self, headers: dict[str, str], body: dict[str, Any]) -> int:
        with self._changed:
            status = 500 if self.failures > 0 else 200
            self.failures = max(0, self.failures - 1)
            if self.flaky and all(int(r.body["seq"]) != int(body["seq"]) for r in self.requests):
                status = 500
            self.requests.append(Received(headers, body, status))
            self._changed.notify_all()
            return status

    def accepted(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.status == 200]

    def wait_accepted(self, count: int, timeout: float = 30.0) -> list[Received]:
        """Block until ``count`` requests were answered 200 (bounded), then return them."""
        with self._changed:
            self._changed.wait_for(
                lambda: sum(r.status == 200 for r in self.requests) >= count, timeout
            )
        return self.accepted()


def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
