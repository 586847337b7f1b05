"""The sink's transactional outbox: rows to POST, delivery markers, failed attempts.

Every table here is written with INSERT only (see migration 0009). Delivery is strictly
in seq order under one lock, so the delivered rows are always a prefix of the outbox and
"pending" is simply every outbox row above the highest delivered seq.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from secledger.store.pipeline import Pg, pipeline, send_rows
from secledger.times import isoformat

# One sender at a time across every process (serve replicas, `sink drain`), held for
# the transaction that posts one row and marks it, so nothing is sent twice by two
# senders and nothing overtakes an older row.
SINK_LOCK_KEY = 0x5EC1ED5C

_INSERT = text("INSERT INTO outbox (seq, idempotency_key, body) VALUES (:seq, :key, :body)")
_TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(:key)").bindparams(key=SINK_LOCK_KEY)
# The sender's transaction waits on each POST between statements; a server-wide
# idle_in_transaction_session_timeout shorter than a POST would end it (and its session),
# and so would PostgreSQL 17's transaction_timeout shorter than a batch of POSTs: the
# rows were then posted again and again, never marked. That setting is unknown before
# 17, hence set_config where it exists.
_NO_IDLE_LIMIT = text("SET LOCAL idle_in_transaction_session_timeout = 0")
_NO_TRANSACTION_LIMIT = text(
    "SELECT set_config('transaction_timeout', '0', true)"
    " WHERE current_setting('transaction_timeout', true) IS NOT NULL"
)
_HIGH_WATER = "(SELECT COALESCE(max(seq), 0) FROM outbox_delivered)"
_NEXT = text(
    f"SELECT seq, idempotency_key, body FROM outbox WHERE seq > {_HIGH_WATER}"
    " ORDER BY seq LIMIT :limit"
)
_DELIVERED = text("INSERT INTO outbox_delivered (seq, status) VALUES (:seq, :status)")
_FAILED = text("INSERT INTO outbox_failures (seq, status, error) VALUES (:seq, :status, :error)")
_STATUS = text(
    f"WITH hw AS (SELECT {_HIGH_WATER} AS seq)"
    " SELECT"
    " (SELECT count(*) FROM outbox, hw WHERE outbox.seq > hw.seq) AS pending,"
    " (SELECT count(DISTINCT f.seq) FROM outbox_failures f, hw WHERE f.seq > hw.seq) AS failed,"
    " (SELECT count(*) FROM outbox_failures f, hw WHERE f.seq > hw.seq) AS failed_attempts,"
    " (SELECT count(*) FROM outbox_delivered) AS delivered,"
    " (SELECT seq FROM hw) AS delivered_through,"
    " (SELECT min(outbox.seq) FROM outbox, hw WHERE outbox.seq > hw.seq) AS oldest_pending_seq,"
    " (SELECT min(created_at) FROM outbox, hw WHERE outbox.seq > hw.seq) AS oldest_pending_at"
)
_LAST_FAILURE = text(
    "SELECT f.seq, f.attempted_at, f.status, f.error FROM outbox_failures f"
    f" WHERE f.seq > {_HIGH_WATER} ORDER BY f.id DESC LIMIT 1"
)


@dataclass(frozen=True)
class Pending:
    """An outbox row not yet acknowledged by the sink."""

    seq: int
    idempotency_key: str
    body: str


@dataclass(frozen=True)
class Status:
    """What ``secledger sink status`` reports."""

    pending: int
    failed: int
    failed_attempts: int
    delivered: int
    delivered_through: int
    oldest_pending_seq: int | None
    oldest_pending_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form, times in ISO 8601."""
        out: dict[str, Any] = dict(self.__dict__)
        for name in ("oldest_pending_at", "last_error_at"):
            value = out[name]
            out[name] = isoformat(value) if value is not None else None
        return out


def add(conn: Connection, seq: int, idempotency_key: str, body: str) -> None:
    """Queue one ledger row for the sink, inside the recording transaction."""
    conn.execute(_INSERT, {"seq": seq, "key": idempotency_key, "body": body})


INSERT = (
    "INSERT INTO outbox (seq, idempotency_key, body) SELECT seq, idempotency_key, body"
    " FROM jsonb_populate_recordset(NULL::outbox, %(rows)s::jsonb)"
)


def add_many(conn: Connection, rows: list[tuple[int, str, str]]) -> None:
    """Queue several ``(seq, idempotency_key, body)`` rows in one round trip."""
    with pipeline(conn) as pg:
        send(pg, rows)


def send(pg: Pg, rows: list[tuple[int, str, str]]) -> None:
    """Queue the inserts of ``add_many`` on a pipeline."""
    params = [{"seq": seq, "idempotency_key": key, "body": body} for seq, key, body in rows]
    send_rows(pg, INSERT, params)


def try_lock(conn: Connection) -> bool:
    """Become the only sender until this transaction ends; False when another one is."""
    conn.execute(_NO_IDLE_LIMIT)
    conn.execute(_NO_TRANSACTION_LIMIT)
    return bool(conn.execute(_TRY_LOCK).scalar_one())


def next_pending(conn: Connection, limit: int) -> list[Pending]:
    """The oldest undelivered rows, oldest first."""
    rows = conn.execute(_NEXT, {"limit": limit})
    return [Pending(int(seq), str(key), str(body)) for seq, key, body in rows]


def mark_delivered(conn: Connection, seq: int, status: int) -> None:
    """Record that the sink acknowledged ``seq``."""
    conn.execute(_DELIVERED, {"seq": seq, "status": status})


def mark_failed(conn: Connection, seq: int, status: int | None, error: str) -> None:
    """Record one failed attempt (no secrets: a status and an error class only)."""
    conn.execute(_FAILED, {"seq": seq, "status": status, "error": error})


def status(conn: Connection) -> Status:
    """Counts of pending, failed and delivered rows, and the latest error."""
    counts = conn.execute(_STATUS).mappings().one()
    last = conn.execute(_LAST_FAILURE).first()
    return Status(
        pending=int(counts["pending"]),
        failed=int(counts["failed"]),
        failed_attempts=int(counts["failed_attempts"]),
        delivered=int(counts["delivered"]),
        delivered_through=int(counts["delivered_through"]),
        oldest_pending_seq=counts["oldest_pending_seq"],
        oldest_pending_at=counts["oldest_pending_at"],
        last_error=f"seq {last[0]}: {last[3]}" if last else None,
        last_error_at=last[1] if last else None,
    )
