"""The HTTP sink's connections, every step of a POST under one deadline.

A timeout per step (connect, each write, each read) does not bound a POST: a receiver
that sends its answer's head a line at a time meets every read's timeout and holds the
sender, its transaction and the sink lock for as long as it likes. Closing the
connection from another thread is no answer either: a read under way is not woken, and
with TLS it may go on reading a socket that has since taken the closed one's number.
Here each step gets what is left of the POST's deadline, in the sender's own thread.
The name lookup too: the resolver's own timeouts and retries (``resolv.conf``) may add
up to half a minute, which a socket timeout does not cover, so it runs on a thread of
its own that the sender waits for only until the deadline.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
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


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host``, in the order the system's resolver gives them."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(_spelled(family, address) for family, *_, address in found))


def _spelled(family: int, address: tuple[Any, ...]) -> str:
    """An address as text, with an IPv6 address's scope (a link-local one needs it)."""
    if family == socket.AF_INET6 and address[3]:
        return f"{address[0]}%{address[3]}"
    return str(address[0])


class LookupTimeout(httpcore.ConnectTimeout):
    """The name lookup did not end within the POST's deadline."""


_Job = tuple[str, int, "Future[list[str]]"]


class _Lookups:
    """Name lookups on one daemon thread, started at the first.

    One thread: a lookup that hangs past its deadline makes the next ones wait behind it
    (and time out in turn), rather than adding a thread per POST. A daemon: a lookup
    still hanging when the process stops must not hold up its exit.
    """

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, host: str, port: int) -> Future[list[str]]:
        """Look ``host`` up; cancel the future to drop a lookup not yet started."""
        future: Future[list[str]] = Future()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="secledger-sink-lookup", daemon=True
            )
            self._thread.start()
        self._jobs.put((host, port, future))
        return future

    def close(self) -> None:
        """Let the thread end once the lookup under way, if any, is over."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            host, port, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._resolver(host, port))
            except Exception as exc:  # noqa: BLE001 - handed to the waiting sender
                future.set_exception(exc)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, deadline: Deadline, resolver: Resolver) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline
        self._lookups = _Lookups(resolver)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        failure: Exception | None = None
        for address in self._addresses(host, port):
            try:
                stream = self._inner.connect_tcp(
                    address, port, self._deadline.left(timeout), local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc  # the next address, as socket.create_connection would
                continue
            return _Stream(stream, self._deadline)
        assert failure is not None  # noqa: S101 - _addresses gives at least one
        raise failure

    def _addresses(self, host: str, port: int) -> list[str]:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [host]
        lookup = self._lookups.submit(host, port)
        try:
            found = lookup.result(self._deadline.left(None))
        except FutureTimeout:
            lookup.cancel()
            raise LookupTimeout("the name lookup did not end in time") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"name lookup failed: {type(exc).__name__}") from None
        if not found:
            raise httpcore.ConnectError("name lookup found no address")
        return found

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)

    def close(self) -> None:
        """Stop the lookup thread (a lookup under way is left to end on its own)."""
        self._lookups.close()


class Poster:
    """POSTs to one URL over httpx's kept-alive connections (with what httpx reads from
    the environment and the URL: proxies, credentials); no redirect is followed (a 3xx is
    not an acknowledgement, and a POST must not turn into a GET)."""

    def __init__(self, timeout: float, resolver: Resolver = resolve) -> None:
        self.deadline = Deadline()
        self.timed_out = False  # whether the last POST ran past its deadline
        self._step = timeout
        self._within = 0.0
        self._client = httpx.Client(timeout=timeout, follow_redirects=False)
        self._backend = _Backend(self.deadline, resolver)
        self.bounded = _bound(self._client, self._backend)

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
        if _caused_by(exc, LookupTimeout):
            return f"no name lookup within {self._within:g} s"
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
        self._backend.close()


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` or one it was raised from is a ``kind`` (httpx wraps httpcore's)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
