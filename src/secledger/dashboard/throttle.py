"""The failed-login limit, kept in PostgreSQL so replicas and restarts share it."""

from __future__ import annotations

import ipaddress
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine

from secledger.config import Settings
from secledger.extract import NUL_REPLACEMENT
from secledger.store import logins
from secledger.store.logins import Reservation
from secledger.times import utcnow

MAX_KEY_CHARS = 256  # the table's CHECK; names beyond it are counted by their prefix


def user_key(name: str) -> str:
    """The user name as counted: case, width and compatibility forms (NFKC) folded."""
    folded = unicodedata.normalize("NFKC", name).casefold().strip()
    return folded.replace("\x00", NUL_REPLACEMENT)[:MAX_KEY_CHARS]


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

    @classmethod
    def from_settings(cls, settings: Settings) -> LoginThrottle:
        """The limit and window from SECLEDGER_LOGIN_*."""
        return cls(settings.login_max_failures, timedelta(seconds=settings.login_window_seconds))

    def reserve(self, engine: Engine, name: str, host: str) -> Reservation:
        """Take a slot for one password check, unless the user or the client is at the limit."""
        now = self.clock()
        attempt = logins.Attempt(user_key(name), client_key(host), now)
        with engine.begin() as conn:
            return logins.reserve(conn, attempt, now - self.window, self.limit)

    def settle(self, engine: Engine, reservation: Reservation, *, succeeded: bool) -> None:
        """Record the outcome of a reserved check (a failure until this says otherwise)."""
        if reservation.attempt_id is None:
            return
        with engine.begin() as conn:
            logins.settle(conn, reservation.attempt_id, succeeded=succeeded)
