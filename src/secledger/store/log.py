"""The append-only delivery log: every accepted security delivery, hash-chained, never changed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from psycopg import Cursor
from sqlalchemy import Connection, text

from secledger.intake import API_SOURCE, Delivery
from secledger.store.chain import GENESIS, LogRow, link
from secledger.store.pipeline import Pg, lookup, pipeline

# One lock serialises appends across every process writing to this database, so the
# chain cannot fork. It is transaction-scoped: released by commit or rollback, after
# the commit is visible. The head is read by a statement that starts after the lock is
# granted, which under READ COMMITTED (the default) sees the previous holder's rows;
# under REPEATABLE READ the snapshot would predate the wait, and the seq primary key
# would turn that stale head into an error, never a fork.
CHAIN_LOCK_KEY = 0x5EC1ED6E

_LOCK = "SELECT pg_advisory_xact_lock(%(key)s::bigint)"
_TRY_LOCK = "SELECT pg_try_advisory_xact_lock(%(key)s::bigint)"
_HEAD = "SELECT seq, hash FROM delivery_log ORDER BY seq DESC LIMIT 1"
_BY_KEY = text("SELECT seq FROM delivery_log WHERE dedup_key = :dedup_key")
# A delivery is already logged when its dedup key is, or when the same instance's exact
# body is: a project hook and a group hook send one event's body byte for byte, each with
# its own Idempotency-Key. API rows name their fact in their key and take no part in the
# body match. The body hash is the writer's own (``body_sha256``): hashing every payload
# in PostgreSQL at insert (~30 us per 6 KB body, its sha256 being unaccelerated in some
# builds) made recording a batch 20-30 % slower. Rows logged before migration 0010 have
# none; their payloads were hashed once, into an index of their own.
# Three lookups in one statement, each on a unique or tiny index, so the plan is an index
# probe per delivery whatever the statistics say: one OR over an expression index was
# planned as a scan of the whole log while the table was young and not yet analysed
# (a few milliseconds per batch, growing with the log).
_BODIES = "(SELECT * FROM unnest(%(instances)b::text[], %(digests)b::bytea[]))"
LOGGED = (
    "SELECT dedup_key, seq, instance, CASE WHEN source <> 'api'"
    " THEN coalesce(body_sha256, sha256(payload)) END"
    " FROM delivery_log WHERE dedup_key = ANY(%(keys)b::text[])"
    " UNION ALL SELECT dedup_key, seq, instance, body_sha256 FROM delivery_log"
    " WHERE body_sha256 IS NOT NULL AND source <> 'api'"
    f" AND (instance, body_sha256) IN {_BODIES}"
    " UNION ALL SELECT dedup_key, seq, instance, sha256(payload) FROM delivery_log"
    " WHERE body_sha256 IS NULL AND source <> 'api'"
    f" AND (instance, sha256(payload)) IN {_BODIES}"
)
_COLUMNS = (
    "seq",
    "received_at",
    "source",
    "event",
    "instance",
    "dedup_key",
    "headers",
    "payload",
    "prev_hash",
    "hash",
    "body_sha256",
)
_TYPES = (
    "bigint",
    "timestamptz",
    "text",
    "text",
    "text",
    "text",
    "text",
    "bytea",
    "bytea",
    "bytea",
    "bytea",
)
# One statement for the whole batch: a column of each as an array (bytea does not
# travel in JSON). No ON CONFLICT: extend has already excluded logged keys under the
# chain lock, so a conflict here means something wrote without the lock, and the batch
# must fail.
INSERT = (
    f"INSERT INTO delivery_log ({', '.join(_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"%({name})b::{kind}[]" for name, kind in zip(_COLUMNS, _TYPES, strict=True))
    + ")"
)


def send_rows(pg: Pg, rows: Sequence[dict[str, object]]) -> None:
    """Queue the insert of ``rows`` (from ``Chain.extend``) on a pipeline."""
    if rows:
        pg.execute(INSERT, {name: [row[name] for row in rows] for name in _COLUMNS})


_RECEIPTS = text("SELECT seq, dedup_key, received_at FROM delivery_log WHERE seq = ANY(:seqs)")


def receipts(conn: Connection, seqs: Sequence[int]) -> dict[int, tuple[str, datetime]]:
    """The dedup key and receipt time of each of ``seqs`` that is logged."""
    if not seqs:
        return {}
    rows = conn.execute(_RECEIPTS, {"seqs": list(seqs)})
    return {int(seq): (str(key), received_at) for seq, key, received_at in rows}


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
        """Take the chain lock for this transaction and read the head (one round trip)."""
        with pipeline(conn) as pg:
            head = cls.send_open(pg)
        return cls.opened(head)

    @staticmethod
    def send_open(pg: Pg) -> Cursor[Any]:
        """Queue the lock and the head read on a pipeline; pass the cursor to ``opened``."""
        # Pipelined, the head is still read by a statement that starts after the lock
        # statement has returned, so it sees the previous holder's rows (see above).
        pg.execute(_LOCK, {"key": CHAIN_LOCK_KEY})
        return pg.execute(_HEAD)

    @staticmethod
    def send_try_open(pg: Pg) -> tuple[Cursor[Any], Cursor[Any]]:
        """Like ``send_open`` without waiting: the first cursor says whether the lock was
        taken; only then is the head (the second) the head under the lock."""
        return pg.execute(_TRY_LOCK, {"key": CHAIN_LOCK_KEY}), pg.execute(_HEAD)

    @classmethod
    def opened(cls, head: Cursor[Any]) -> Chain:
        """The chain, from the head read by ``send_open`` once the pipeline has synced."""
        chain = cls(0, GENESIS)
        chain.take_head(head.fetchone())
        return chain

    def reload(self, conn: Connection) -> None:
        """Re-read the head, after a savepoint was rolled back."""
        with pipeline(conn) as pg:
            head = pg.execute(_HEAD)
        self.take_head(head.fetchone())

    def take_head(self, row: tuple[Any, ...] | None) -> None:
        """Start from the newest row (``seq, hash``), or from the genesis for an empty log."""
        self.seq, self.hash = (int(row[0]), bytes(row[1])) if row else (0, GENESIS)

    def append(self, conn: Connection, delivery: Delivery) -> int | None:
        """Append ``delivery``; its new sequence number, or None when already logged."""
        return self.append_many(conn, [delivery])[0]

    def append_many(self, conn: Connection, deliveries: Sequence[Delivery]) -> list[int | None]:
        """Append ``deliveries`` in order in two round trips; like ``append`` for each.

        A delivery already logged (before, or earlier in this batch) gets None.
        """
        with pipeline(conn) as pg:
            found = Logged.send_lookup(pg, deliveries)
        seqs, rows = self.extend(deliveries, Logged.from_rows(found.fetchall()))
        with pipeline(conn) as pg:
            send_rows(pg, rows)
        return seqs

    def extend(
        self, deliveries: Sequence[Delivery], logged: Logged
    ) -> tuple[list[int | None], list[dict[str, object]]]:
        """Chain ``deliveries`` onto the head in memory: their seqs and the rows to insert.

        ``logged`` holds what the log already has (read under the lock); a delivery found
        there (or earlier in ``deliveries``) gets None, and each new one is added to it.
        The rows must be inserted (``INSERT``) in this transaction, under the lock.
        """
        rows: list[dict[str, object]] = []
        seqs: list[int | None] = []
        for delivery in deliveries:
            if logged.first(delivery) is not None:
                seqs.append(None)
                continue
            row = _log_row(self.seq + 1, delivery)
            digest = link(self.hash, row)
            rows.append(_params(row, self.hash, digest, delivery.body_sha256))
            logged.add(delivery, row.seq)
            self.seq, self.hash = row.seq, digest
            self.appended[row.seq] = digest
            seqs.append(row.seq)
        return seqs, rows


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


def _params(row: LogRow, prev_hash: bytes, digest: bytes, body_sha256: bytes) -> dict[str, object]:
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
        "body_sha256": body_sha256,
    }


def body_key(delivery: Delivery) -> tuple[str, bytes] | None:
    """What deduplication by body compares: instance and body hash; None for API rows."""
    if delivery.source == API_SOURCE:
        return None
    return delivery.instance, delivery.body_sha256


@dataclass
class Logged:
    """The log rows a batch's deliveries repeat: seqs by dedup key and by body."""

    keys: dict[str, int] = field(default_factory=dict)
    bodies: dict[tuple[str, bytes], int] = field(default_factory=dict)

    @staticmethod
    def send_lookup(pg: Pg, deliveries: Sequence[Delivery]) -> Cursor[Any]:
        """Queue the read of ``LOGGED`` for ``deliveries``; pass its rows to ``from_rows``."""
        keys = [delivery.dedup_key for delivery in deliveries]
        bodies = [body for body in map(body_key, deliveries) if body is not None]
        instances = [instance for instance, _ in bodies]
        digests = [digest for _, digest in bodies]
        return lookup(pg, LOGGED, {"keys": keys, "instances": instances, "digests": digests})

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[Any, ...]]) -> Logged:
        """From ``LOGGED`` rows; of several rows with one body (logged before bodies were
        compared), the first is the one a repeat is answered with."""
        logged = cls()
        for key, seq, instance, digest in sorted(rows, key=lambda row: int(row[1])):
            logged.keys[str(key)] = int(seq)
            if digest is not None:
                logged.bodies.setdefault((str(instance), bytes(digest)), int(seq))
        return logged

    def first(self, delivery: Delivery) -> int | None:
        """The seq of the log row ``delivery`` repeats, or None when it is new."""
        seq = self.keys.get(delivery.dedup_key)
        if seq is None:
            body = body_key(delivery)
            seq = self.bodies.get(body) if body is not None else None
        return seq

    def add(self, delivery: Delivery, seq: int) -> None:
        """Remember that ``delivery`` was just logged as ``seq``."""
        self.keys[delivery.dedup_key] = seq
        body = body_key(delivery)
        if body is not None:
            self.bodies.setdefault(body, seq)


def seq_of(conn: Connection, dedup_key: str) -> int | None:
    """The sequence number of an already-logged delivery."""
    return conn.execute(_BY_KEY, {"dedup_key": dedup_key}).scalar()
