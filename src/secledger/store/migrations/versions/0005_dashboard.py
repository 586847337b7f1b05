"""Indexes for the dashboard's filters and panels.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Each index serves one dashboard filter or panel (docs/dashboard.md; the project
# filter uses security_review_ledger_project from 0004); the open-MR
# index also serves the secledger_open_security_mrs gauge at every scrape.
UPGRADE = """
CREATE INDEX security_review_ledger_started
    ON security_review_ledger ((coalesce(labeled_at, last_event_at)));
CREATE INDEX security_review_ledger_open
    ON security_review_ledger (risk_tier, labeled_at) WHERE state = 'opened';
CREATE INDEX security_review_ledger_approvers ON security_review_ledger USING gin (approvers);
CREATE INDEX security_review_ledger_assigned
    ON security_review_ledger USING gin (assigned_reviewers);
CREATE INDEX security_review_ledger_reviewer ON security_review_ledger (reviewer);
CREATE INDEX review_events_revocations
    ON review_events (instance, project_id, mr_iid, actor) WHERE decision = 'unapproved';
"""

DOWNGRADE = """
DROP INDEX review_events_revocations;
DROP INDEX security_review_ledger_reviewer;
DROP INDEX security_review_ledger_assigned;
DROP INDEX security_review_ledger_approvers;
DROP INDEX security_review_ledger_open;
DROP INDEX security_review_ledger_started;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
