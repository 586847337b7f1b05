"""Several statements in one round trip: psycopg's pipeline mode under a SQLAlchemy connection.

The writer records a whole batch in a handful of round trips instead of one per
statement; on a busy machine each round trip costs two context switches and a
scheduling delay, which was most of the writer's time. The statements run in the
caller's transaction, in the order they were sent, each with its own snapshot, exactly
as if sent one by one; nothing here commits or begins one (the writer sends its own
BEGIN and COMMIT statements, see ``secledger.recorder``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

Params = Mapping[str, Any]
Pg = psycopg.Connection[Any]


def driver(conn: Connection) -> Pg:
    """The psycopg connection under ``conn`` (same session, same transaction)."""
    raw: Pg = conn.connection.driver_connection  # type: ignore[assignment]
    return raw


@contextmanager
def pipeline(conn: Connection) -> Iterator[Pg]:
    """Queue statements on the yielded connection; they are sent and synced when the block ends.

    Read results (``cursor.fetchall()``) after the block. A psycopg error comes out as
    SQLAlchemy's, so callers sort it (unreachable or refused) as they sort errors of
    ``conn.execute``.
    """
    raw = driver(conn)
    try:
        with raw.pipeline():
            yield raw
    except psycopg.Error as exc:
        broken = raw.broken or raw.closed
        if broken:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            None, None, exc, psycopg.Error, connection_invalidated=broken
        ) from exc


def transaction_status(conn: Connection) -> psycopg.pq.TransactionStatus | None:
    """The session's transaction status; None when the connection was found broken
    (SQLAlchemy would silently reconnect if it were used again)."""
    if conn.invalidated or conn.closed:
        return None
    return driver(conn).info.transaction_status


def lookup(pg: Pg, sql: str, params: Params) -> psycopg.Cursor[Any]:
    """Queue a read whose best plan depends on how big its table is, planned afresh each time.

    psycopg prepares a statement after five executions, and PostgreSQL may then reuse a
    generic plan chosen while the table was empty, on a connection the writer holds for
    days. Under the benchmark, with pg_stat_statements, the dedup lookup took 2.5 ms a
    batch prepared and 0.3 ms unprepared, and the read of uncached events 1.9 ms where
    a fresh plan is an index probe. The price is planning these few reads each time.
    """
    return pg.execute(sql, params, prepare=False)


def send_rows(pg: Pg, sql: str, rows: Sequence[Params]) -> None:
    """Queue ``sql`` once for all ``rows``, passed as one JSON array in ``%(rows)s``.

    One statement per table per batch, whatever the batch size: executing a statement
    per row cost psycopg a send-and-poll cycle each, which was half the writer's CPU.
    The statement reads the rows with ``jsonb_populate_recordset`` (the table's own
    column types) or ``jsonb_to_recordset``; datetimes travel as RFC 3339 with their
    offset, lists as JSON arrays.
    """
    if rows:
        pg.execute(sql, {"rows": orjson.dumps(rows).decode()})
