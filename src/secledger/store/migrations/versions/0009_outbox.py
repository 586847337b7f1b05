"""Downstream emit: the transactional outbox of the HTTP sink.

Three tables, all written with INSERT only, so the application role needs no UPDATE
or DELETE on any of them:

* ``outbox``: one row per recorded log seq while a sink is configured, written in the
  recording transaction; the exact JSON body to POST and its idempotency key.
* ``outbox_delivered``: one row per outbox row the sink acknowledged (2xx). The sender
  delivers strictly in seq order, so the delivered rows are always a prefix of the outbox.
* ``outbox_failures``: one row per failed attempt (status or error), for ``sink status``.

Rows never change once written (a trigger refuses UPDATE). DELETE is left to the owner
for pruning delivered rows; the application role is not granted it.

Revision ID: 0009
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE outbox (
    seq             bigint PRIMARY KEY REFERENCES delivery_log (seq),
    idempotency_key text NOT NULL UNIQUE,
    body            text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE outbox IS
  'Ledger rows to POST to the HTTP sink, one per log seq, written in the recording transaction.';

CREATE TABLE outbox_delivered (
    seq          bigint PRIMARY KEY REFERENCES outbox (seq),
    delivered_at timestamptz NOT NULL DEFAULT now(),
    status       integer NOT NULL
);
COMMENT ON TABLE outbox_delivered IS
  'Outbox rows the sink acknowledged; always a prefix of outbox by seq.';

CREATE TABLE outbox_failures (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq          bigint NOT NULL REFERENCES outbox (seq),
    attempted_at timestamptz NOT NULL DEFAULT now(),
    status       integer,
    error        text NOT NULL
);
COMMENT ON TABLE outbox_failures IS 'Failed delivery attempts to the HTTP sink.';
CREATE INDEX outbox_failures_seq ON outbox_failures (seq, id);

CREATE TRIGGER outbox_immutable BEFORE UPDATE ON outbox
    FOR EACH ROW EXECUTE FUNCTION secledger_refuse_change();
CREATE TRIGGER outbox_delivered_immutable BEFORE UPDATE ON outbox_delivered
    FOR EACH ROW EXECUTE FUNCTION secledger_refuse_change();
CREATE TRIGGER outbox_failures_immutable BEFORE UPDATE ON outbox_failures
    FOR EACH ROW EXECUTE FUNCTION secledger_refuse_change();

-- Least privilege (roles from 0002): written with INSERT only.
ALTER TABLE outbox OWNER TO secledger_owner;
ALTER TABLE outbox_delivered OWNER TO secledger_owner;
ALTER TABLE outbox_failures OWNER TO secledger_owner;
REVOKE ALL ON outbox, outbox_delivered, outbox_failures FROM PUBLIC;
GRANT SELECT, INSERT ON outbox, outbox_delivered, outbox_failures TO secledger_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO secledger_app;
GRANT SELECT ON outbox, outbox_delivered, outbox_failures TO secledger_readonly;
"""

DOWNGRADE = """
DROP TABLE outbox_failures;
DROP TABLE outbox_delivered;
DROP TABLE outbox;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
