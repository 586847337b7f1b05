"""Dashboard login attempts keep a keyed digest of the user name, never the name itself.

A name typed at the login form that is no configured user is often a password typed
into the wrong field. ``login_attempts.user_name`` kept it (NFKC, casefolded) for the
login window, readable by ``secledger_readonly``, the role BI logins use. ``serve`` now
stores HMAC-SHA256 of the normalised name, keyed by a key derived from the session
secret (``throttle.user_digest``), and a CHECK refuses anything else, so no version of
the code can store a name again. A replica still running older code cannot record a
login attempt once this runs: its login form fails (closed) until it is replaced.

Rows from before: their names are overwritten with 64 zeros (a digest no name has), so
no typed password survives the upgrade while every row still counts for its client; the
per-user counts start again (a name's digest matches none of them). The rows leave with
the login window as before.

Nothing that reads needs the table (it is ``serve``'s counter, not the audit trail: the
``login*`` log lines are), so ``secledger_readonly`` no longer reads it.

The downgrade drops the CHECK and grants the read back; digests stay until they leave
the window, and older code counts names afresh.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

LEGACY_NAME = "0" * 64

UPGRADE = f"""
-- No insert between the overwrite and the CHECK (an older replica may still be running).
LOCK TABLE login_attempts IN ACCESS EXCLUSIVE MODE;
UPDATE login_attempts SET user_name = '{LEGACY_NAME}';
ALTER TABLE login_attempts ADD CONSTRAINT login_attempts_user_name_digest
    CHECK (user_name ~ '^[0-9a-f]{{64}}$');
COMMENT ON COLUMN login_attempts.user_name IS
  'HMAC-SHA256 (hex) of the submitted user name, NFKC and casefolded, keyed by the'
  ' session secret; never the name.';
REVOKE SELECT ON login_attempts FROM secledger_readonly;
"""

DOWNGRADE = """
GRANT SELECT ON login_attempts TO secledger_readonly;
COMMENT ON COLUMN login_attempts.user_name IS 'The submitted user name, NFKC and casefolded.';
ALTER TABLE login_attempts DROP CONSTRAINT login_attempts_user_name_digest;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
