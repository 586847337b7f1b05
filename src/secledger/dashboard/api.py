"""The read API: ``/api/ledger``, ``/api/reports/...``, ``/api/findings``, authenticated.

The compliance reports are ``secledger.reports.run``, the function `secledger report`
calls, with the CLI's filter semantics; ``summary`` and ``volume`` are the dashboard's own.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, BeforeValidator
from sqlalchemy import Connection, Engine

from secledger import filtermatch, findings, reports
from secledger.dashboard import queries, trail
from secledger.dashboard.access import (
    Dashboard,
    StoredId,
    api_reader,
    build_filters,
    dashboard,
    engine,
    storable,
)
from secledger.dashboard.auth import Principal
from secledger.extract import MRKey
from secledger.intake import MAX_ID
from secledger.rules import RULES
from secledger.service import ledger_json
from secledger.store.db import reading
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
    """One merge request: ledger row, events, chain status of its log rows, findings."""

    row: LedgerRow
    timeline: list[trail.TimelineEvent]
    chain: list[trail.ChainCheck]
    findings: list[findings.Finding]


# An empty field (a form's, or a client's query built from one) means no filter, on
# every route: the report routes read it so, the others answered 422.
BLANK = BeforeValidator(lambda value: None if value == "" else value)
BLANK_FALSE = BeforeValidator(lambda value: False if value == "" else value)
BLANK_WEEK = BeforeValidator(lambda value: "week" if value == "" else value)


def filters(  # noqa: PLR0917 - one query parameter each
    state: State,
    since: Annotated[
        date | None, BLANK, Query(description="first day (UTC) a review started")
    ] = None,
    until: Annotated[date | None, BLANK, Query(description="last day (UTC), inclusive")] = None,
    project: Annotated[
        str | None, Query(description="project id, path (acme/payments) or URL")
    ] = None,
    tier: str | None = None,
    reviewer: Annotated[
        str | None,
        Query(description="approver, assigned reviewer, or the row's reviewer column"),
    ] = None,
) -> queries.Filters:
    """The filters every read route accepts."""
    if since is not None and until is not None and since > until:
        raise HTTPException(422, "since must not be after until (both days are included)")
    return build_filters(since, until, _project(project), state.tier(tier), reviewer)


def _one_project(conn: Connection, project: str | None) -> None:
    """422, as `secledger report` and `findings` refuse it, for a project filter naming a
    project the ledger holds no MR of, one on several GitLab instances, or a URL of an
    instance the ledger holds nothing of."""
    if project:
        try:
            filtermatch.check_project(conn, project)
        except filtermatch.BadProject as exc:
            raise HTTPException(422, str(exc)) from exc


def _project(project: str | None) -> str | None:
    """The project filter, refused (422) when it is a URL that names no project."""
    if project:
        try:
            filtermatch.project_params(project)
        except filtermatch.BadProject as exc:
            raise HTTPException(422, str(exc)) from exc
    return project


Filtered = Annotated[queries.Filters, Depends(filters)]
DB = Annotated[Engine, Depends(engine)]
State = Annotated[Dashboard, Depends(dashboard)]


@router.get("/ledger", summary="Ledger rows, newest event first", response_model=LedgerList)
def list_ledger(
    db: DB,
    where: Filtered,
    state: Annotated[
        Literal["opened", "merged", "closed"] | None,
        BLANK,
        Query(description="opened (not merged or closed, as the summary counts), merged or closed"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> dict[str, Any]:
    """Offset pagination; ``total`` counts every row matching the filters."""
    with reading(db) as conn:
        _one_project(conn, where.project)
        page = queries.ledger_page(conn, where, limit=limit, offset=offset, state=storable(state))
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
def get_mr(
    instance: str, project_id: StoredId, mr_iid: StoredId, db: DB, state: State
) -> dict[str, Any]:
    """``instance`` is the GitLab URL percent-encoded as one segment (``https%3A%2F%2Fhost``)."""
    key = MRKey(trail.instance_from_path(instance), project_id, mr_iid)
    now = utcnow()
    with reading(db) as conn:
        row = trail.row(conn, key)
        if row is None:
            raise HTTPException(404, "this merge request is not in the ledger")
        events = trail.timeline(conn, key)
        chain = trail.chain_status(conn, [e.seq for e in events])
        found = findings.list_findings(conn, state.policy, now, mr=key, include_resolved=True)
    return {"row": ledger_json(row), "timeline": events, "chain": chain, "findings": found}


@router.get("/reports/summary", summary="Counts by state and median time to decision")
def report_summary(db: DB, where: Filtered) -> queries.Summary:
    """Headline numbers."""
    with reading(db) as conn:
        _one_project(conn, where.project)
        return queries.summary(conn, where)


@router.get("/reports/volume", summary="Security MRs per period, by tier")
def report_volume(
    db: DB, where: Filtered, bucket: Annotated[queries.Bucket, BLANK_WEEK] = "week"
) -> list[queries.VolumePoint]:
    """Counted by the day, week or month in which review started."""
    with reading(db) as conn:
        _one_project(conn, where.project)
        return queries.volume(conn, where, bucket)


Bound = Annotated[
    str | None,
    Query(description="YYYY-MM-DD (midnight UTC) or a timestamp, as `secledger report` takes"),
]


def report_filters(  # noqa: PLR0917 - one query parameter each
    state: State,
    since: Bound = None,
    until: Annotated[str | None, Query(description="exclusive; same spellings as since")] = None,
    project: Annotated[str | None, Query(description="project id, path or URL")] = None,
    tier: str | None = None,
    reviewer: Annotated[str | None, Query(description="GitLab username")] = None,
    period: Annotated[Literal["week", "month"], BLANK_WEEK] = "week",
) -> reports.Filters:
    """The filters of `secledger report` (each report's time column: docs/policy.md)."""
    try:
        start = reports.parse_bound(since) if since else None
        end = reports.parse_bound(until) if until else None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    if start is not None and end is not None and start >= end:
        # As `secledger report` refuses it: an empty answer would look like no activity.
        raise HTTPException(422, "since must be before until")
    return reports.Filters(
        start,
        end,
        storable(_project(project)),
        state.tier(tier),
        storable(reviewer),
        period,
        policy=state.policy,
    )


ReportFiltered = Annotated[reports.Filters, Depends(report_filters)]


def _report_route(kind: str) -> Callable[..., list[dict[str, Any]]]:
    def route(db: DB, where: ReportFiltered) -> list[dict[str, Any]]:
        with reading(db) as conn:
            _one_project(conn, where.project)
            rows = reports.run(conn, kind, where)
        return [row.as_dict() for row in rows]

    route.__name__ = f"report_{kind.replace('-', '_')}"
    route.__doc__ = f"`secledger report {kind} --format json`, as JSON."
    return route


for _kind, (_query, _row) in reports.REPORTS.items():
    router.add_api_route(
        f"/reports/{_kind}",
        _report_route(_kind),
        methods=["GET"],
        response_model=list[_row],  # type: ignore[valid-type]
        summary=(_query.__doc__ or _kind).splitlines()[0],
    )


@router.get("/findings", summary="Findings (separation of duties, SLA), newest first")
def get_findings(
    db: DB,
    where: ReportFiltered,
    rule: Annotated[str | None, Query(description=", ".join(sorted(RULES)))] = None,
    include_resolved: Annotated[bool, BLANK_FALSE, Query(alias="all")] = False,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[findings.Finding]:
    """`secledger findings --format json`: open MRs past their deadline count as breached,
    recorded or not (``id`` null until serve records it); times = detection."""
    rule = rule or None  # an empty value filters nothing
    if rule is not None and rule not in RULES:
        # As the CLI's --rule choice does; PostgreSQL would refuse a NUL with a 500.
        raise HTTPException(422, f"rule must be one of {', '.join(sorted(RULES))}")
    with reading(db) as conn:
        _one_project(conn, where.project)
        return findings.list_findings(
            conn,
            where.policy,
            where.now,
            include_resolved=include_resolved,
            since=where.since,
            until=where.until,
            project=where.project,
            tier=where.tier,
            rule=rule,
            reviewer=where.reviewer,
            limit=limit,
        )


@router.get("/whoami", summary="The authenticated principal")
def whoami(principal: Annotated[Principal, Depends(api_reader)]) -> dict[str, str]:
    """Who the API thinks you are and how you proved it."""
    return {"name": principal.name, "method": principal.method}
