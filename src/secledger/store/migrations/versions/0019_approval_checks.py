"""Merge requests whose approvals given before their security label were asked of the API.

An approval given while an MR carried no security label was answered ``ignored``: the
MR was not a security MR yet. GitLab still counts it when the MR is merged, so the
ledger must too. ``serve`` (with a GitLab token) and ``secledger enrich`` read the
approvals of each MR labelled after it was created, once, and record those given
before the label (``earlyapprovals``). One row per MR looked up, with the outcome, so
it is not asked again; an MR the API refused is asked again later.

Revision ID: 0019
Revises: 0018
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE approval_checks (
    instance   text NOT NULL,
    project_id bigint NOT NULL,
    mr_iid     bigint NOT NULL,
    checked_at timestamptz NOT NULL DEFAULT now(),
    outcome    text NOT NULL CHECK (length(outcome) <= 64),
    PRIMARY KEY (instance, project_id, mr_iid)
);
COMMENT ON TABLE approval_checks IS
  'Merge requests whose approvals from before their security label were read from the API.';

-- Least privilege (roles from 0002), as enrichment_checks.
ALTER TABLE approval_checks OWNER TO secledger_owner;
REVOKE ALL ON approval_checks FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON approval_checks TO secledger_app;
GRANT SELECT ON approval_checks TO secledger_readonly;
"""

DOWNGRADE = """
DROP TABLE approval_checks;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
