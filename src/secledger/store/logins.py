"""Dashboard login attempts (migration 0012): the failed-login count every replica shares.

An attempt is recorded as ``pending`` *before* its password is checked, under a lock
per user name and per client, and counts as a failure until it is settled as
``succeeded``. Checking and recording are one step, so twenty guesses sent at once to
three replicas still get no more than the limit of password checks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, text

# The two-int4 form of the advisory lock: its key space is separate from the bigint
# keys of the chain, sink, refresh and migration locks, so a hash can never collide
# with them. The second key is a hash of the user digest or the client; two that share
# a hash only wait for each other a few milliseconds.
LOCK_CLASS = 0x5EC1
_LOCK = text("SELECT pg_advisory_xact_lock(:cls, :key)")
_PRUNE = text("DELETE FROM login_attempts WHERE attempted_at < :horizon")
# The user count starts again after the user's last successful login (its row stays);
# the client count does not, so one account that works cannot clear the way for guesses
# at others from the same address.
_COUNT = text(
    "SELECT"
    " (SELECT count(*) FROM login_attempts a"
    "   WHERE a.user_name = :user AND a.outcome <> 'succeeded' AND a.attempted_at >= :horizon"
    "   AND a.id > (SELECT coalesce(max(s.id), 0) FROM login_attempts s"
    "               WHERE s.user_name = :user AND s.outcome = 'succeeded')),"
    " (SELECT count(*) FROM login_attempts"
    "   WHERE client = :client AND outcome <> 'succeeded' AND attempted_at >= :horizon)"
)
_INSERT = text(
    "INSERT INTO login_attempts (attempted_at, user_name, client)"
    " VALUES (:at, :user, :client) RETURNING id"
)
_SETTLE = text(
    "UPDATE login_attempts SET outcome = :outcome WHERE id = :id AND outcome = 'pending'"
)


@dataclass(frozen=True)
class Attempt:
    """Who is trying to log in, as counted: the user name's digest and the client key."""

    user: str
    client: str
    at: datetime


@dataclass(frozen=True)
class Reservation:
    """Failures counted before this attempt, and its row when it may go ahead."""

    user_failures: int
    client_failures: int
    attempt_id: int | None

    @property
    def allowed(self) -> bool:
        """True when the password may be checked."""
        return self.attempt_id is not None


def _lock_key(kind: str, value: str) -> int:
    digest = hashlib.blake2b(f"{kind}\x00{value}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def reserve(conn: Connection, attempt: Attempt, horizon: datetime, limit: int) -> Reservation:
    """Prune rows before ``horizon``; record ``attempt`` unless its user or client is at ``limit``.

    Holds transaction-scoped locks until the caller commits, so a concurrent attempt for
    the same user or client counts this one.
    """
    # Sorted, so two attempts sharing one key can never wait for each other in a cycle.
    for key in sorted({_lock_key("user", attempt.user), _lock_key("client", attempt.client)}):
        conn.execute(_LOCK, {"cls": LOCK_CLASS, "key": key})
    conn.execute(_PRUNE, {"horizon": horizon})
    params = {"user": attempt.user, "client": attempt.client, "horizon": horizon}
    by_user, by_client = conn.execute(_COUNT, params).one()
    if by_user >= limit or by_client >= limit:
        return Reservation(by_user, by_client, None)
    inserted = conn.execute(_INSERT, {**params, "at": attempt.at}).scalar_one()
    return Reservation(by_user, by_client, inserted)


def settle(conn: Connection, attempt_id: int, *, succeeded: bool) -> None:
    """Record how a reserved attempt ended."""
    outcome = "succeeded" if succeeded else "failed"
    conn.execute(_SETTLE, {"id": attempt_id, "outcome": outcome})
