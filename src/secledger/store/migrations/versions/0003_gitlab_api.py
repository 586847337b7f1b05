"""GitLab API: backfill cursor, enrichment checks, reconciliation results.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE backfill_runs (
    run_key     text PRIMARY KEY,
    instance    text NOT NULL,
    scope       text NOT NULL,
    since       timestamptz NOT NULL,
    until       timestamptz,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    mr_count    integer NOT NULL DEFAULT 0,
    fact_count  integer NOT NULL DEFAULT 0
);
COMMENT ON TABLE backfill_runs IS
  'One row per backfill (scope and period); finished_at is null while it can be resumed.';

CREATE TABLE backfill_cursor (
    run_key    text NOT NULL REFERENCES backfill_runs (run_key) ON DELETE CASCADE,
    project_id bigint NOT NULL,
    mr_iid     bigint NOT NULL,
    done_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_key, project_id, mr_iid)
);
COMMENT ON TABLE backfill_cursor IS
  'Merge requests whose history a backfill run has recorded; a resumed run skips them.';

CREATE TABLE enrichment_checks (
    instance   text NOT NULL,
    project_id bigint NOT NULL,
    mr_iid     bigint NOT NULL,
    checked_at timestamptz NOT NULL DEFAULT now(),
    outcome    text NOT NULL,
    PRIMARY KEY (instance, project_id, mr_iid)
);
COMMENT ON TABLE enrichment_checks IS
  'Merge requests whose label time was looked up in the API, so it is not asked again.';

CREATE TABLE reconciliations (
    id              bigserial PRIMARY KEY,
    checked_at      timestamptz NOT NULL DEFAULT now(),
    instance        text NOT NULL,
    scope           text NOT NULL,
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    gitlab_count    integer NOT NULL,
    ledger_count    integer NOT NULL,
    missing_count   integer NOT NULL,
    different_count integer NOT NULL,
    fixed_count     integer NOT NULL DEFAULT 0,
    differences     jsonb NOT NULL
);
COMMENT ON TABLE reconciliations IS
  'Each completeness check of the ledger against GitLab: period, counts, differences, when.';
CREATE INDEX reconciliations_checked_at ON reconciliations (checked_at);

CREATE FUNCTION secledger_refuse_reconciliation_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'secledger: % on reconciliations is refused: results are evidence', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER reconciliations_append_only
    BEFORE UPDATE OR DELETE ON reconciliations
    FOR EACH ROW EXECUTE FUNCTION secledger_refuse_reconciliation_change();

-- Least privilege (see 0002): the owner owns; serve enriches; backfill/reconcile keep
-- their bookkeeping; reconciliation results can be added, never changed.
ALTER TABLE backfill_runs OWNER TO secledger_owner;
ALTER TABLE backfill_cursor OWNER TO secledger_owner;
ALTER TABLE enrichment_checks OWNER TO secledger_owner;
ALTER TABLE reconciliations OWNER TO secledger_owner;
ALTER FUNCTION secledger_refuse_reconciliation_change() OWNER TO secledger_owner;
REVOKE ALL ON backfill_runs, backfill_cursor, enrichment_checks, reconciliations FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON backfill_runs, enrichment_checks TO secledger_app;
GRANT SELECT, INSERT, DELETE ON backfill_cursor TO secledger_app;
GRANT SELECT, INSERT ON reconciliations TO secledger_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO secledger_app;
GRANT SELECT ON backfill_runs, backfill_cursor, enrichment_checks, reconciliations
    TO secledger_readonly;
"""

DOWNGRADE = """
DROP TABLE reconciliations;
DROP FUNCTION secledger_refuse_reconciliation_change();
DROP TABLE enrichment_checks;
DROP TABLE backfill_cursor;
DROP TABLE backfill_runs;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
