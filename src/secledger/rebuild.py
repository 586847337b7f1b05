"""Recompute ``review_events`` and ``security_review_ledger`` from the delivery log alone.

Each log row is decoded and extracted by the same functions as the live path
(``intake.parse_delivery``, ``extract.extract_facts``, ``projection.fold``), so a clean
rebuild proves the ledger says exactly what the log says, under the current policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, text

from secledger import apifacts
from secledger.errors import IntakeError, SecledgerError
from secledger.extract import EventFacts, MRKey, extract_facts
from secledger.intake import Delivery, Ignored, parse_delivery
from secledger.policy import LabelPolicy
from secledger.projection import SequencedEvent, fold

EVENT_COLUMNS = ("instance", "project_id", "mr_iid", "event_at", "kind", "decision", "actor")
_LOG = text(
    "SELECT seq, received_at, source, event, instance, dedup_key, headers, payload"
    " FROM delivery_log ORDER BY seq"
)


class Undecodable(SecledgerError):
    """A log row the current code cannot turn back into a delivery."""


@dataclass(frozen=True)
class LoggedRow:
    """The columns of one log row that decoding needs."""

    seq: int
    received_at: datetime
    source: str
    event: str
    instance: str
    dedup_key: str
    headers: dict[str, str]
    payload: bytes


def _from_request(row: LoggedRow) -> Delivery:
    """Rows that hold an HTTP request as received: the webhook endpoint and ``replay``."""
    decoded = parse_delivery(
        row.headers,
        row.payload,
        secrets=(),
        max_body_bytes=len(row.payload) + 1,
        received_at=row.received_at,
        require_token=False,
        source=row.source,
    )
    if isinstance(decoded, Ignored):
        raise Undecodable(f"log row seq={row.seq} decodes as ignored: {decoded.reason}")
    # The logged (hashed) columns are the record; decoding only recovers the payload.
    return dataclasses.replace(decoded, instance=row.instance, dedup_key=row.dedup_key)


def _from_api(row: LoggedRow, policy: LabelPolicy) -> EventFacts:
    """Rows written by backfill and enrichment: one REST API fact as canonical JSON."""
    try:
        return apifacts.facts(row.instance, orjson.loads(row.payload), policy)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise Undecodable(f"log row seq={row.seq} no longer decodes: {exc}") from None


def _from_request_facts(row: LoggedRow, policy: LabelPolicy) -> EventFacts:
    try:
        return extract_facts(_from_request(row), policy)
    except IntakeError as exc:
        raise Undecodable(f"log row seq={row.seq} no longer decodes: {exc}") from None


# One decoder per log ``source``; a new way in adds its line here.
DECODERS: dict[str, Callable[[LoggedRow, LabelPolicy], EventFacts]] = {
    "webhook": _from_request_facts,
    "replay": _from_request_facts,
    apifacts.SOURCE: _from_api,
}


def facts_of(row: LoggedRow, policy: LabelPolicy) -> EventFacts:
    """The facts a log row records, by the decoder for its source."""
    decoder = DECODERS.get(row.source)
    if decoder is None:
        raise Undecodable(f"log row seq={row.seq} has source {row.source!r}, which has no decoder")
    return decoder(row, policy)


def logged_rows(conn: Connection) -> Iterator[LoggedRow]:
    """Every log row in sequence order, streamed."""
    # Per statement: Connection.execution_options would change the connection itself.
    result = conn.execute(_LOG.execution_options(stream_results=True, yield_per=2000))
    for seq, received_at, source, event, instance, dedup_key, headers, payload in result:
        yield LoggedRow(
            seq,
            received_at,
            source,
            event,
            instance,
            dedup_key,
            orjson.loads(headers),
            bytes(payload),
        )


@dataclass
class Rebuilt:
    """What the log says the derived tables should hold."""

    events: dict[int, EventFacts] = field(default_factory=dict)
    ledger: dict[MRKey, dict[str, Any]] = field(default_factory=dict)


# Log rows read between two calls of a progress callback.
PROGRESS_STEP = 1000


def rebuild(
    conn: Connection, policy: LabelPolicy, progress: Callable[[int], None] | None = None
) -> Rebuilt:
    """Decode, extract and fold the whole log; ``progress`` is told the rows read."""
    rebuilt = Rebuilt()
    by_mr: dict[MRKey, list[SequencedEvent]] = {}
    read = 0
    for row in logged_rows(conn):
        facts = facts_of(row, policy)
        rebuilt.events[row.seq] = facts
        by_mr.setdefault(facts.key, []).append(SequencedEvent(row.seq, facts))
        read += 1
        if progress is not None and read == PROGRESS_STEP:
            progress(read)
            read = 0
    if progress is not None and read:
        progress(read)
    rebuilt.ledger = {key: fold(events) for key, events in by_mr.items()}
    return rebuilt


def log_rows(conn: Connection) -> int:
    """How many rows the log holds, for a progress bar's total."""
    return int(conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one())


def event_row(facts: EventFacts) -> dict[str, Any]:
    """The ``review_events`` columns for one event (facts normalised through JSON)."""
    row = {name: getattr(facts, name) for name in EVENT_COLUMNS}
    row["facts"] = orjson.loads(orjson.dumps(facts.to_json()))
    return row


@dataclass(frozen=True)
class Difference:
    """One derived row that is not what the log says."""

    table: str
    key: str
    kind: str  # "missing", "extra" or "differs"
    columns: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)
    ref: Any = None  # the seq or MRKey, for repairs

    def describe(self) -> str:
        """One line for people: which row, and stored vs rebuilt for each column (for a
        JSON column, for each of its keys that differ)."""
        changed = "; ".join(
            f"{name}: stored {_shown(stored)}, log says {_shown(wanted)}"
            for column, (stored, wanted) in self.columns.items()
            for name, (stored, wanted) in _by_key(column, stored, wanted)
        )
        return f"{self.table} {self.key}: {self.kind}" + (f" ({changed})" if changed else "")


_ABSENT = object()


def _by_key(column: str, stored: Any, wanted: Any) -> list[tuple[str, tuple[Any, Any]]]:
    """``column``'s difference, split by key when both sides are JSON objects: a fact
    added by a newer version (``tier_before``) is then named, not shown inside two
    copies of the whole object."""
    if not (isinstance(stored, Mapping) and isinstance(wanted, Mapping)):
        return [(column, (stored, wanted))]
    return [
        (f"{column}.{key}", (stored.get(key, _ABSENT), wanted.get(key, _ABSENT)))
        for key in sorted({*stored, *wanted})
        if stored.get(key, _ABSENT) != wanted.get(key, _ABSENT)
    ]


def _shown(value: Any) -> str:
    return "nothing" if value is _ABSENT else repr(value)


def compare(
    table: str, ref: Any, stored: Mapping[str, Any] | None, wanted: Mapping[str, Any] | None
) -> Difference | None:
    """The difference between a stored row and the rebuilt one, if any."""
    key = describe_key(ref)
    if stored is None:
        return Difference(table, key, "missing", ref=ref)
    if wanted is None:
        return Difference(table, key, "extra", ref=ref)
    columns = {
        name: (stored[name], value) for name, value in wanted.items() if stored[name] != value
    }
    return Difference(table, key, "differs", columns, ref) if columns else None


def describe_key(ref: Any) -> str:
    """A log seq or a merge request, as people read it."""
    if isinstance(ref, MRKey):
        return f"{ref.instance} project {ref.project_id} !{ref.mr_iid}"
    return f"seq={ref}"
