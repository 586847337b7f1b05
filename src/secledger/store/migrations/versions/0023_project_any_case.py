"""Project filters match a path whatever its case, as GitLab finds a project.

``secledger report --project ACME/Payments`` found nothing for ``acme/payments``, in
silence, though GitLab resolves a path without its case. Every project filter now
compares lowered paths; the dashboard's is served by an index on the lowered path,
which replaces 0004's on the path as stored (no query compares that any more).

Revision ID: 0023
Revises: 0022
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE INDEX security_review_ledger_project_lower
    ON security_review_ledger (lower(project_path));
DROP INDEX security_review_ledger_project;
"""

DOWNGRADE = """
CREATE INDEX security_review_ledger_project ON security_review_ledger (project_path);
DROP INDEX security_review_ledger_project_lower;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
