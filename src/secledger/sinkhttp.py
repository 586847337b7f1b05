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
from collections.abc import Iterable, Mapping
from typing import Any

import httpcore
import httpx
import structlog

log = structlog.get_logger("secledger.sink")


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
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, self._deadline.left(timeout))
        return _Stream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
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
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(
            host, port, self._deadline.left(timeout), local_address, socket_options
        )
        return _Stream(stream, self._deadline)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class Poster:
    """POSTs to one URL over httpx's kept-alive connections (with what httpx reads from
    the environment and the URL: proxies, credentials); no redirect is followed (a 3xx is
    not an acknowledgement, and a POST must not turn into a GET)."""

    def __init__(self, timeout: float) -> None:
        self.deadline = Deadline()
        self.timed_out = False  # whether the last POST ran past its deadline
        self._step = timeout
        self._within = 0.0
        self._client = httpx.Client(timeout=timeout, follow_redirects=False)
        self.bounded = _bound(self._client, _Backend(self.deadline))

    def post(self, url: str, body: bytes, headers: Mapping[str, str], within: float) -> int:
        """The answer's status (its body is not read), within ``within`` seconds."""
        self.deadline.at = time.monotonic() + within
        self._within = within
        self.timed_out = False
        try:
            with self._client.stream("POST", url, content=body, headers=headers) as response:
                return response.status_code
        finally:
            self.timed_out = self.deadline.passed()
            self.deadline.at = None

    def failure(self, exc: Exception) -> str:
        """What made the last POST fail, for the outbox's failures and the log.

        A silent receiver meets one step's timeout, one trickling its head the whole
        POST's deadline: each is named with the time it was given. Anything else is
        named by its class only: messages may repeat the URL, which may hold credentials.
        """
        if self.timed_out:
            return f"no answer within {self._within:g} s"
        if isinstance(exc, httpx.ConnectTimeout):
            return f"no connection within {self._step:g} s"
        if isinstance(exc, httpx.WriteTimeout):
            return f"not sent within {self._step:g} s"
        if isinstance(exc, httpx.ReadTimeout):
            return f"no answer within {self._step:g} s"
        return type(exc).__name__

    def close(self) -> None:
        """Close the connections."""
        self._client.close()


def _bound(client: httpx.Client, backend: httpcore.NetworkBackend) -> bool:
    """Give every connection pool of ``client`` (direct and through each proxy) the
    deadline's network backend; whether it could. httpx offers no way to pass one: its
    pools' attribute is set, and a later httpx without it leaves each step its timeout
    alone (``sink_deadline_unavailable`` is logged)."""
    transports = [getattr(client, "_transport", None)]
    transports.extend(getattr(client, "_mounts", {}).values())
    pools: list[Any] = [getattr(transport, "_pool", None) for transport in transports if transport]
    if not pools or not all(hasattr(pool, "_network_backend") for pool in pools):
        log.warning("sink_deadline_unavailable", httpx=httpx.__version__)
        return False
    for pool in pools:
        pool._network_backend = backend
    return True
