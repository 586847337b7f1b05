"""Backfill cursor: the merge request's ``updated_at`` as listed when it was recorded.

A resumed backfill skipped every MR its interrupted run had recorded, so one approved,
merged or relabelled since was not read again by that run. ``mr_updated_at`` keeps the
MR's ``updated_at`` as GitLab listed it when the run planned it; on resume an MR counts
as done only while GitLab lists the same or an older ``updated_at``.

Rows written before this revision have no time (NULL): a resumed run reads those MRs
again (every fact is keyed by its GitLab id, so this records only what is new). The
application role keeps its privileges: it replaces a row by DELETE and INSERT, which it
already may, rather than being granted UPDATE.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE backfill_cursor ADD COLUMN mr_updated_at timestamptz;
COMMENT ON COLUMN backfill_cursor.mr_updated_at IS
  'The MR''s updated_at as listed when recorded; a resumed run reads it again if GitLab'
  ' lists a newer one, or if this is NULL (rows from before migration 0015).';
"""

DOWNGRADE = """
ALTER TABLE backfill_cursor DROP COLUMN mr_updated_at;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
