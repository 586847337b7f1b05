"""Dashboard sessions ended by logging out (migration 0024), refused by every replica."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, text

_PRUNE = text("DELETE FROM ended_sessions WHERE expires_at < :now")
_END = text(
    "INSERT INTO ended_sessions (session_id, expires_at) VALUES (:session, :expires)"
    " ON CONFLICT (session_id) DO NOTHING"
)
_ENDED = text("SELECT 1 FROM ended_sessions WHERE session_id = :session")


def end(conn: Connection, session: str, expires: datetime, now: datetime) -> None:
    """Refuse ``session`` from now on, until ``expires``; forget sessions already expired."""
    conn.execute(_PRUNE, {"now": now})
    conn.execute(_END, {"session": session, "expires": expires})


def ended(conn: Connection, session: str) -> bool:
    """Whether ``session`` was ended by logging out."""
    return conn.execute(_ENDED, {"session": session}).first() is not None
