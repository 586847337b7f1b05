"""The HTTP sink's connections, every step of a POST under one deadline.

A timeout per step (connect, each write, each read) does not bound a POST: a receiver
that sends its answer's head a line at a time meets every read's timeout and holds the
sender, its transaction and the sink lock for as long as it likes. Closing the
connection from another thread is no answer either: a read under way is not woken, and
with TLS it may go on reading a socket that has since taken the closed one's number.
Here each step gets what is left of the POST's deadline, in the sender's own thread.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Iterable, Mapping

import httpcore
import httpx


class Deadline:
    """When the POST under way must be over (``time.monotonic()``), or None between."""

    def __init__(self) -> None:
        self.at: float | None = None

    def left(self, timeout: float | None) -> float | None:
        """``timeout`` cut to what is left; a ReadTimeout once nothing is."""
        if self.at is None:
            return timeout
        left = self.at - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the POST's deadline passed")
        return left if timeout is None else min(timeout, left)

    def passed(self) -> bool:
        """Whether the POST under way is past its deadline."""
        return self.at is not None and time.monotonic() >= self.at


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadline: Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.left(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: typing.Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, self._deadline.left(timeout))
        return _Stream(tls, self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, deadline: Deadline) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(
            host, port, self._deadline.left(timeout), local_address, socket_options
        )
        return _Stream(stream, self._deadline)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class Poster:
    """POSTs to one URL over kept-alive connections; no redirect is followed (a 3xx is
    not an acknowledgement, and a POST must not turn into a GET)."""

    def __init__(self, timeout: float) -> None:
        self.deadline = Deadline()
        self.timed_out = False  # whether the last POST ran past its deadline
        self._timeouts = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), network_backend=_Backend(self.deadline)
        )

    def post(self, url: str, body: bytes, headers: Mapping[str, str], within: float) -> int:
        """The answer's status (its body is not read), within ``within`` seconds."""
        self.deadline.at = time.monotonic() + within
        self.timed_out = False
        try:
            sent = [
                (name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
            ]
            with self._pool.stream(
                "POST", url, headers=sent, content=body, extensions={"timeout": self._timeouts}
            ) as response:
                return response.status
        finally:
            self.timed_out = self.deadline.passed()
            self.deadline.at = None

    def close(self) -> None:
        """Close the connections."""
        self._pool.close()
