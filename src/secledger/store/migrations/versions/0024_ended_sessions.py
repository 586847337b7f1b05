"""Dashboard sessions ended by logging out, shared by every replica.

A session cookie is signed, not stored, so logging out only deleted it from the
browser: a copy of it (a shared machine, a proxy log, a stolen backup) stayed valid
until it expired. ``serve`` now records the random id each session cookie carries
when its user logs out, and refuses that id on every replica. A row is kept only
until the cookie would have expired anyway; ``serve`` deletes older ones when it
inserts, so the table stays as small as the number of recent logouts.

Revision ID: 0024
Revises: 0023
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE ended_sessions (
    session_id text PRIMARY KEY CHECK (length(session_id) <= 64),
    expires_at timestamptz NOT NULL
);
COMMENT ON TABLE ended_sessions IS
  'Dashboard sessions ended by logging out, until their cookies would have expired.';
CREATE INDEX ended_sessions_expiry ON ended_sessions (expires_at);

-- Least privilege (roles from 0002): like login_attempts, serve's alone.
ALTER TABLE ended_sessions OWNER TO secledger_owner;
REVOKE ALL ON ended_sessions FROM PUBLIC;
GRANT SELECT, INSERT, DELETE ON ended_sessions TO secledger_app;
"""

DOWNGRADE = """
DROP TABLE ended_sessions;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
