"""The append-only delivery log: every accepted security delivery, hash-chained, never changed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
from sqlalchemy import Connection, text

from secledger.intake import Delivery
from secledger.store.chain import GENESIS, LogRow, link

# One lock serialises appends across every process writing to this database, so the
# chain cannot fork. It is transaction-scoped: released by commit or rollback, after
# the commit is visible. The head is read by a statement that starts after the lock is
# granted, which under READ COMMITTED (the default) sees the previous holder's rows;
# under REPEATABLE READ the snapshot would predate the wait, and the seq primary key
# would turn that stale head into an error, never a fork.
CHAIN_LOCK_KEY = 0x5EC1ED6E

_LOCK = text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=CHAIN_LOCK_KEY)
_HEAD = text("SELECT seq, hash FROM delivery_log ORDER BY seq DESC LIMIT 1")
_INSERT = text(
    "INSERT INTO delivery_log"
    " (seq, received_at, source, event, instance, dedup_key, headers, payload, prev_hash, hash)"
    " VALUES (:seq, :received_at, :source, :event, :instance, :dedup_key, :headers, :payload,"
    " :prev_hash, :hash)"
    " ON CONFLICT (dedup_key) DO NOTHING RETURNING seq"
)
_BY_KEY = text("SELECT seq FROM delivery_log WHERE dedup_key = :dedup_key")
_BY_KEYS = text("SELECT dedup_key, seq FROM delivery_log WHERE dedup_key = ANY(:keys)")
# No ON CONFLICT: append_many has already excluded logged keys under the chain lock, so
# a conflict here means something wrote without the lock, and the batch must fail.
_INSERT_MANY = text(
    "INSERT INTO delivery_log"
    " (seq, received_at, source, event, instance, dedup_key, headers, payload, prev_hash, hash)"
    " VALUES (:seq, :received_at, :source, :event, :instance, :dedup_key, :headers, :payload,"
    " :prev_hash, :hash)"
)


def headers_text(headers: dict[str, str]) -> str:
    """Headers as stored and hashed: JSON with sorted keys and no spaces."""
    return orjson.dumps(headers, option=orjson.OPT_SORT_KEYS).decode()


@dataclass
class Chain:
    """The chain head for one transaction; holding it means holding the chain lock."""

    seq: int
    hash: bytes
    # Hashes of the rows appended in this transaction, by seq (the sink's idempotency key).
    appended: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def open(cls, conn: Connection) -> Chain:
        """Take the chain lock for this transaction and read the head."""
        conn.execute(_LOCK)
        chain = cls(0, GENESIS)
        chain.reload(conn)
        return chain

    def reload(self, conn: Connection) -> None:
        """Re-read the head, after a savepoint was rolled back."""
        row = conn.execute(_HEAD).first()
        self.seq, self.hash = (row[0], bytes(row[1])) if row else (0, GENESIS)

    def append(self, conn: Connection, delivery: Delivery) -> int | None:
        """Append ``delivery``; its new sequence number, or None when already logged."""
        return self.append_many(conn, [delivery])[0]

    def append_many(self, conn: Connection, deliveries: Sequence[Delivery]) -> list[int | None]:
        """Append ``deliveries`` in order in two round trips; like ``append`` for each.

        A delivery already logged (before, or earlier in this batch) gets None.
        """
        logged = logged_seqs(conn, [d.dedup_key for d in deliveries])
        params: list[dict[str, object]] = []
        seqs: list[int | None] = []
        for delivery in deliveries:
            if delivery.dedup_key in logged:
                seqs.append(None)
                continue
            row = _log_row(self.seq + 1, delivery)
            digest = link(self.hash, row)
            params.append(_params(row, self.hash, digest))
            logged[row.dedup_key] = row.seq
            self.seq, self.hash = row.seq, digest
            self.appended[row.seq] = digest
            seqs.append(row.seq)
        if params:
            conn.execute(_INSERT_MANY, params)
        return seqs


def _log_row(seq: int, delivery: Delivery) -> LogRow:
    return LogRow(
        seq=seq,
        received_at=delivery.received_at,
        source=delivery.source,
        event=delivery.event,
        instance=delivery.instance,
        dedup_key=delivery.dedup_key,
        headers=headers_text(delivery.headers),
        payload=delivery.body,
    )


def _params(row: LogRow, prev_hash: bytes, digest: bytes) -> dict[str, object]:
    return {
        "seq": row.seq,
        "received_at": row.received_at,
        "source": row.source,
        "event": row.event,
        "instance": row.instance,
        "dedup_key": row.dedup_key,
        "headers": row.headers,
        "payload": row.payload,
        "prev_hash": prev_hash,
        "hash": digest,
    }


def logged_seqs(conn: Connection, dedup_keys: Sequence[str]) -> dict[str, int]:
    """Sequence numbers of the keys among ``dedup_keys`` that are already logged."""
    rows = conn.execute(_BY_KEYS, {"keys": list(dedup_keys)})
    return {str(row[0]): int(row[1]) for row in rows}


def seq_of(conn: Connection, dedup_key: str) -> int | None:
    """The sequence number of an already-logged delivery."""
    return conn.execute(_BY_KEY, {"dedup_key": dedup_key}).scalar()
