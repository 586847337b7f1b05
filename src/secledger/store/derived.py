"""Compare and repair the derived tables against a rebuild from the log."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import Connection, delete, insert, select, tuple_

from secledger.extract import MRKey
from secledger.projection import LEDGER_COLUMNS
from secledger.rebuild import EVENT_COLUMNS, Difference, Rebuilt, compare, event_row
from secledger.store.schema import review_events, security_review_ledger
from secledger.times import utcnow

EVENTS = "review_events"
LEDGER = "security_review_ledger"
_KEY = ("instance", "project_id", "mr_iid")


# The stored events are read in seq order, a few thousand at a time: held whole beside
# the rebuild, they (their facts as Python objects) took twice its memory (about 0.6 of
# 0.9 GB for 100,000 log rows).
_STREAM = {"stream_results": True, "yield_per": 2000}


def stored_events(conn: Connection) -> Iterator[dict[str, Any]]:
    """Every ``review_events`` row, in seq order, streamed."""
    columns = (review_events.c[n] for n in (*EVENT_COLUMNS, "facts"))
    query = select(review_events.c.seq, *columns).order_by(review_events.c.seq)
    for row in conn.execute(query.execution_options(**_STREAM)).mappings():
        yield dict(row)


def stored_ledger(conn: Connection) -> dict[MRKey, dict[str, Any]]:
    """Every ledger row by merge request. Read whole, unlike the events: one row per MR,
    and the server's collation may order instances otherwise than Python does."""
    query = select(*(security_review_ledger.c[n] for n in LEDGER_COLUMNS))
    return {
        MRKey(row["instance"], row["project_id"], row["mr_iid"]): dict(row)
        for row in conn.execute(query).mappings()
    }


def _side_by_side(
    stored: Iterable[dict[str, Any]], seqs: Iterable[int]
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Each seq of the stored rows and of ``seqs`` (both ascending) once, with its
    stored row, or None when only ``seqs`` has it."""
    rows, wanted = iter(stored), iter(seqs)
    row, seq = next(rows, None), next(wanted, None)
    while row is not None or seq is not None:
        if row is not None and (seq is None or row["seq"] <= seq):
            if row["seq"] == seq:
                seq = next(wanted, None)
            yield row["seq"], row
            row = next(rows, None)
        else:
            assert seq is not None  # noqa: S101 - for mypy: the loop's condition
            yield seq, None
            seq = next(wanted, None)


def differences(conn: Connection, rebuilt: Rebuilt) -> list[Difference]:
    """Every derived row that is missing, extra, or not what the log says."""
    return [*_event_differences(conn, rebuilt), *_ledger_differences(conn, rebuilt)]


def _event_differences(conn: Connection, rebuilt: Rebuilt) -> Iterator[Difference]:
    for seq, row in _side_by_side(stored_events(conn), sorted(rebuilt.events)):
        facts = rebuilt.events.get(seq)
        wanted = event_row(facts) if facts is not None else None
        found = compare(EVENTS, seq, row, wanted)
        if found is not None:
            yield found


def _ledger_differences(conn: Connection, rebuilt: Rebuilt) -> Iterator[Difference]:
    stored = stored_ledger(conn)
    for key in sorted(stored.keys() | rebuilt.ledger.keys()):
        found = compare(LEDGER, key, stored.get(key), rebuilt.ledger.get(key))
        if found is not None:
            yield found


def repair(conn: Connection, rebuilt: Rebuilt) -> list[Difference]:
    """Make the derived tables equal the rebuild, touching only differing rows."""
    found = differences(conn, rebuilt)
    seqs: list[int] = [d.ref for d in found if d.table == EVENTS]
    keys: list[MRKey] = [d.ref for d in found if d.table == LEDGER]
    if keys:
        key_columns = tuple_(*(security_review_ledger.c[n] for n in _KEY))
        wanted = [(k.instance, k.project_id, k.mr_iid) for k in keys]
        conn.execute(delete(security_review_ledger).where(key_columns.in_(wanted)))
    if seqs:
        conn.execute(delete(review_events).where(review_events.c.seq.in_(seqs)))
        rows = [{"seq": s, **event_row(rebuilt.events[s])} for s in seqs if s in rebuilt.events]
        if rows:
            conn.execute(insert(review_events), rows)
    now = utcnow()
    ledger_rows = [{**rebuilt.ledger[k], "updated_at": now} for k in keys if k in rebuilt.ledger]
    if ledger_rows:
        conn.execute(insert(security_review_ledger), ledger_rows)
    return found
