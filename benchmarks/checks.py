"""What the database says after a run: new rows per run, and the hash chain walked end to end.

The chain is recomputed here with ``secledger.store.chain.link`` itself, row by row,
so a fork, a gap or a rewritten row shows up as a broken link.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from secledger.store.chain import GENESIS, LogRow, link


def log_rows(url: str, run: str) -> int:
    """Delivery-log rows written by one run (its Idempotency-Keys start with the run name)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM delivery_log WHERE dedup_key LIKE %s", (f"idem:{run}-%",)
        ).fetchone()
    return int(row[0]) if row else 0


def ceiling_rows(url: str) -> int:
    """Rows the ceiling app has inserted so far."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM bench_ceiling").fetchone()
    return int(row[0]) if row else 0


@dataclass
class ChainReport:
    """The outcome of walking the whole delivery log."""

    rows: int = 0
    broken: int = 0
    gaps: int = 0
    first_bad_seq: int | None = None

    @property
    def intact(self) -> bool:
        return self.rows > 0 and self.broken == 0 and self.gaps == 0


def walk_chain(url: str) -> ChainReport:
    """Recompute every link of ``delivery_log`` in sequence order."""
    report = ChainReport()
    previous_hash, previous_seq = GENESIS, 0
    query = (
        "SELECT seq, received_at, source, event, instance, dedup_key, headers, payload,"
        " prev_hash, hash FROM delivery_log ORDER BY seq"
    )
    with psycopg.connect(url) as conn, conn.cursor(name="walk") as cursor:
        cursor.itersize = 2000
        cursor.execute(query)
        for seq, received, source, event, instance, key, headers, payload, prev, digest in cursor:
            report.rows += 1
            if seq != previous_seq + 1:
                report.gaps += 1
            row = LogRow(seq, received, source, event, instance, key, headers, bytes(payload))
            expected = link(previous_hash, row)
            if bytes(prev) != previous_hash or bytes(digest) != expected:
                report.broken += 1
                report.first_bad_seq = report.first_bad_seq or seq
            previous_hash, previous_seq = bytes(digest), seq
    return report
