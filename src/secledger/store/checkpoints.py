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
_LATEST_SEQ = text("SELECT max(seq) FROM checkpoints")


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


def latest_seq(conn: Connection) -> int | None:
    """The sequence number the newest checkpoint covers, if any."""
    value = conn.execute(_LATEST_SEQ).scalar()
    return None if value is None else int(value)
