"""The ``checkpoints`` table: signed chain heads, append-only like the log itself."""

from __future__ import annotations

from sqlalchemy import Connection, text

from secledger.checkpoint import Checkpoint
from secledger.store.chain import GENESIS

_HEAD = text("SELECT seq, hash FROM delivery_log ORDER BY seq DESC LIMIT 1")
_INSERT = text(
    "INSERT INTO checkpoints (seq, head_hash, signed_at, key_id, signature)"
    " VALUES (:seq, :head_hash, :signed_at, :key_id, :signature) RETURNING id"
)
_ALL = text("SELECT id, seq, head_hash, signed_at, key_id, signature FROM checkpoints ORDER BY id")
_RECENT = text(
    "SELECT seq, head_hash, signed_at, key_id, signature FROM checkpoints"
    " ORDER BY signed_at DESC, id DESC LIMIT :limit"
)
_HASH_AT = text("SELECT hash FROM delivery_log WHERE seq = :seq")


def head(conn: Connection) -> tuple[int, bytes]:
    """The committed chain head: ``(0, GENESIS)`` for an empty log."""
    row = conn.execute(_HEAD).first()
    return (int(row[0]), bytes(row[1])) if row else (0, GENESIS)


def add(conn: Connection, checkpoint: Checkpoint) -> int:
    """Store one signed checkpoint; its id."""
    params = {
        "seq": checkpoint.seq,
        "head_hash": checkpoint.head_hash,
        "signed_at": checkpoint.signed_at,
        "key_id": checkpoint.key_id,
        "signature": checkpoint.signature,
    }
    return int(conn.execute(_INSERT, params).scalar_one())


def stored(conn: Connection) -> list[tuple[int, Checkpoint]]:
    """Every stored checkpoint with its id, oldest first."""
    return [
        (row[0], Checkpoint(row[1], bytes(row[2]), row[3], row[4], bytes(row[5])))
        for row in conn.execute(_ALL)
    ]


def recent(conn: Connection, limit: int) -> list[Checkpoint]:
    """The newest ``limit`` stored checkpoints, newest signing first (their signatures
    unchecked)."""
    rows = conn.execute(_RECENT, {"limit": limit})
    return [Checkpoint(row[0], bytes(row[1]), row[2], row[3], bytes(row[4])) for row in rows]


def hash_at(conn: Connection, seq: int) -> bytes | None:
    """The log row ``seq``'s hash, or None when there is no such row."""
    value = conn.execute(_HASH_AT, {"seq": seq}).scalar()
    return None if value is None else bytes(value)
