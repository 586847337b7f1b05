"""CSRF tokens for the dashboard's forms: a signed double-submit cookie.

The browser holds a random nonce in an HttpOnly cookie; every form carries the same
nonce signed with the session key. A POST is accepted only when the signature is valid
and not older than a session, and its nonce equals the cookie's. Another site can make
the browser send the cookie but can read neither it nor the page, so it cannot supply
the field. The login form needs this too (no session exists yet): without it a hostile
page could log a visitor in as the attacker. Stateless, so it works on every replica
that shares SECLEDGER_SESSION_SECRET.
"""

from __future__ import annotations

import hmac
import re
import secrets

from itsdangerous import BadData, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

COOKIE = "secledger_csrf"
FIELD = "csrf_token"
_SALT = "secledger.csrf.v1"
_NONCE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
REFUSED = (
    "This form has expired or did not come from secledger's own page. "
    "Reload the page and try again."
)


class CsrfTokens:
    """Issues and checks the nonce cookie and the signed form field."""

    def __init__(self, secret: bytes, max_age: int) -> None:
        self._signer = URLSafeTimedSerializer(secret, salt=_SALT)
        self.max_age = max_age

    def nonce(self, request: Request) -> tuple[str, bool]:
        """The request's nonce, and whether it is new (then the cookie must be set)."""
        current = request.cookies.get(COOKIE, "")
        if _NONCE.fullmatch(current):
            return current, False
        return self.new_nonce(), True

    @staticmethod
    def new_nonce() -> str:
        """A fresh random nonce."""
        return secrets.token_urlsafe(32)

    def token(self, nonce: str) -> str:
        """The form field value for ``nonce``."""
        return self._signer.dumps(nonce)

    def valid(self, request: Request, submitted: str | None) -> bool:
        """True when ``submitted`` is a current token for the request's nonce cookie."""
        cookie = request.cookies.get(COOKIE)
        if not submitted or not cookie:
            return False
        try:
            nonce = self._signer.loads(submitted, max_age=self.max_age)
        except BadData:
            return False
        return isinstance(nonce, str) and hmac.compare_digest(nonce.encode(), cookie.encode())

    def set_cookie(self, response: Response, nonce: str, *, secure: bool) -> None:
        """Give the browser ``nonce`` (for the rest of its session)."""
        response.set_cookie(COOKIE, nonce, httponly=True, samesite="lax", secure=secure)
