"""The open-MR index on the reports' rule for an open MR.

0005 indexed the open MRs as ``state = 'opened'``. The dashboard's summary and the
``secledger_open_security_mrs`` gauge now count an MR open as the reports do (not
merged or closed: a locked MR, or one whose state is not known, is still to be
decided), which that index cannot serve: every scrape scanned the whole ledger, while
every ledger write still kept the old index up to date. This one is on the same rule.

Revision ID: 0025
Revises: 0024
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None

UPGRADE = """
DROP INDEX security_review_ledger_open;
CREATE INDEX security_review_ledger_open ON security_review_ledger (risk_tier, labeled_at)
    WHERE coalesce(state, 'opened') NOT IN ('merged', 'closed');
"""

DOWNGRADE = """
DROP INDEX security_review_ledger_open;
CREATE INDEX security_review_ledger_open
    ON security_review_ledger (risk_tier, labeled_at) WHERE state = 'opened';
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
