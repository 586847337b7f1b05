"""The read API: ``/api/ledger`` and ``/api/reports/...``, authenticated, documented in OpenAPI."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import Engine

from secledger.dashboard import queries, trail
from secledger.dashboard.access import Dashboard, api_reader, build_filters, dashboard, engine
from secledger.dashboard.auth import Principal
from secledger.extract import MRKey
from secledger.service import ledger_json
from secledger.times import utcnow

router = APIRouter(prefix="/api", tags=["read"], dependencies=[Depends(api_reader)])
MAX_LIMIT = 500


class LedgerRow(BaseModel):
    """One security merge request as the ledger holds it."""

    instance: str
    project_id: int
    mr_iid: int
    mr_id: int | None
    project_path: str | None
    title: str | None
    url: str | None
    author_id: int | None
    risk_tier: str
    security_labels: list[str]
    state: str | None
    decision: str | None
    decided_by: str | None
    decided_at: datetime | None
    reviewer: str | None
    approvers: list[str]
    assigned_reviewers: list[str]
    labeled_at: datetime | None
    labeled_at_source: str | None
    labeled_by: str | None
    time_to_decision_seconds: float | None
    merged_by: str | None
    merged_at: datetime | None
    closed_by: str | None
    closed_at: datetime | None
    last_event_at: datetime
    last_seq: int
    event_count: int
    updated_at: datetime


class LedgerList(BaseModel):
    """A page of ledger rows; ``next_offset`` is null on the last page."""

    items: list[LedgerRow]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class MRTrail(BaseModel):
    """One merge request: its ledger row, its events and the chain status of its log rows."""

    row: LedgerRow
    timeline: list[trail.TimelineEvent]
    chain: list[trail.ChainCheck]


def filters(
    since: Annotated[date | None, Query(description="first day (UTC) a review started")] = None,
    until: Annotated[date | None, Query(description="last day (UTC), inclusive")] = None,
    project: Annotated[str | None, Query(description="project path, e.g. acme/payments")] = None,
    tier: str | None = None,
    reviewer: Annotated[str | None, Query(description="approver or assigned reviewer")] = None,
) -> queries.Filters:
    """The filters every read route accepts."""
    return build_filters(since, until, project, tier, reviewer)


Filtered = Annotated[queries.Filters, Depends(filters)]
DB = Annotated[Engine, Depends(engine)]
State = Annotated[Dashboard, Depends(dashboard)]


@router.get("/ledger", summary="Ledger rows, newest event first", response_model=LedgerList)
def list_ledger(
    db: DB,
    where: Filtered,
    state: Annotated[str | None, Query(description="opened, merged or closed")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Offset pagination; ``total`` counts every row matching the filters."""
    with db.connect() as conn:
        page = queries.ledger_page(conn, where, limit=limit, offset=offset, state=state)
    following = offset + limit
    return {
        "items": [ledger_json(row) for row in page.rows],
        "total": page.total,
        "limit": limit,
        "offset": offset,
        "next_offset": following if following < page.total else None,
    }


@router.get(
    "/ledger/{instance:path}/{project_id}/{mr_iid}",
    summary="One merge request with its timeline",
    response_model=MRTrail,
    responses={404: {"description": "not in the ledger"}},
)
def get_mr(instance: str, project_id: int, mr_iid: int, db: DB) -> dict[str, Any]:
    """``instance`` is the GitLab URL percent-encoded as one segment (``https%3A%2F%2Fhost``)."""
    key = MRKey(trail.instance_from_path(instance), project_id, mr_iid)
    with db.connect() as conn:
        row = trail.row(conn, key)
        if row is None:
            raise HTTPException(404, "this merge request is not in the ledger")
        events = trail.timeline(conn, key)
        chain = trail.chain_status(conn, [e.seq for e in events])
    return {"row": ledger_json(row), "timeline": events, "chain": chain}


@router.get("/reports/summary", summary="Counts by state and median time to decision")
def report_summary(db: DB, where: Filtered) -> queries.Summary:
    """Headline numbers."""
    with db.connect() as conn:
        return queries.summary(conn, where)


@router.get("/reports/volume", summary="Security MRs per period, by tier")
def report_volume(
    db: DB, where: Filtered, bucket: queries.Bucket = "week"
) -> list[queries.VolumePoint]:
    """Counted by the day, week or month in which review started."""
    with db.connect() as conn:
        return queries.volume(conn, where, bucket)


@router.get("/reports/time-to-decision", summary="Time-to-decision quantiles per tier")
def report_time_to_decision(
    db: DB, where: Filtered, state: State
) -> list[queries.TierDistribution]:
    """Seconds from security label to decision; ``sla_seconds`` once a policy is configured."""
    with db.connect() as conn:
        return queries.time_to_decision(conn, where, state.hooks)


@router.get("/reports/reviewers", summary="Figures per reviewer")
def report_reviewers(db: DB, where: Filtered, state: State) -> list[queries.ReviewerFigures]:
    """Approvals, revocations, MRs reviewed and median time per reviewer."""
    with db.connect() as conn:
        return queries.reviewers(conn, where, state.hooks)


@router.get("/reports/open", summary="Open security MRs, most urgent first")
def report_open(db: DB, where: Filtered, state: State) -> list[queries.OpenMR]:
    """Least SLA time left first when a policy is configured, else oldest first."""
    with db.connect() as conn:
        return queries.open_mrs(conn, where, utcnow(), state.hooks)


@router.get("/reports/findings", summary="Compliance findings")
def report_findings(db: DB, where: Filtered, state: State) -> queries.FindingsPanel:
    """``available`` is false until the compliance reports are plugged in."""
    with db.connect() as conn:
        return queries.findings(conn, where, state.hooks)


@router.get("/whoami", summary="The authenticated principal")
def whoami(principal: Annotated[Principal, Depends(api_reader)]) -> dict[str, str]:
    """Who the API thinks you are and how you proved it."""
    return {"name": principal.name, "method": principal.method}
