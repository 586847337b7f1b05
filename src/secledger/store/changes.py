"""Ledger changes by log sequence: what ``secledger watch`` reads to catch up.

Every recorded log row has a ``review_events`` row with the same seq and its merge
request's key, and seqs commit in increasing order (they are assigned under the chain
lock, which is held until commit), so "every seq above N" read at any moment never
misses a change that becomes visible later with a smaller number.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, RowMapping, text

from secledger.extract import MRKey

# One statement, so the events and the rows come from one snapshot. The ledger row is
# the row as it is now; a LEFT JOIN so that a seq is never silently skipped.
_AFTER = text(
    "SELECT e.seq AS seq_, e.instance AS instance_, e.project_id AS project_id_,"
    " e.mr_iid AS mr_iid_, d.hash AS hash_, l.*"
    " FROM review_events e JOIN delivery_log d ON d.seq = e.seq"
    " LEFT JOIN security_review_ledger l"
    " ON l.instance = e.instance AND l.project_id = e.project_id AND l.mr_iid = e.mr_iid"
    " WHERE e.seq > :after ORDER BY e.seq LIMIT :limit"
)
_HEAD = text("SELECT COALESCE(max(seq), 0) FROM review_events")
_HASH = text("SELECT hash FROM delivery_log WHERE seq = :seq")
_OWN = ("seq_", "instance_", "project_id_", "mr_iid_", "hash_")


@dataclass(frozen=True)
class SeqRow:
    """One log seq, its merge request, and that merge request's ledger row now."""

    seq: int
    key: MRKey
    row: dict[str, object] | None
    hash: bytes = b""  # the log row's chain hash: which log this seq is of


def _split(mapping: RowMapping) -> SeqRow:
    key = MRKey(mapping["instance_"], int(mapping["project_id_"]), int(mapping["mr_iid_"]))
    row = {str(k): v for k, v in mapping.items() if k not in _OWN}
    seq, chained = int(mapping["seq_"]), bytes(mapping["hash_"])
    return SeqRow(seq, key, row if row.get("instance") is not None else None, chained)


def after(conn: Connection, seq: int, limit: int) -> list[SeqRow]:
    """Up to ``limit`` seqs greater than ``seq``, in order, each with its MR's ledger row."""
    result = conn.execute(_AFTER, {"after": seq, "limit": limit}).mappings()
    return [_split(mapping) for mapping in result]


def head(conn: Connection) -> int:
    """The highest recorded seq (0 for an empty ledger)."""
    return int(conn.execute(_HEAD).scalar_one())


def hash_at(conn: Connection, seq: int) -> bytes | None:
    """The chain hash of log row ``seq``, or None when there is none."""
    found = conn.execute(_HASH, {"seq": seq}).scalar_one_or_none()
    return None if found is None else bytes(found)
