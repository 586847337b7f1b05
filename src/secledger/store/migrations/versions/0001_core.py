"""Core schema: append-only delivery log, review events, security_review_ledger.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE delivery_log (
    seq         bigint PRIMARY KEY CHECK (seq > 0),
    received_at timestamptz NOT NULL,
    source      text NOT NULL,
    event       text NOT NULL,
    instance    text NOT NULL,
    dedup_key   text NOT NULL UNIQUE,
    headers     text NOT NULL,
    payload     bytea NOT NULL,
    prev_hash   bytea NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash        bytea NOT NULL CHECK (octet_length(hash) = 32)
);
COMMENT ON TABLE delivery_log IS
  'Every accepted security delivery, hash-chained; append-only (enforced by triggers).';

CREATE FUNCTION secledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'secledger: % on %.% is refused: the table is append-only',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER delivery_log_append_only
    BEFORE UPDATE OR DELETE ON delivery_log
    FOR EACH ROW EXECUTE FUNCTION secledger_refuse_change();
CREATE TRIGGER delivery_log_no_truncate
    BEFORE TRUNCATE ON delivery_log
    FOR EACH STATEMENT EXECUTE FUNCTION secledger_refuse_change();

CREATE TABLE review_events (
    seq        bigint PRIMARY KEY REFERENCES delivery_log (seq),
    instance   text NOT NULL,
    project_id bigint NOT NULL,
    mr_iid     bigint NOT NULL,
    event_at   timestamptz NOT NULL,
    kind       text NOT NULL,
    decision   text,
    actor      text,
    facts      jsonb NOT NULL
);
COMMENT ON TABLE review_events IS
  'Facts extracted from each log row; derived, rebuilt by secledger rebuild.';
CREATE INDEX review_events_mr ON review_events (instance, project_id, mr_iid, event_at, seq);

CREATE TABLE security_review_ledger (
    instance                 text NOT NULL,
    project_id               bigint NOT NULL,
    mr_iid                   bigint NOT NULL,
    mr_id                    bigint,
    project_path             text,
    title                    text,
    url                      text,
    author_id                bigint,
    risk_tier                text NOT NULL,
    security_labels          text[] NOT NULL,
    state                    text,
    decision                 text,
    decided_by               text,
    decided_at               timestamptz,
    reviewer                 text,
    approvers                text[] NOT NULL,
    assigned_reviewers       text[] NOT NULL,
    labeled_at               timestamptz,
    labeled_at_source        text,
    labeled_by               text,
    time_to_decision_seconds double precision,
    merged_by                text,
    merged_at                timestamptz,
    closed_by                text,
    closed_at                timestamptz,
    last_event_at            timestamptz NOT NULL,
    last_seq                 bigint NOT NULL,
    event_count              integer NOT NULL,
    updated_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance, project_id, mr_iid)
);
COMMENT ON TABLE security_review_ledger IS
  'One row per security merge request, projected from review_events.';
CREATE INDEX security_review_ledger_decided_at ON security_review_ledger (decided_at);
CREATE INDEX security_review_ledger_last_event_at ON security_review_ledger (last_event_at);
"""

DOWNGRADE = """
DROP TABLE security_review_ledger;
DROP TABLE review_events;
DROP TABLE delivery_log;
DROP FUNCTION secledger_refuse_change();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
