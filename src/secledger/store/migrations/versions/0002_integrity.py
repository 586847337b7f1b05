"""Integrity: least-privilege roles and the append-only signed-checkpoint table.

Roles are cluster-wide and several databases may share one server, so each is
created only when missing. All three are NOLOGIN group roles: deployments create
their own login roles and grant them one of these (see docs/integrity.md).

* ``secledger_owner`` owns every table (and so can migrate, and rebuild derived tables).
* ``secledger_app`` is what ``serve`` runs as: it can append to the log and the
  checkpoints but never change or remove a row of either.
* ``secledger_readonly`` reads everything and writes nothing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CREATE_ROLES = """
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['secledger_owner', 'secledger_app', 'secledger_readonly'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', name);
        END IF;
    END LOOP;
    -- ALTER ... OWNER TO needs membership in the new owner; a superuser already has
    -- it, and a CREATEROLE migrator holds ADMIN OPTION on roles it created.
    IF NOT pg_has_role(current_user, 'secledger_owner', 'USAGE') THEN
        EXECUTE format('GRANT secledger_owner TO %I', current_user);
    END IF;
END
$$;
"""

CHECKPOINTS = """
CREATE TABLE checkpoints (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq         bigint NOT NULL CHECK (seq >= 0),
    head_hash   bytea NOT NULL CHECK (octet_length(head_hash) = 32),
    signed_at   timestamptz NOT NULL,
    key_id      text NOT NULL,
    signature   bytea NOT NULL CHECK (octet_length(signature) = 64),
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE checkpoints IS
  'Signed chain heads (Ed25519); append-only (enforced by triggers). Copies live outside the DB.';
CREATE INDEX checkpoints_seq ON checkpoints (seq);
CREATE TRIGGER checkpoints_append_only
    BEFORE UPDATE OR DELETE ON checkpoints
    FOR EACH ROW EXECUTE FUNCTION secledger_refuse_change();
CREATE TRIGGER checkpoints_no_truncate
    BEFORE TRUNCATE ON checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION secledger_refuse_change();
"""

PRIVILEGES = """
-- A new owner needs CREATE on the schema, which PostgreSQL 15 and later no longer give
-- everyone on public: without it a migrator that is not a superuser (the database's
-- owner, docs/integrity.md) was refused here. Its grantor is the schema's owner: the
-- database owner from 15 on; before 15 everyone has it, and this grants nothing.
GRANT CREATE ON SCHEMA public TO secledger_owner;
ALTER TABLE delivery_log OWNER TO secledger_owner;
ALTER TABLE review_events OWNER TO secledger_owner;
ALTER TABLE security_review_ledger OWNER TO secledger_owner;
ALTER TABLE checkpoints OWNER TO secledger_owner;
ALTER TABLE alembic_version OWNER TO secledger_owner;
ALTER FUNCTION secledger_refuse_change() OWNER TO secledger_owner;

REVOKE ALL ON delivery_log, review_events, security_review_ledger, checkpoints, alembic_version
    FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO secledger_app, secledger_readonly;

-- The application appends; it never changes or removes log rows or checkpoints.
GRANT SELECT, INSERT ON delivery_log TO secledger_app;
GRANT SELECT, INSERT ON review_events TO secledger_app;
GRANT SELECT, INSERT, UPDATE ON security_review_ledger TO secledger_app;
GRANT SELECT, INSERT ON checkpoints TO secledger_app;
-- readyz and start-up compare the schema revision.
GRANT SELECT ON alembic_version TO secledger_app;

GRANT SELECT ON delivery_log, review_events, security_review_ledger, checkpoints, alembic_version
    TO secledger_readonly;
"""

DOWNGRADE = """
REVOKE ALL ON delivery_log, review_events, security_review_ledger, alembic_version
    FROM secledger_app, secledger_readonly;
REVOKE USAGE ON SCHEMA public FROM secledger_app, secledger_readonly;
DROP TABLE checkpoints;
ALTER TABLE delivery_log OWNER TO CURRENT_USER;
ALTER TABLE review_events OWNER TO CURRENT_USER;
ALTER TABLE security_review_ledger OWNER TO CURRENT_USER;
ALTER TABLE alembic_version OWNER TO CURRENT_USER;
ALTER FUNCTION secledger_refuse_change() OWNER TO CURRENT_USER;
"""


def upgrade() -> None:
    op.execute(CREATE_ROLES)
    op.execute(CHECKPOINTS)
    op.execute(PRIVILEGES)


def downgrade() -> None:
    # The roles stay: they are cluster-wide and other databases may use them.
    op.execute(DOWNGRADE)
