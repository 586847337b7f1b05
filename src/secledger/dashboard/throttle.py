"""The failed-login limit, kept in PostgreSQL so replicas and restarts share it."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine

from secledger.config import Settings
from secledger.dashboard.auth import session_secret
from secledger.extract import NUL_REPLACEMENT
from secledger.store import logins
from secledger.store.logins import Reservation
from secledger.times import utcnow

MAX_KEY_CHARS = 256  # the client column's CHECK; longer names and clients count by prefix
_NAME_KEY_LABEL = b"secledger.login-attempts.user-name.v1"


def user_key(name: str) -> str:
    """The user name as counted: case, width and compatibility forms (NFKC) folded."""
    folded = unicodedata.normalize("NFKC", name).casefold().strip()
    return folded.replace("\x00", NUL_REPLACEMENT)[:MAX_KEY_CHARS]


def name_key(secret: bytes) -> bytes:
    """The key of the user-name digests: derived from the session secret, not the secret."""
    return hmac.new(secret, _NAME_KEY_LABEL, hashlib.sha256).digest()


def user_digest(key: bytes, name: str) -> str:
    """What ``login_attempts`` stores for ``name``: HMAC-SHA256 of ``user_key(name)``, hex.

    A name that is no user is often a password typed into the wrong field, so no name is
    stored. Configured users' names are digested too: PostgreSQL can then refuse anything
    else, and a name counts alike on replicas whose users files differ. The key comes from
    the session secret, which replicas share (docs/deployment.md), so they count alike;
    without it a copy of the table gives no typed password away, where an unkeyed hash of
    a password is soon guessed.
    """
    return hmac.new(key, user_key(name).encode(), hashlib.sha256).hexdigest()


def client_key(host: str) -> str:
    """The client as counted: an IPv4 address, or an IPv6 address's /64.

    One IPv6 subscriber usually holds a whole /64, so counting single addresses would
    give them 2^64 times the attempts.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.replace("\x00", NUL_REPLACEMENT)[:MAX_KEY_CHARS]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True)
class LoginThrottle:
    """At most ``limit`` failed logins per user name and per client within ``window``."""

    limit: int
    window: timedelta
    clock: Callable[[], datetime] = utcnow
    key: bytes = field(kw_only=True, repr=False)  # name_key(the session secret)

    @classmethod
    def from_settings(cls, settings: Settings) -> LoginThrottle:
        """The limit and window from SECLEDGER_LOGIN_*, names keyed by the session secret."""
        window = timedelta(seconds=settings.login_window_seconds)
        key = name_key(session_secret(settings))
        return cls(settings.login_max_failures, window, key=key)

    def reserve(self, engine: Engine, name: str, host: str) -> Reservation:
        """Take a slot for one password check, unless the user or the client is at the limit."""
        now = self.clock()
        attempt = logins.Attempt(user_digest(self.key, name), client_key(host), now)
        with engine.begin() as conn:
            return logins.reserve(conn, attempt, now - self.window, self.limit)

    def settle(self, engine: Engine, reservation: Reservation, *, succeeded: bool) -> None:
        """Record the outcome of a reserved check (a failure until this says otherwise)."""
        if reservation.attempt_id is None:
            return
        with engine.begin() as conn:
            logins.settle(conn, reservation.attempt_id, succeeded=succeeded)
