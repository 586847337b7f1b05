"""The ``security_review_ledger`` projection and the per-event facts it is folded from."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, RowMapping, select, text
from sqlalchemy.dialects.postgresql import insert

from secledger.extract import EventFacts, MRKey
from secledger.intake import API_SOURCE
from secledger.projection import LEDGER_COLUMNS, UNDATED_APPROVAL, SequencedEvent, fold
from secledger.store.pipeline import Pg, lookup, pipeline, send_rows
from secledger.store.schema import security_review_ledger
from secledger.times import utcnow

_EVENTS_OF = text(
    "SELECT seq, facts FROM review_events"
    " WHERE instance = :instance AND project_id = :project_id AND mr_iid = :mr_iid"
    " ORDER BY event_at, seq"
)
_EXISTS = text(
    "SELECT 1 FROM security_review_ledger"
    " WHERE instance = :instance AND project_id = :project_id AND mr_iid = :mr_iid"
)
_NOTIFY = text("SELECT pg_notify('secledger_ledger', :message)")
NOTIFY_MANY = (
    "SELECT pg_notify('secledger_ledger', message) FROM unnest(%(messages)b::text[]) AS message"
)
# Keys are passed as three parallel arrays so one statement serves any batch size.
_KEYS = (
    " (instance, project_id, mr_iid) IN (SELECT * FROM unnest(%(instances)b::text[],"
    " %(project_ids)s::bigint[], %(mr_iids)s::bigint[]))"
)
# facts as text, decoded with orjson: the driver's stdlib JSON loader was the largest
# cost of reading a batch's events back.
EVENTS_OF_MANY = "SELECT seq, facts::text FROM review_events WHERE" + _KEYS
KNOWN_AMONG = "SELECT instance, project_id, mr_iid FROM security_review_ledger WHERE" + _KEYS
INSERT_EVENTS = (
    "INSERT INTO review_events"
    " (seq, instance, project_id, mr_iid, event_at, kind, decision, actor, facts)"
    " SELECT seq, instance, project_id, mr_iid, event_at, kind, decision, actor, facts"
    " FROM jsonb_populate_recordset(NULL::review_events, %(rows)s::jsonb)"
)
_KEY_COLUMNS = ("instance", "project_id", "mr_iid")


def key_params(key: MRKey) -> dict[str, Any]:
    """Bind parameters naming one merge request."""
    return {"instance": key.instance, "project_id": key.project_id, "mr_iid": key.mr_iid}


_FIRST_RECEIPT = text(
    "SELECT l.received_at, e.event_at FROM review_events e JOIN delivery_log l ON l.seq = e.seq"
    " WHERE e.instance = :instance AND e.project_id = :project_id AND e.mr_iid = :mr_iid"
    " ORDER BY l.received_at, l.seq LIMIT 1"
)


def _same_user(event: str) -> str:
    """SQL: ``event`` (an alias of review_events) is the user ``:actor_id`` (by id, which a
    rename keeps, when both sides have one; else by the username ``:actor``), as the fold
    matches an approval with its revocation (``projection._given_by``)."""
    stored = f"({event}.facts->>'actor_id')::bigint"
    return (
        f"(CASE WHEN CAST(:actor_id AS bigint) IS NOT NULL AND {stored} IS NOT NULL"
        f" THEN {stored} = CAST(:actor_id AS bigint) ELSE {event}.actor = :actor END)"
    )


_LAST_REVOCATION = text(
    "SELECT seq, event_at FROM review_events e"
    " WHERE instance = :instance AND project_id = :project_id AND mr_iid = :mr_iid"
    f" AND {_same_user('e')} AND decision = 'unapproved' AND event_at <= :bound"
    " ORDER BY event_at DESC, seq DESC LIMIT 1"
)
_UNDATED = orjson.dumps({"source": API_SOURCE, "event_at_source": UNDATED_APPROVAL}).decode()
# An undated API approval of the user after that revocation, with no other revocation
# of theirs between: the approval that followed it, whatever its own bound (a look read
# before a later one may be recorded after it).
_UNDATED_SINCE = text(
    "SELECT 1 FROM review_events a"
    " WHERE a.instance = :instance AND a.project_id = :project_id AND a.mr_iid = :mr_iid"
    f" AND {_same_user('a')} AND a.decision = 'approved'"
    " AND a.facts @> CAST(:undated AS jsonb) AND (a.event_at, a.seq) > (:after_at, :after_seq)"
    " AND a.event_at >= :floor"
    " AND NOT EXISTS (SELECT 1 FROM review_events r"
    " WHERE r.instance = a.instance AND r.project_id = a.project_id AND r.mr_iid = a.mr_iid"
    f" AND {_same_user('r')} AND r.decision = 'unapproved'"
    " AND (r.event_at, r.seq) > (:after_at, :after_seq)"
    " AND (r.event_at, r.seq) < (a.event_at, a.seq))"
    " LIMIT 1"
)


def undated_standing(
    conn: Connection,
    key: MRKey,
    actor: str,
    bound: datetime,
    *,
    dated: bool = False,
    actor_id: int | None = None,
) -> tuple[int | None, bool]:
    """For an approval by ``actor`` the API gives no time, placed at ``bound``: the seq of
    their latest revocation before it in event-time order, then log seq (None if none is
    logged), and whether an undated API approval of theirs already follows that
    revocation with no other between, so that this approval is the one it told.

    With ``dated``, ``bound`` is the time GitLab gives the approval (a newer GitLab): an
    undated one placed at or after it, with no revocation between, is the same approval
    as an older GitLab showed it."""
    floor = bound if dated else datetime.min.replace(tzinfo=UTC)
    params = key_params(key) | {
        "actor": actor,
        "actor_id": actor_id,
        "bound": bound,
        "floor": floor,
    }
    revoked = conn.execute(_LAST_REVOCATION, params).first()
    if revoked is None:
        after = {"after_at": datetime.min.replace(tzinfo=UTC), "after_seq": 0}
    else:
        after = {"after_at": revoked.event_at, "after_seq": revoked.seq}
    seen = conn.execute(_UNDATED_SINCE, params | after | {"undated": _UNDATED}).first()
    return (None if revoked is None else int(revoked.seq)), seen is not None


def first_receipt(conn: Connection, key: MRKey) -> tuple[datetime, datetime] | None:
    """When the first delivery logged for the merge request was received (by whichever
    replica logged it; from then on every delivery for it is kept), and the time of
    its event in GitLab."""
    row = conn.execute(_FIRST_RECEIPT, key_params(key)).first()
    return None if row is None else (row[0], row[1])


def is_known(conn: Connection, key: MRKey) -> bool:
    """True when the merge request already has a ledger row (it was a security MR once)."""
    return conn.execute(_EXISTS, key_params(key)).first() is not None


def keys_params(keys: Iterable[MRKey]) -> dict[str, list[Any]]:
    """Bind parameters naming several merge requests (for ``_KEYS``)."""
    listed = list(keys)
    return {
        "instances": [key.instance for key in listed],
        "project_ids": [key.project_id for key in listed],
        "mr_iids": [key.mr_iid for key in listed],
    }


def known_among(conn: Connection, keys: Iterable[MRKey]) -> set[MRKey]:
    """The merge requests among ``keys`` that already have a ledger row."""
    with pipeline(conn) as pg:
        found = lookup(pg, KNOWN_AMONG, keys_params(keys))
    return known_from(found.fetchall())


def known_from(rows: Iterable[tuple[Any, ...]]) -> set[MRKey]:
    """Keys from ``KNOWN_AMONG`` rows."""
    return {MRKey(instance, project_id, mr_iid) for instance, project_id, mr_iid in rows}


def _event_params(seq: int, facts: EventFacts) -> dict[str, Any]:
    return {
        "seq": seq,
        "instance": facts.instance,
        "project_id": facts.project_id,
        "mr_iid": facts.mr_iid,
        "event_at": facts.event_at,
        "kind": facts.kind,
        "decision": facts.decision,
        "actor": facts.actor,
        "facts": facts.to_json(),
    }


def add_event(conn: Connection, seq: int, facts: EventFacts) -> None:
    """Store the facts one log row tells, for folding."""
    add_events(conn, [(seq, facts)])


def add_events(conn: Connection, events: Sequence[tuple[int, EventFacts]]) -> None:
    """Store the facts of several log rows in one round trip."""
    with pipeline(conn) as pg:
        send_events(pg, events)


def send_events(pg: Pg, events: Sequence[tuple[int, EventFacts]]) -> None:
    """Queue the inserts of ``add_events`` on a pipeline."""
    send_rows(pg, INSERT_EVENTS, [_event_params(seq, f) for seq, f in events])


def events_by_mr(conn: Connection, keys: Iterable[MRKey]) -> dict[MRKey, list[SequencedEvent]]:
    """Every event of each merge request in ``keys``, in event-time order, in one query."""
    with pipeline(conn) as pg:
        found = lookup(pg, EVENTS_OF_MANY, keys_params(keys))
    return events_from(found.fetchall())


def events_from(rows: Iterable[tuple[Any, ...]]) -> dict[MRKey, list[SequencedEvent]]:
    """``EVENTS_OF_MANY`` rows grouped by merge request, each list in event-time order."""
    found: dict[MRKey, list[SequencedEvent]] = {}
    for seq, data in rows:
        facts = EventFacts.from_json(orjson.loads(data))
        found.setdefault(facts.key, []).append(SequencedEvent(seq, facts))
    for events in found.values():
        events.sort(key=lambda e: (e.facts.event_at, e.seq))
    return found


def events_of(conn: Connection, key: MRKey) -> list[SequencedEvent]:
    """Every event of one merge request, in event-time order."""
    rows = conn.execute(_EVENTS_OF, key_params(key))
    return [SequencedEvent(seq, EventFacts.from_json(facts)) for seq, facts in rows]


_upsert_base = insert(security_review_ledger)
_UPSERT_MANY = _upsert_base.on_conflict_do_update(
    index_elements=list(_KEY_COLUMNS),
    set_={
        name: _upsert_base.excluded[name]
        for name in (*LEDGER_COLUMNS, "updated_at")
        if name not in _KEY_COLUMNS
    },
    # The fold covers every event up to last_seq, so a row never moves backwards.
    where=security_review_ledger.c.last_seq <= _upsert_base.excluded.last_seq,
)
_UPSERT = _UPSERT_MANY.returning(*security_review_ledger.c)


def project(conn: Connection, key: MRKey) -> RowMapping | None:
    """Re-fold one merge request and upsert its ledger row; the row as stored."""
    events = events_of(conn, key)
    row = fold(events)
    row["updated_at"] = utcnow()
    return conn.execute(_UPSERT, row).mappings().first()


_SET = ", ".join(
    f"{name} = excluded.{name}"
    for name in (*LEDGER_COLUMNS, "updated_at")
    if name not in _KEY_COLUMNS
)
UPSERT = (
    f"INSERT INTO security_review_ledger ({', '.join(LEDGER_COLUMNS)}, updated_at)"
    f" SELECT {', '.join(LEDGER_COLUMNS)}, updated_at"
    " FROM jsonb_populate_recordset(NULL::security_review_ledger, %(rows)s::jsonb)"
    f" ON CONFLICT (instance, project_id, mr_iid) DO UPDATE SET {_SET}"
    # The fold covers every event up to last_seq, so a row never moves backwards.
    " WHERE security_review_ledger.last_seq <= excluded.last_seq"
)


def upsert_rows(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Upsert several folded rows (each must cover every event up to its last_seq)."""
    with pipeline(conn) as pg:
        send_upserts(pg, rows)


def send_upserts(pg: Pg, rows: Sequence[dict[str, Any]]) -> None:
    """Queue the upserts of ``upsert_rows`` on a pipeline."""
    send_rows(pg, UPSERT, rows)


def notify_many(conn: Connection, messages: Sequence[str]) -> None:
    """``notify`` for several messages in one statement."""
    with pipeline(conn) as pg:
        send_notices(pg, messages)


def send_notices(pg: Pg, messages: Sequence[str]) -> None:
    """Queue ``notify_many`` on a pipeline."""
    if messages:
        pg.execute(NOTIFY_MANY, {"messages": list(messages)})


def notify(conn: Connection, message: str) -> None:
    """Tell listeners (``LISTEN secledger_ledger``) once the transaction commits."""
    conn.execute(_NOTIFY, {"message": message})


_GET = (
    "SELECT * FROM security_review_ledger"
    " WHERE instance = %(instance)s AND project_id = %(project_id)s AND mr_iid = %(mr_iid)s"
)


def get_many(conn: Connection, keys: Iterable[MRKey]) -> dict[MRKey, dict[str, Any] | None]:
    """The ledger rows of ``keys`` (None for a key without one) in one round trip, through
    the psycopg connection: the writer's connection runs no SQLAlchemy transaction."""
    listed = list(keys)
    if not listed:
        return {}
    with pipeline(conn) as pg:
        cursors = [pg.execute(_GET, key_params(key)) for key in listed]
    found: dict[MRKey, dict[str, Any] | None] = {}
    for key, cursor in zip(listed, cursors, strict=True):
        row = cursor.fetchone()
        names = [column.name for column in cursor.description or ()]
        found[key] = dict(zip(names, row, strict=True)) if row is not None else None
    return found


def get(conn: Connection, key: MRKey) -> RowMapping | None:
    """One ledger row."""
    query = select(security_review_ledger).where(
        security_review_ledger.c.instance == key.instance,
        security_review_ledger.c.project_id == key.project_id,
        security_review_ledger.c.mr_iid == key.mr_iid,
    )
    return conn.execute(query).mappings().first()


def rows(conn: Connection, order: Sequence[str] = ("last_event_at",)) -> Iterator[RowMapping]:
    """Every ledger row, streamed."""
    query = select(security_review_ledger).order_by(
        *(security_review_ledger.c[name] for name in order)
    )
    # On the statement: Connection.execution_options changes the connection itself, and
    # every later statement on it (an INSERT too) would run as a server-side cursor.
    yield from conn.execute(query.execution_options(yield_per=1000)).mappings()


def known_keys(conn: Connection) -> Iterator[MRKey]:
    """Keys of every merge request in the ledger."""
    query = select(*(security_review_ledger.c[name] for name in _KEY_COLUMNS))
    for instance, project_id, mr_iid in conn.execute(query):
        yield MRKey(instance, project_id, mr_iid)
