"""The dashboard's reviewer filter matches a username whatever its case.

GitLab tells usernames apart without their case and sends each as its owner wrote it,
so ``secledger report --reviewer`` and ``findings --reviewer`` compare them lowered
(``filtermatch.py``). The dashboard's ledger, summary and volume filters compared them
as typed, through the indexes of 0005 on ``approvers``, ``assigned_reviewers`` and
``reviewer``. They now compare them lowered too, which those indexes cannot serve; kept,
they would only cost every ledger upsert their upkeep. Lowered-expression indexes
would serve the filter, but at about 6 us of PostgreSQL time per array on every
upsert, on the recording path; a scan of 100,000 ledger rows for one reviewer takes
about 0.2 s (PostgreSQL 15), and the dashboard's time range narrows it first.

Revision ID: 0022
Revises: 0021
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None

UPGRADE = """
DROP INDEX security_review_ledger_approvers;
DROP INDEX security_review_ledger_assigned;
DROP INDEX security_review_ledger_reviewer;
"""

DOWNGRADE = """
CREATE INDEX security_review_ledger_approvers ON security_review_ledger USING gin (approvers);
CREATE INDEX security_review_ledger_assigned
    ON security_review_ledger USING gin (assigned_reviewers);
CREATE INDEX security_review_ledger_reviewer ON security_review_ledger (reviewer);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
