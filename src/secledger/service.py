"""The one recording path: every way in (HTTP, replay, backfill, spool) ends here.

``record`` runs inside a transaction the caller owns and holds the chain lock for
(:class:`~secledger.store.log.Chain`); it never commits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, RowMapping

from secledger import findings
from secledger.extract import EventFacts, extract_facts
from secledger.intake import Delivery, Ignored, parse_delivery
from secledger.policy import LabelPolicy
from secledger.store import ledger
from secledger.store.log import Chain, seq_of
from secledger.tierpolicy import CompliancePolicy
from secledger.times import isoformat, utcnow

NOT_SECURITY = "merge request carries no security label"
# Used when a caller does not pass the configured policy (tests, tools): the documented defaults.
DEFAULT_COMPLIANCE = CompliancePolicy()


@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery, as answered to its sender."""

    status: str
    reason: str | None = None
    seq: int | None = None
    row: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        """The response body."""
        body: dict[str, Any] = {"status": self.status}
        if self.reason is not None:
            body["reason"] = self.reason
        if self.seq is not None:
            body["seq"] = self.seq
        if self.row is not None:
            body["ledger"] = self.row
        return body


def ledger_json(row: Mapping[str, Any] | RowMapping) -> dict[str, Any]:
    """A ledger row as emitted downstream: times in ISO 8601 UTC, arrays as lists."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        out[str(name)] = isoformat(value) if isinstance(value, datetime) else value
    return out


def record(
    conn: Connection,
    chain: Chain,
    delivery: Delivery,
    facts: EventFacts,
    *,
    compliance: CompliancePolicy | None = None,
) -> Outcome:
    """Log one delivery, update its merge request's ledger row, SLA clock and findings."""
    if not facts.is_security and not ledger.is_known(conn, facts.key):
        return Outcome("ignored", reason=NOT_SECURITY)
    seq = chain.append(conn, delivery)
    if seq is None:
        existing = ledger.get(conn, facts.key)
        return Outcome(
            "duplicate",
            reason="this delivery was already recorded",
            seq=seq_of(conn, delivery.dedup_key),
            row=ledger_json(existing) if existing else None,
        )
    ledger.add_event(conn, seq, facts)
    row = ledger.project(conn, facts.key)
    if row is not None:
        policy = compliance or DEFAULT_COMPLIANCE
        findings.evaluate_mr(conn, row, policy, utcnow(), as_of=row["last_event_at"])
    message = {"instance": facts.instance, "project_id": facts.project_id}
    message |= {"mr_iid": facts.mr_iid, "seq": seq}
    ledger.notify(conn, orjson.dumps(message).decode())
    return Outcome("recorded", seq=seq, row=ledger_json(row) if row else None)


def record_one(
    engine: Engine,
    delivery: Delivery,
    facts: EventFacts,
    *,
    compliance: CompliancePolicy | None = None,
) -> Outcome:
    """Record one delivery in its own transaction, committed on return."""
    with engine.begin() as conn:
        chain = Chain.open(conn)
        return record(conn, chain, delivery, facts, compliance=compliance)


def feed(
    engine: Engine,
    policy: LabelPolicy,
    headers: Mapping[str, str],
    body: bytes,
    *,
    max_body_bytes: int,
    source: str,
    compliance: CompliancePolicy | None = None,
) -> Outcome:
    """Intake, extract and record one recorded request, as the endpoint would (no token)."""
    delivery = parse_delivery(
        headers,
        body,
        secrets=(),
        max_body_bytes=max_body_bytes,
        received_at=utcnow(),
        require_token=False,
        source=source,
    )
    if isinstance(delivery, Ignored):
        return Outcome("ignored", reason=delivery.reason)
    facts = extract_facts(delivery, policy)
    return record_one(engine, delivery, facts, compliance=compliance)
