"""The ``security_review_ledger`` projection and the per-event facts it is folded from."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, RowMapping, select, text
from sqlalchemy.dialects.postgresql import insert

from secledger.extract import EventFacts, MRKey
from secledger.projection import LEDGER_COLUMNS, SequencedEvent, fold
from secledger.store.schema import review_events, security_review_ledger
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
_KEY_COLUMNS = ("instance", "project_id", "mr_iid")


def key_params(key: MRKey) -> dict[str, Any]:
    """Bind parameters naming one merge request."""
    return {"instance": key.instance, "project_id": key.project_id, "mr_iid": key.mr_iid}


def is_known(conn: Connection, key: MRKey) -> bool:
    """True when the merge request already has a ledger row (it was a security MR once)."""
    return conn.execute(_EXISTS, key_params(key)).first() is not None


def add_event(conn: Connection, seq: int, facts: EventFacts) -> None:
    """Store the facts one log row tells, for folding."""
    conn.execute(
        review_events.insert(),
        {
            "seq": seq,
            "instance": facts.instance,
            "project_id": facts.project_id,
            "mr_iid": facts.mr_iid,
            "event_at": facts.event_at,
            "kind": facts.kind,
            "decision": facts.decision,
            "actor": facts.actor,
            "facts": facts.to_json(),
        },
    )


def events_of(conn: Connection, key: MRKey) -> list[SequencedEvent]:
    """Every event of one merge request, in event-time order."""
    rows = conn.execute(_EVENTS_OF, key_params(key))
    return [SequencedEvent(seq, EventFacts.from_json(facts)) for seq, facts in rows]


_upsert_base = insert(security_review_ledger)
_UPSERT = _upsert_base.on_conflict_do_update(
    index_elements=list(_KEY_COLUMNS),
    set_={
        name: _upsert_base.excluded[name]
        for name in (*LEDGER_COLUMNS, "updated_at")
        if name not in _KEY_COLUMNS
    },
    # The fold covers every event up to last_seq, so a row never moves backwards.
    where=security_review_ledger.c.last_seq <= _upsert_base.excluded.last_seq,
).returning(*security_review_ledger.c)


def project(conn: Connection, key: MRKey) -> RowMapping | None:
    """Re-fold one merge request and upsert its ledger row; the row as stored."""
    events = events_of(conn, key)
    row = fold(events)
    row["updated_at"] = utcnow()
    return conn.execute(_UPSERT, row).mappings().first()


def notify(conn: Connection, message: str) -> None:
    """Tell listeners (``LISTEN secledger_ledger``) once the transaction commits."""
    conn.execute(_NOTIFY, {"message": message})


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
    yield from conn.execution_options(yield_per=1000).execute(query).mappings()


def known_keys(conn: Connection) -> Iterator[MRKey]:
    """Keys of every merge request in the ledger."""
    query = select(*(security_review_ledger.c[name] for name in _KEY_COLUMNS))
    for instance, project_id, mr_iid in conn.execute(query):
        yield MRKey(instance, project_id, mr_iid)
