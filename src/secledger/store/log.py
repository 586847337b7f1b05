"""The append-only delivery log: every accepted security delivery, hash-chained, never changed."""

from __future__ import annotations

from dataclasses import dataclass

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


def headers_text(headers: dict[str, str]) -> str:
    """Headers as stored and hashed: JSON with sorted keys and no spaces."""
    return orjson.dumps(headers, option=orjson.OPT_SORT_KEYS).decode()


@dataclass
class Chain:
    """The chain head for one transaction; holding it means holding the chain lock."""

    seq: int
    hash: bytes

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
        row = LogRow(
            seq=self.seq + 1,
            received_at=delivery.received_at,
            source=delivery.source,
            event=delivery.event,
            instance=delivery.instance,
            dedup_key=delivery.dedup_key,
            headers=headers_text(delivery.headers),
            payload=delivery.body,
        )
        digest = link(self.hash, row)
        inserted = conn.execute(
            _INSERT,
            {
                "seq": row.seq,
                "received_at": row.received_at,
                "source": row.source,
                "event": row.event,
                "instance": row.instance,
                "dedup_key": row.dedup_key,
                "headers": row.headers,
                "payload": row.payload,
                "prev_hash": self.hash,
                "hash": digest,
            },
        ).first()
        if inserted is None:
            return None
        self.seq, self.hash = row.seq, digest
        return row.seq


def seq_of(conn: Connection, dedup_key: str) -> int | None:
    """The sequence number of an already-logged delivery."""
    return conn.execute(_BY_KEY, {"dedup_key": dedup_key}).scalar()
