"""The GitLab client's HTTP edge: the session it talks through, and its failures in words.

The session keeps the token on the configured origin and does not retry a TLS failure;
python-gitlab (``gitlab_api``) owns everything else.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

from secledger.times import parse_http_date, utcnow

if TYPE_CHECKING:
    from requests import PreparedRequest, Response


def retry_after_in_seconds(response: Response, *_args: Any, **_kwargs: Any) -> Response:
    """Rewrite a ``Retry-After`` HTTP-date as the seconds it names; drop any other value
    that is not whole seconds.

    python-gitlab (8.6) reads the header with ``int()``: the date form RFC 9110 allows,
    which a proxy in front of GitLab may send, raised ValueError out of the client.
    Without the header python-gitlab waits for ``RateLimit-Reset`` or backs off.
    """
    value = response.headers.get("Retry-After")
    if value is None or value.strip().isdigit():
        return response
    until = parse_http_date(value)
    if until is None:
        del response.headers["Retry-After"]
    else:
        wait = max(0, math.ceil((until - utcnow()).total_seconds()))
        response.headers["Retry-After"] = str(wait)
    return response


class TLSFailed(OSError):
    """A certificate that failed verification, raised as a type python-gitlab does not
    retry: no retry mends it, and ten of them took 105 s before the error was shown."""


class RedirectedAway(OSError):
    """GitLab answered with a redirect to another origin, which is not followed."""


class OriginBoundSession(requests.Session):
    """A session that sends the token to the configured GitLab origin only.

    requests strips ``Authorization`` from a redirect to another host, but not
    ``PRIVATE-TOKEN``: a GitLab (or a proxy in front of it) answering 302 to another
    host, or from https to http, would have been handed the token. Such a redirect is
    not followed at all: without the token, a private project answered 404 there, and
    every MR of a GitLab that had moved read as deleted.
    """

    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance

    def request(self, *args: Any, **kwargs: Any) -> Response:
        try:
            return super().request(*args, **kwargs)
        except requests.exceptions.SSLError as exc:
            # A certificate no retry mends; a TLS connection a balancer dropped (an
            # unexpected EOF) is left to python-gitlab's retries.
            if "certificate verify failed" not in str(exc).lower():
                raise
            raise TLSFailed(str(exc)) from None

    def rebuild_auth(self, prepared_request: PreparedRequest, response: Response) -> None:
        super().rebuild_auth(prepared_request, response)
        # requests' own rule (another host, port or scheme, but http to https on one
        # host is fine), applied against the configured origin rather than the last hop.
        target = prepared_request.url or ""
        if self.should_strip_auth(self.instance + "/", target):
            raise RedirectedAway(
                f"it redirects to {_origin(target)}: if GitLab moved there, set"
                " SECLEDGER_GITLAB_URL to it (no request is sent elsewhere with or"
                " without the token)"
            )


def _origin(url: str) -> str:
    """Scheme, host and port of ``url``, without a user part (which may be a password)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}" + (f":{parts.port}" if parts.port else "")


# Longest error text of GitLab's kept in a message: a proxy's HTML page is kilobytes.
MAX_ERROR_CHARS = 200
_TAG = re.compile(r"<[^>]*>")


def brief(message: object) -> str:
    """GitLab's error text, or the words of an HTML error page, on one short line."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    text = str(message)
    if text.lstrip().startswith("<"):
        text = _TAG.sub(" ", text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


# What requests' nested exception texts say, in words people act on.
_CAUSES = (
    ("certificate verify failed", "its TLS certificate is not trusted (see REQUESTS_CA_BUNDLE)"),
    ("CERTIFICATE_VERIFY_FAILED", "its TLS certificate is not trusted (see REQUESTS_CA_BUNDLE)"),
    ("Connection refused", "the connection was refused"),
    ("Name or service not known", "the host name is not known"),
    ("Temporary failure in name resolution", "the host name could not be resolved"),
    ("No route to host", "there is no route to the host"),
)


def unreachable(exc: OSError) -> str:
    """Why the API could not be reached, in words (the exception's class otherwise)."""
    if isinstance(exc, requests.exceptions.Timeout):
        return "it did not answer in time (SECLEDGER_GITLAB_TIMEOUT_SECONDS)"
    if isinstance(exc, RedirectedAway):
        return str(exc)
    text = str(exc)
    for marker, cause in _CAUSES:
        if marker in text:
            return cause
    if isinstance(exc, requests.exceptions.SSLError | TLSFailed):
        return "the TLS handshake failed"
    return type(exc).__name__
