"""``bi_reviewer_metrics``' times and SLA share count decisions at or after the label.

Its median, p90 and ``sla_adherence_pct`` read every approval, merge and close, one made
before the security label was applied too: an approval recorded by the early-approvals
check (migration 0019) counted as a negative time and as on time, and a merge before the
label (which the SLA clock calls ``labeled_after_merge``, with no verdict) as met. The
reviewers report, docs/policy.md and the SLA clock count such decisions in neither met
nor missed; the view now does the same. ``decisions``, ``approvals`` and ``revocations``
still count every one. The view is written as 0020 wrote it but for that condition.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-02
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None

_0020 = importlib.import_module("secledger.store.migrations.versions.0020_same_user_by_id")
_0018 = importlib.import_module("secledger.store.migrations.versions.0018_reviewer_metrics_groups")

_STOPPERS = "('approved', 'merged', 'closed')"
_TIMED = f"c.decision IN {_STOPPERS} AND c.event_at >= s.labeled_at"
_HOURS = "extract(epoch FROM c.event_at - s.labeled_at) / 3600.0"


def metrics(groups: str) -> str:
    """The view over the counted groups ``groups`` (also migration 0027's)."""
    return f"""
CREATE OR REPLACE VIEW bi_reviewer_metrics AS
SELECT c.actor AS reviewer,
       count(*) FILTER (WHERE c.decision IN {_STOPPERS}) AS decisions,
       count(*) FILTER (WHERE c.decision = 'approved') AS approvals,
       count(*) FILTER (WHERE c.decision = 'unapproved') AS revocations,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY {_HOURS})
           FILTER (WHERE {_TIMED}) AS median_hours,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY {_HOURS})
           FILTER (WHERE {_TIMED}) AS p90_hours,
       round(100.0 * avg((c.event_at <= s.deadline)::int)
           FILTER (WHERE {_TIMED}), 1)::float
           AS sla_adherence_pct
FROM ({groups}) c
JOIN security_review_ledger l USING (instance, project_id, mr_iid)
LEFT JOIN review_sla s USING (instance, project_id, mr_iid)
GROUP BY c.actor;
"""


UPGRADE = metrics(_0020.GROUPS)

DOWNGRADE = _0018.metrics(_0020.GROUPS)


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
