"""Dashboard login attempts, shared by every replica, so the failed-login limit holds.

``login_attempts`` has one row per password check. ``serve`` inserts it as ``pending``
before the check (so concurrent guesses, on one replica or many, each take a slot
under an advisory lock) and sets ``failed`` or ``succeeded`` after it. Counts run over
the last ``SECLEDGER_LOGIN_WINDOW_SECONDS``; older rows are deleted by ``serve`` when it
inserts, so the table stays as small as the window. It is a counter, not the audit
trail: the ``login*`` log lines are. No password is stored.

The application role may delete here (pruning) and change only ``outcome``: no other
table grants it DELETE except ``backfill_cursor``.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE login_attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    attempted_at timestamptz NOT NULL,
    user_name    text NOT NULL CHECK (length(user_name) <= 256),
    client       text NOT NULL CHECK (length(client) <= 256),
    outcome      text NOT NULL DEFAULT 'pending'
                 CHECK (outcome IN ('pending', 'failed', 'succeeded'))
);
COMMENT ON TABLE login_attempts IS
  'Dashboard password checks within the login window (rate limit shared by replicas).';
COMMENT ON COLUMN login_attempts.user_name IS 'The submitted user name, NFKC and casefolded.';
COMMENT ON COLUMN login_attempts.client IS 'Client address (IPv6 as its /64).';
-- Failures of one user since their last success; of one client; pruning by age.
CREATE INDEX login_attempts_user ON login_attempts (user_name, id);
CREATE INDEX login_attempts_client ON login_attempts (client, attempted_at);
CREATE INDEX login_attempts_time ON login_attempts (attempted_at);

-- Least privilege (roles from 0002). An identity column needs no sequence grant.
ALTER TABLE login_attempts OWNER TO secledger_owner;
REVOKE ALL ON login_attempts FROM PUBLIC;
GRANT SELECT, INSERT, DELETE ON login_attempts TO secledger_app;
GRANT UPDATE (outcome) ON login_attempts TO secledger_app;
GRANT SELECT ON login_attempts TO secledger_readonly;
"""

DOWNGRADE = """
DROP TABLE login_attempts;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
