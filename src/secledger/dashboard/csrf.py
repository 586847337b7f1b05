"""CSRF tokens for the dashboard's forms: a signed double-submit cookie, bound to the session.

The browser holds a random nonce in an HttpOnly cookie; every form carries the same
nonce, and a digest of the session cookie it was rendered for, signed with the session
key. A POST is accepted only when the signature is valid and not older than a session,
its nonce equals the cookie's, and it was issued for the session the request carries.
Another site can make the browser send the cookies but can read neither them nor the
page, so it cannot supply the field. The login form needs this too (no session exists
yet): without it a hostile page could log a visitor in as the attacker.

A nonce cookie alone can be planted by whoever may set cookies for the host (a sibling
subdomain, or a plain-HTTP answer on the way): with a token the attacker fetched for
that nonce, a form would pass. Over HTTPS the cookie is therefore named
``__Host-secledger_csrf``, which browsers accept only from that very host, over HTTPS,
for path ``/``; and a logged-in form also needs the session's own digest, which the
attacker cannot know. Stateless, so it works on every replica that shares
SECLEDGER_SESSION_SECRET.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from itsdangerous import BadData, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

COOKIE = "secledger_csrf"
# Over HTTPS: a cookie only this host can set (Secure, Path=/, no Domain).
SECURE_COOKIE = "__Host-secledger_csrf"
FIELD = "csrf_token"
_SALT = "secledger.csrf.v2"  # v2: the token names the session too
_NONCE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
REFUSED = (
    "This form has expired or did not come from secledger's own page. "
    "Reload the page and try again."
)


def cookie_name(*, secure: bool) -> str:
    """The nonce cookie's name: with the ``__Host-`` prefix whenever it is sent Secure."""
    return SECURE_COOKIE if secure else COOKIE


def session_digest(session: str | None) -> str:
    """What a token records of the session cookie it was issued for ("" without one)."""
    if not session:
        return ""
    return hashlib.sha256(session.encode("utf-8", "surrogateescape")).hexdigest()[:32]


class CsrfTokens:
    """Issues and checks the nonce cookie and the signed form field."""

    def __init__(self, secret: bytes, max_age: int) -> None:
        self._signer = URLSafeTimedSerializer(secret, salt=_SALT)
        self.max_age = max_age

    def nonce(self, request: Request, *, secure: bool) -> tuple[str, bool]:
        """The request's nonce, and whether it is new (then the cookie must be set)."""
        current = request.cookies.get(cookie_name(secure=secure), "")
        if _NONCE.fullmatch(current):
            return current, False
        return self.new_nonce(), True

    @staticmethod
    def new_nonce() -> str:
        """A fresh random nonce."""
        return secrets.token_urlsafe(32)

    def token(self, nonce: str, session: str | None) -> str:
        """The form field value for ``nonce``, on a page rendered for cookie ``session``."""
        return self._signer.dumps([nonce, session_digest(session)])

    def valid(
        self, request: Request, submitted: str | None, *, secure: bool, session: str | None
    ) -> bool:
        """True when ``submitted`` is a current token for the request's nonce cookie and
        for the session cookie it carries (``session``)."""
        cookie = request.cookies.get(cookie_name(secure=secure))
        if not submitted or not cookie:
            return False
        try:
            signed = self._signer.loads(submitted, max_age=self.max_age)
        except BadData:
            return False
        if not (isinstance(signed, list) and len(signed) == 2):
            return False
        nonce, digest = signed
        if not (isinstance(nonce, str) and isinstance(digest, str)):
            return False
        same_nonce = hmac.compare_digest(nonce.encode(), cookie.encode())
        same_session = hmac.compare_digest(digest.encode(), session_digest(session).encode())
        return same_nonce and same_session

    def set_cookie(self, response: Response, nonce: str, *, secure: bool) -> None:
        """Give the browser ``nonce`` (for the rest of its session)."""
        response.set_cookie(
            cookie_name(secure=secure),
            nonce,
            path="/",
            httponly=True,
            samesite="lax",
            secure=secure,
        )

    def delete_cookie(self, response: Response, *, secure: bool) -> None:
        """Make the browser forget its nonce (a ``__Host-`` cookie only goes if Secure)."""
        response.delete_cookie(
            cookie_name(secure=secure), path="/", httponly=True, samesite="lax", secure=secure
        )
