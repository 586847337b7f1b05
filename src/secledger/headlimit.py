"""uvicorn's httptools protocol with a bound on the size of a request's head.

httptools has none: a stranger could stream a request line or one header for ever, and
the parser, gathering it by concatenation, spent time growing with the square of its
size before any token was looked at. One such connection held every delivery past
GitLab's 10 s timeout (300 MB: answers 7 to 26 s late). GitLab's own heads are a few
kilobytes; nginx's default limit is 32 KiB.
"""

from __future__ import annotations

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
    """Answers 431 and closes once a request's head passes ``MAX_HEAD_BYTES``.

    Two checks: while the head streams in, whole reads are counted (leaving out the
    read the request began in, which may hold the end of the one before), so a head
    that never ends is cut off after at most one read more than the bound; and once a
    head is complete, its own size is measured, so one that came in a few large reads
    is refused too.
    """

    # Set on the class: the protocol's __init__ is uvicorn's, and these are read first.
    _head_bytes = 0
    _in_head = True
    _began = False
    _oversized = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._began, self._head_bytes = True, True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        # ": " and CRLF of each header line, and the request line's method, version and
        # CRLF and the blank line, are not in the parsed URL, names and values.
        size = len(self.url) + _LINE_BYTES + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > MAX_HEAD_BYTES:
            self._oversized = True
            raise HeadTooLarge
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        self._began = False
        super().data_received(data)
        if not self._in_head or self._began or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse()

    def send_400_response(self, msg: str) -> None:
        if self._oversized:
            self._refuse()
        else:
            super().send_400_response(msg)

    def _refuse(self) -> None:
        self._in_head = False
        self.logger.warning(_REFUSAL)  # kept to 20 a minute with the library's lines
        body = _REFUSAL.encode("ascii")
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()
