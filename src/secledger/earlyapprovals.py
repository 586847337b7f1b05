"""Approvals given before the security label: read from the API once an MR is known.

While an MR carries no security label its deliveries are answered ``ignored``, its
approvals too; GitLab still counts such an approval when the MR is merged. For every
ledger row whose label was added after the MR was created (``label_added``, or found
by label-time enrichment: ``api``), the MR's approvals are read once, and those
GitLab dates before the label are recorded as API facts, through the path backfill
uses. An approval after the label was delivered by a webhook, and the API has no time
for an approval on GitLab versions before ``approved_at``: neither is recorded here.
Runs from ``secledger enrich`` and in the background of ``serve``, as label-time
enrichment does, never on the request path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, text

from secledger import apifacts
from secledger.backfill import record_envelopes
from secledger.errors import GitLabAPIError
from secledger.extract import MRKey
from secledger.gitlab_api import GitLabAPI, about_existing_mr
from secledger.policy import LabelPolicy
from secledger.service import DEFAULT_RECORDING, Recording
from secledger.times import parse_optional

# Said when a pass stops at a failure every request would meet (``GitLabAPIError.systemic``).
STOPPED_HINT = "the other merge requests are asked on the next pass"
log = structlog.get_logger("secledger.earlyapprovals")

API_ERROR = "api_error"  # as label-time enrichment notes it: asked again on later passes
GONE = "gone"  # as label-time enrichment counts a 404 apart from api_error
FAILED = "failed"  # anything else went wrong with this MR: not asked again unless --recheck
_SECOND = timedelta(seconds=1)

# Label times a webhook or the API told, after the MR's creation: it existed unlabelled
# before them (``opened_with_label`` MRs never did; on ``created_at_fallback`` the label
# time is not known yet).
_CANDIDATES = text(
    "SELECT l.project_id, l.mr_iid, l.labeled_at FROM security_review_ledger l"
    " LEFT JOIN approval_checks c"
    "  ON c.instance = l.instance AND c.project_id = l.project_id AND c.mr_iid = l.mr_iid"
    " WHERE l.instance = :instance AND l.labeled_at_source IN ('label_added', 'api')"
    " AND (:recheck OR c.outcome IS NULL OR c.outcome = :api_error)"
    " ORDER BY c.checked_at NULLS FIRST, l.last_event_at LIMIT :limit"
)
_CHECKED = text(
    "INSERT INTO approval_checks (instance, project_id, mr_iid, outcome)"
    " VALUES (:instance, :project_id, :mr_iid, :outcome)"
    " ON CONFLICT (instance, project_id, mr_iid)"
    " DO UPDATE SET outcome = excluded.outcome, checked_at = now()"
)


def candidates(
    engine: Engine, instance: str, *, limit: int, recheck: bool
) -> list[tuple[MRKey, datetime]]:
    """MRs of ``instance`` labelled after creation whose approvals were not read yet (or
    were refused), with their label time."""
    params = {"instance": instance, "recheck": recheck, "limit": limit, "api_error": API_ERROR}
    with engine.connect() as conn:
        rows = conn.execute(_CANDIDATES, params)
        return [(MRKey(instance, pid, iid), labeled_at) for pid, iid, labeled_at in rows]


def check_one(
    engine: Engine,
    api: GitLabAPI,
    policy: LabelPolicy,
    key: MRKey,
    labeled_at: datetime,
    *,
    recording: Recording = DEFAULT_RECORDING,
) -> str:
    """Record the approvals of one MR that GitLab dates before ``labeled_at``; the outcome."""
    mr = api.merge_request(key.project_id, key.mr_iid)
    with about_existing_mr():
        approvals = api.approvals(key.project_id, key.mr_iid)
    envelopes = [
        env for env in apifacts.approval_envelopes(mr, approvals) if _before(env, labeled_at)
    ]
    with engine.begin() as conn:
        recorded = (
            record_envelopes(conn, api.instance, envelopes, policy, recording=recording)
            if envelopes
            else 0
        )
        outcome = "none_before_label" if not envelopes else "recorded" if recorded else "known"
        _note(conn, key, outcome)
    return outcome


def _before(env: Mapping[str, Any], labeled_at: datetime) -> bool:
    # A webhook's label time is a whole second: an approval within that second may have
    # come first. One that came after it was delivered by a webhook, and the fold counts
    # the two once (an API approval within ``MATCH_TOLERANCE`` of it is its copy).
    approved_at = parse_optional(env["event"].get("approved_at"))
    return approved_at is not None and approved_at < labeled_at + _SECOND


def _note(conn: Connection, key: MRKey, outcome: str) -> None:
    params = {"instance": key.instance, "project_id": key.project_id, "mr_iid": key.mr_iid}
    conn.execute(_CHECKED, params | {"outcome": outcome})


def check(
    engine: Engine,
    api: GitLabAPI,
    policy: LabelPolicy,
    *,
    limit: int = 500,
    recheck: bool = False,
    recording: Recording = DEFAULT_RECORDING,
) -> dict[str, int]:
    """Check every candidate, up to ``limit``; the count of each outcome. An API error on
    one MR does not stop the rest."""
    counts: Counter[str] = Counter()
    for key, labeled_at in candidates(engine, api.instance, limit=limit, recheck=recheck):
        stop = False
        try:
            outcome = check_one(engine, api, policy, key, labeled_at, recording=recording)
        except Exception as exc:  # noqa: BLE001 - one MR must not stop (or starve) the rest
            outcome = API_ERROR if isinstance(exc, GitLabAPIError) else FAILED
            log.warning(
                "early_approvals_failed",
                project_id=key.project_id,
                mr_iid=key.mr_iid,
                outcome=outcome,
                error=str(exc)[:300] if outcome == API_ERROR else type(exc).__name__,
            )
            with engine.begin() as conn:
                _note(conn, key, outcome)
            if isinstance(exc, GitLabAPIError):
                if exc.gone:
                    outcome = GONE  # noted as api_error, counted apart
                stop = exc.systemic  # the others would wait out the same retries
        counts[outcome] += 1
        if stop:
            log.warning("early_approvals_stopped", hint=STOPPED_HINT)
            break
    return dict(counts)
