"""``bi_sla_status``: an MR merged or closed before its security label is not overdue.

The SLA clock runs from the label to the first review decision while the MR can still
be reviewed. A merged or closed MR with no decision after its label was merged or closed
before the label: nothing is left to wait for, so its clock never runs. Its
``sla_status`` is now ``labeled_after_merge`` or ``labeled_after_close`` (it was
``overdue`` once past the deadline) and its ``hours_left`` is NULL, as the reports
(``reports.SLA_STATUS``, which a test keeps equal to ``SLA_STATUS`` here), the rules
(``rules.SlaClock.status``) and the overdue check judge it. An MR reopened after the
label is open again, its clock running from the label.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_VIEW = """
CREATE OR REPLACE VIEW bi_sla_status AS
SELECT l.instance, l.project_id, l.mr_iid, l.project_path, l.url, l.title, l.risk_tier,
       l.state, s.sla_hours, s.business_hours, s.required_approvals, s.labeled_at, s.deadline,
       s.first_decision_at, s.first_decision, s.first_decision_by,
       extract(epoch FROM s.first_decision_at - s.labeled_at) / 3600.0 AS hours_to_decision,
       CASE WHEN {running}
            THEN extract(epoch FROM s.deadline - now()) / 3600.0 END AS hours_left,
       {status} AS sla_status
FROM security_review_ledger l
LEFT JOIN review_sla s USING (instance, project_id, mr_iid);
"""

SLA_STATUS = """CASE WHEN s.deadline IS NULL THEN 'no_clock'
            WHEN s.first_decision_at IS NOT NULL AND s.first_decision_at <= s.deadline THEN 'met'
            WHEN s.first_decision_at IS NOT NULL THEN 'breached'
            WHEN l.state = 'merged' THEN 'labeled_after_merge'
            WHEN l.state = 'closed' THEN 'labeled_after_close'
            WHEN now() > s.deadline THEN 'overdue'
            ELSE 'running' END"""
RUNNING = "s.first_decision_at IS NULL AND coalesce(l.state, 'opened') NOT IN ('merged', 'closed')"

# What 0004 wrote.
_STATUS_0004 = """CASE WHEN s.deadline IS NULL THEN 'no_clock'
            WHEN s.first_decision_at IS NOT NULL AND s.first_decision_at <= s.deadline THEN 'met'
            WHEN s.first_decision_at IS NOT NULL THEN 'breached'
            WHEN now() > s.deadline THEN 'overdue'
            ELSE 'running' END"""

UPGRADE = _VIEW.format(running=RUNNING, status=SLA_STATUS)
DOWNGRADE = _VIEW.format(running="s.first_decision_at IS NULL", status=_STATUS_0004)


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
