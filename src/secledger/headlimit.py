"""uvicorn's httptools protocol with bounds on a request's head: its size, and its time.

httptools has no size bound: a stranger could stream a request line or one header for
ever, and the parser, gathering it by concatenation, spent time growing with the square
of its size before any token was looked at. One such connection held every delivery past
GitLab's 10 s timeout (300 MB: answers 7 to 26 s late). GitLab's own heads are a few
kilobytes; nginx's default limit is 32 KiB.

uvicorn has no time bound either: it arms its keep-alive timer only after a response, so
a connection that never sends a request, or never finishes its head, stayed open for
ever. And its ``limit_concurrency`` counts open connections as well as requests: about
500 silent connections made it answer every delivery 503, and GitLab disables a hook
after four failures. Here a head must arrive within a time limit, and the backstop
counts requests in progress only.
"""

from __future__ import annotations

import asyncio
import weakref
from asyncio import Transport
from asyncio.events import TimerHandle

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# The most bytes of one request's head (request line and headers) before a 431.
MAX_HEAD_BYTES = 64 * 1024
_REFUSAL = "Request head too large."
# "POST " + " HTTP/1.1\r\n" + the blank line's "\r\n": as good as exact for a webhook.
_LINE_BYTES = 18


class HeadTooLarge(Exception):
    """Raised in the parser's callback: httptools stops, and uvicorn answers through
    ``send_400_response``, which sends the 431 instead."""


class BoundedHeadProtocol(HttpToolsProtocol):
    """Answers 431 and closes once a request's head passes ``MAX_HEAD_BYTES``; closes a
    connection whose next request has not begun, or whose head has not ended,
    ``head_timeout`` seconds after it opened or the head began (408 for a begun head).

    Two size checks: while the head streams in, whole reads are counted (leaving out the
    read the request began in, which may hold the end of the one before), so a head
    that never ends is cut off after at most one read more than the bound; and once a
    head is complete, its own size is measured, so one that came in a few large reads
    is refused too. The time is counted from the connection's opening, from each
    answer (blank lines between requests cancel uvicorn's keep-alive timer) and from
    the first byte of each head; one sweep a second closes what is overdue.
    """

    # Set on the class: the protocol's __init__ is uvicorn's, and these are read first.
    _head_bytes = 0
    _in_head = True
    _began = False
    _oversized = False
    # loop.time() since when a head is awaited: the connection's opening, its last
    # answer or the head's first byte; None while a request is being handled.
    _head_since: float | None = None
    _head_begun = False
    # Set by protocol_class(); these defaults are for a protocol used as it is.
    head_timeout = 10.0
    task_limit: int | None = None

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_since = self.loop.time()
        _watch(self)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._began, self._head_bytes = True, True, 0
        # Two attribute writes per request, where a timer armed and cancelled for each
        # cost every delivery, ignored ones included (one sweep a second does the rest).
        self._head_since, self._head_begun = self.loop.time(), True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_since, self._head_begun = None, False
        # uvicorn answers 503 at once when its limit is reached by open connections or
        # by requests in progress; only the latter is a load to shed.
        limit = self.task_limit
        self.limit_concurrency = limit if limit is not None and len(self.tasks) >= limit else None
        # ": " and CRLF of each header line, and the request line's method, version and
        # CRLF and the blank line, are not in the parsed URL, names and values.
        size = len(self.url) + _LINE_BYTES + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > MAX_HEAD_BYTES:
            self._oversized = True
            raise HeadTooLarge
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        idle = not self.pipeline
        super().on_response_complete()
        # Bytes that begin no request (blank lines between requests) cancel uvicorn's
        # keep-alive timer: sent every few seconds, they held a connection for ever.
        if idle and self._head_since is None:
            self._head_since, self._head_begun = self.loop.time(), False

    def data_received(self, data: bytes) -> None:
        self._began = False
        super().data_received(data)
        if not self._in_head or self._began or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse()

    def check_head(self, now: float) -> None:
        """Close the connection when its head is overdue (the sweep asks every second)."""
        since = self._head_since
        if since is None or now - since < self.head_timeout or self.transport.is_closing():
            return
        self._head_since = None
        if self._head_begun:
            self._answer_and_close(b"408 Request Timeout", b"Request head not received in time.")
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        if self._oversized:
            self._refuse()
        else:
            super().send_400_response(msg)

    def _refuse(self) -> None:
        self.logger.warning(_REFUSAL)  # kept to 20 a minute with the library's lines
        self._answer_and_close(b"431 Request Header Fields Too Large", _REFUSAL.encode("ascii"))

    def _answer_and_close(self, status: bytes, body: bytes) -> None:
        """Answer with plain text ``body``, the head unread, and close the connection."""
        self._in_head = False
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()


# How often open connections are looked at for an overdue head.
SWEEP_SECONDS = 1.0
# One sweep per server (its connections set), running while it has connections.
_SWEEPS: weakref.WeakKeyDictionary[object, TimerHandle] = weakref.WeakKeyDictionary()


def _watch(protocol: BoundedHeadProtocol) -> None:
    state = protocol.server_state
    if state not in _SWEEPS:
        _SWEEPS[state] = protocol.loop.call_later(SWEEP_SECONDS, _sweep, protocol.loop, state)


def _sweep(loop: asyncio.AbstractEventLoop, state: object) -> None:
    connections = getattr(state, "connections", ())
    now = loop.time()
    for connection in list(connections):
        if isinstance(connection, BoundedHeadProtocol):
            connection.check_head(now)
    if connections:
        _SWEEPS[state] = loop.call_later(SWEEP_SECONDS, _sweep, loop, state)
    else:
        _SWEEPS.pop(state, None)


def protocol_class(*, head_timeout: float, task_limit: int) -> type[BoundedHeadProtocol]:
    """The protocol ``serve`` gives uvicorn: a head must arrive within ``head_timeout``
    seconds, and past ``task_limit`` requests in progress a new one is answered 503."""
    return type(
        "BoundedHeadProtocol",
        (BoundedHeadProtocol,),
        {"head_timeout": head_timeout, "task_limit": task_limit},
    )
