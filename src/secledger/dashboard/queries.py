"""What the dashboard and the read API show, read from the core ledger in SQL.

Every panel is one function taking a connection and :class:`Filters`. Figures that
need the compliance policy (SLA per tier, SLA adherence per reviewer, findings) come
from :class:`ComplianceHooks`, which the compliance reports plug in; without them the
panels show what the core ledger alone can tell.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

from sqlalchemy import Connection, RowMapping, text

from secledger.extract import MRKey

Bucket = Literal["day", "week", "month"]
BUCKETS: tuple[Bucket, ...] = ("day", "week", "month")

# When a review started: the first security label, or the first event we saw.
STARTED = "coalesce(l.labeled_at, l.last_event_at)"
NO_COMPLIANCE = "needs the compliance reports (SLA policy and findings), not configured yet"


@dataclass(frozen=True)
class Filters:
    """The dashboard's filters; ``None`` means no restriction."""

    since: datetime | None = None
    until: datetime | None = None
    project: str | None = None
    tier: str | None = None
    reviewer: str | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        """A WHERE clause over ``security_review_ledger l`` and its bound values."""
        clauses = ["TRUE"]
        params: dict[str, Any] = {}
        if self.since is not None:
            clauses.append(f"{STARTED} >= :since")
            params["since"] = self.since
        if self.until is not None:
            clauses.append(f"{STARTED} < :until")
            params["until"] = self.until
        if self.project:
            clauses.append("l.project_path = :project")
            params["project"] = self.project
        if self.tier:
            clauses.append("l.risk_tier = :tier")
            params["tier"] = self.tier
        if self.reviewer:
            # @> rather than = ANY so the GIN indexes on the arrays can serve it.
            clauses.append(
                "(l.approvers @> ARRAY[CAST(:reviewer AS text)] OR l.reviewer = :reviewer"
                " OR l.assigned_reviewers @> ARRAY[CAST(:reviewer AS text)])"
            )
            params["reviewer"] = self.reviewer
        return " AND ".join(clauses), params


@dataclass(frozen=True)
class Finding:
    """One compliance finding about a merge request (produced by the compliance reports)."""

    instance: str
    project_id: int
    mr_iid: int
    rule: str
    severity: str
    message: str


FindingsProvider = Callable[[Connection, Filters], Sequence[Finding]]
MRFindingsProvider = Callable[[Connection, MRKey], Sequence[Finding]]
ReviewerAdherence = Callable[[Connection, Filters], Mapping[str, float]]


@dataclass(frozen=True)
class ComplianceHooks:
    """Compliance figures the dashboard shows once the compliance reports provide them."""

    sla_seconds: Mapping[str, float] | None = None
    findings: FindingsProvider | None = None
    mr_findings: MRFindingsProvider | None = None
    reviewer_adherence: ReviewerAdherence | None = None


@dataclass(frozen=True)
class VolumePoint:
    """Security MRs whose review started in one bucket, for one tier."""

    bucket: date
    tier: str
    count: int


@dataclass(frozen=True)
class TierDistribution:
    """Time-to-decision quantiles (seconds) for one tier; ``sla_seconds`` from the policy."""

    tier: str
    count: int
    min: float
    q1: float
    median: float
    q3: float
    p90: float
    max: float
    sla_seconds: float | None = None


@dataclass(frozen=True)
class ReviewerFigures:
    """What one reviewer did within the filters."""

    reviewer: str
    approvals: int
    revocations: int
    reviewed: int
    median_seconds: float | None
    sla_adherence: float | None = None


@dataclass(frozen=True)
class OpenMR:
    """A security MR still open, with its age and (with a policy) SLA time left."""

    instance: str
    project_id: int
    mr_iid: int
    project_path: str | None
    title: str | None
    url: str | None
    risk_tier: str
    labeled_at: datetime | None
    age_seconds: float
    approvers: list[str]
    assigned_reviewers: list[str]
    sla_seconds_left: float | None = None


@dataclass(frozen=True)
class FindingsPanel:
    """Findings, or why there are none to show."""

    available: bool
    items: list[Finding] = field(default_factory=list)
    note: str | None = None


@dataclass(frozen=True)
class Summary:
    """Headline numbers for the filters."""

    total: int
    open: int
    merged: int
    closed: int
    median_seconds: float | None


def summary(conn: Connection, filters: Filters) -> Summary:
    """Counts by state and the median time to decision."""
    where, params = filters.where()
    row = conn.execute(
        text(
            "SELECT count(*) AS total,"
            " count(*) FILTER (WHERE l.state = 'opened') AS open,"
            " count(*) FILTER (WHERE l.state = 'merged') AS merged,"
            " count(*) FILTER (WHERE l.state = 'closed') AS closed,"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY l.time_to_decision_seconds)"
            "   AS median_seconds"
            f" FROM security_review_ledger l WHERE {where}"
        ),
        params,
    ).one()
    return Summary(**row._asdict())


def volume(conn: Connection, filters: Filters, bucket: Bucket = "week") -> list[VolumePoint]:
    """Security MRs per bucket of review start, by tier."""
    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {', '.join(BUCKETS)}")
    where, params = filters.where()
    rows = conn.execute(
        text(
            f"SELECT date_trunc('{bucket}', {STARTED} AT TIME ZONE 'UTC')::date AS bucket,"
            " l.risk_tier AS tier, count(*) AS count"
            f" FROM security_review_ledger l WHERE {where}"
            " GROUP BY 1, 2 ORDER BY 1, 2"
        ),
        params,
    )
    return [VolumePoint(**row._asdict()) for row in rows]


def time_to_decision(
    conn: Connection, filters: Filters, hooks: ComplianceHooks | None = None
) -> list[TierDistribution]:
    """Quantiles of time to decision per tier (computed in SQL: no raw values shipped)."""
    where, params = filters.where()
    rows = conn.execute(
        text(
            "SELECT l.risk_tier AS tier, count(*) AS n,"
            " min(l.time_to_decision_seconds) AS min,"
            " percentile_cont(ARRAY[0.25, 0.5, 0.75, 0.9]) WITHIN GROUP"
            "   (ORDER BY l.time_to_decision_seconds) AS q,"
            " max(l.time_to_decision_seconds) AS max"
            f" FROM security_review_ledger l WHERE {where}"
            " AND l.time_to_decision_seconds IS NOT NULL"
            " GROUP BY 1 ORDER BY 1"
        ),
        params,
    )
    sla = hooks.sla_seconds if hooks and hooks.sla_seconds else {}
    return [
        TierDistribution(
            tier=r.tier,
            count=r.n,
            min=r.min,
            q1=r.q[0],
            median=r.q[1],
            q3=r.q[2],
            p90=r.q[3],
            max=r.max,
            sla_seconds=sla.get(r.tier),
        )
        for r in rows
    ]


_REVIEWERS = """
WITH scope AS (
    SELECT l.instance, l.project_id, l.mr_iid, l.approvers, l.reviewer,
           l.time_to_decision_seconds
    FROM security_review_ledger l WHERE {where}),
approvals AS (
    SELECT a.name AS reviewer, count(*) AS approvals
    FROM scope, unnest(scope.approvers) AS a(name) GROUP BY 1),
revocations AS (
    SELECT e.actor AS reviewer, count(*) AS revocations
    FROM review_events e JOIN scope s USING (instance, project_id, mr_iid)
    WHERE e.decision = 'unapproved' AND e.actor IS NOT NULL GROUP BY 1),
reviewed AS (
    SELECT reviewer, count(*) AS reviewed,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY time_to_decision_seconds) AS median
    FROM scope WHERE reviewer IS NOT NULL GROUP BY 1),
names AS (
    SELECT reviewer FROM approvals UNION SELECT reviewer FROM revocations
    UNION SELECT reviewer FROM reviewed)
SELECT n.reviewer, coalesce(a.approvals, 0) AS approvals,
       coalesce(r.revocations, 0) AS revocations,
       coalesce(d.reviewed, 0) AS reviewed, d.median AS median_seconds
FROM names n
LEFT JOIN approvals a USING (reviewer)
LEFT JOIN revocations r USING (reviewer)
LEFT JOIN reviewed d USING (reviewer)
ORDER BY approvals DESC, reviewed DESC, n.reviewer
LIMIT :limit
"""


def reviewers(
    conn: Connection, filters: Filters, hooks: ComplianceHooks | None = None, limit: int = 50
) -> list[ReviewerFigures]:
    """Approvals held, approvals revoked, MRs reviewed and median time per reviewer."""
    where, params = filters.where()
    rows = conn.execute(text(_REVIEWERS.format(where=where)), {**params, "limit": limit})
    adherence: Mapping[str, float] = {}
    if hooks and hooks.reviewer_adherence:
        adherence = hooks.reviewer_adherence(conn, filters)
    return [ReviewerFigures(**r._asdict(), sla_adherence=adherence.get(r.reviewer)) for r in rows]


def open_mrs(
    conn: Connection,
    filters: Filters,
    now: datetime,
    hooks: ComplianceHooks | None = None,
    limit: int = 100,
) -> list[OpenMR]:
    """Open security MRs, least SLA time left first (oldest first without a policy)."""
    where, params = filters.where()
    sla = dict(hooks.sla_seconds) if hooks and hooks.sla_seconds else {}
    rows = conn.execute(
        text(
            "SELECT l.instance, l.project_id, l.mr_iid, l.project_path, l.title, l.url,"
            " l.risk_tier, l.labeled_at, l.approvers, l.assigned_reviewers,"
            f" extract(epoch FROM (:now - {STARTED}))::float8 AS age_seconds,"
            f" (CAST(:sla AS jsonb) ->> l.risk_tier)::float8"
            f"   - extract(epoch FROM (:now - {STARTED}))::float8 AS sla_seconds_left"
            f" FROM security_review_ledger l WHERE {where} AND l.state = 'opened'"
            f" ORDER BY sla_seconds_left NULLS LAST, {STARTED}, l.mr_iid LIMIT :limit"
        ),
        {**params, "now": now, "sla": json.dumps(sla), "limit": limit},
    )
    return [OpenMR(**row._asdict()) for row in rows]


def findings(
    conn: Connection, filters: Filters, hooks: ComplianceHooks | None = None
) -> FindingsPanel:
    """Compliance findings within the filters, once a provider is plugged in."""
    if hooks is None or hooks.findings is None:
        return FindingsPanel(available=False, note=f"Findings {NO_COMPLIANCE}.")
    return FindingsPanel(available=True, items=list(hooks.findings(conn, filters)))


def mr_findings(
    conn: Connection, key: MRKey, hooks: ComplianceHooks | None = None
) -> FindingsPanel:
    """Compliance findings about one merge request, once a provider is plugged in."""
    if hooks is None or hooks.mr_findings is None:
        return FindingsPanel(available=False, note=f"Findings {NO_COMPLIANCE}.")
    return FindingsPanel(available=True, items=list(hooks.mr_findings(conn, key)))


@dataclass(frozen=True)
class FilterOptions:
    """Values the filter drop-downs offer."""

    projects: list[str]
    tiers: list[str]
    reviewers: list[str]


def filter_options(conn: Connection) -> FilterOptions:
    """Distinct projects, tiers and reviewers present in the ledger."""
    projects = conn.execute(
        text(
            "SELECT DISTINCT project_path FROM security_review_ledger"
            " WHERE project_path IS NOT NULL ORDER BY 1"
        )
    ).scalars()
    tiers = conn.execute(text("SELECT DISTINCT risk_tier FROM security_review_ledger ORDER BY 1"))
    people = conn.execute(
        text(
            "SELECT DISTINCT name FROM security_review_ledger,"
            " unnest(approvers || assigned_reviewers) AS r(name) ORDER BY 1"
        )
    ).scalars()
    return FilterOptions(list(projects), list(tiers.scalars()), list(people))


@dataclass(frozen=True)
class LedgerPage:
    """One page of ledger rows and the total matching the filters."""

    total: int
    rows: list[RowMapping]


def ledger_page(
    conn: Connection,
    filters: Filters,
    *,
    limit: int,
    offset: int,
    state: str | None = None,
) -> LedgerPage:
    """Ledger rows, newest event first, ``limit`` from ``offset``."""
    where, params = filters.where()
    if state:
        where += " AND l.state = :state"
        params["state"] = state
    total = conn.execute(
        text(f"SELECT count(*) FROM security_review_ledger l WHERE {where}"), params
    ).scalar_one()
    rows = conn.execute(
        text(
            f"SELECT l.* FROM security_review_ledger l WHERE {where}"
            " ORDER BY l.last_event_at DESC, l.instance, l.project_id, l.mr_iid"
            " LIMIT :limit OFFSET :offset"
        ),
        {**params, "limit": limit, "offset": offset},
    ).mappings()
    return LedgerPage(total=total, rows=list(rows))
