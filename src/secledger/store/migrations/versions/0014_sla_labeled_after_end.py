"""``review_sla.ended_before_label``, and ``bi_sla_status`` reads it.

The SLA clock runs from the label to the first review decision while the MR can still
be reviewed. An MR already merged or closed when its security label was applied has
nothing left to wait for: its clock never runs. Which MRs those are is judged from the
events (``rules.sla_clock``: the state at the label event, and no later event showing
the MR open) and stored with the clock, because the ledger's state now cannot tell an
MR merged before its label from one labelled while open whose merge was never recorded
(still an unreviewed change past due). ``bi_sla_status`` says ``labeled_after_merge``
or ``labeled_after_close`` for them (it said ``overdue`` once past the deadline) and
leaves ``hours_left`` NULL, as the reports (``reports.SLA_STATUS``, which a test keeps
equal to ``SLA_STATUS`` here), the rules (``rules.SlaClock.status``) and the overdue
check judge it.

Clocks stored before this revision get, until their MR's next event or ``secledger
findings --reevaluate`` judges them from their events, what the periodic check assumed
until now: an undecided clock of an MR merged or closed now never ran. So the upgrade
records no breach the check did not record before.

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
            WHEN s.ended_before_label = 'merged' THEN 'labeled_after_merge'
            WHEN s.ended_before_label = 'closed' THEN 'labeled_after_close'
            WHEN now() > s.deadline THEN 'overdue'
            ELSE 'running' END"""
RUNNING = "s.first_decision_at IS NULL AND s.ended_before_label IS NULL"
_COLUMN = """
ALTER TABLE review_sla ADD COLUMN ended_before_label text
    CHECK (ended_before_label IN ('merged', 'closed'));
COMMENT ON COLUMN review_sla.ended_before_label IS
    'merged or closed: the MR already was when labelled, so its clock never ran';
UPDATE review_sla s SET ended_before_label = l.state
FROM security_review_ledger l
WHERE l.instance = s.instance AND l.project_id = s.project_id AND l.mr_iid = s.mr_iid
  AND s.first_decision_at IS NULL AND l.state IN ('merged', 'closed');
"""

# What 0004 wrote.
_STATUS_0004 = """CASE WHEN s.deadline IS NULL THEN 'no_clock'
            WHEN s.first_decision_at IS NOT NULL AND s.first_decision_at <= s.deadline THEN 'met'
            WHEN s.first_decision_at IS NOT NULL THEN 'breached'
            WHEN now() > s.deadline THEN 'overdue'
            ELSE 'running' END"""

UPGRADE = _COLUMN + _VIEW.format(running=RUNNING, status=SLA_STATUS)
DOWNGRADE = _VIEW.format(running="s.first_decision_at IS NULL", status=_STATUS_0004) + (
    "ALTER TABLE review_sla DROP COLUMN ended_before_label;"
)


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
