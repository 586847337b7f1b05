"""``bi_sla_status`` shows the tier whose SLA applied (``sla_tier``).

The SLA clock now counts each tier for the time the MR carried it (``rules.sla_clock``):
a critical MR relabelled low after its 24 hours passed was still late, and a review
given before a raise was on time for the tier it had. ``review_sla.risk_tier`` and
``sla_hours`` are then the tier the review fell due under, which may differ from the
ledger row's ``risk_tier`` (the MR's tier now, or at its merge); ``required_approvals``
stays the MR's tier's, what ``insufficient-approvals`` asks. The view kept showing the
ledger's tier next to the clock's hours; ``sla_tier`` says which tier those hours are.

It also repairs what two migrations changed after some development databases had run
them (those databases are stamped done and never ran the new text): 0014 gained the
column ``review_sla.ended_before_label`` and its backfill, which the view reads (it is
added, and backfilled as 0014 does, where it is missing); 0010's body index became
unique per instance, with ``delivery_log_body_before`` beside it (a non-unique one is
replaced, so the writer's dedup probe is an index lookup, not a scan of the log).

Revision ID: 0021
Revises: 0020
Create Date: 2026-11-30
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

_0014 = importlib.import_module("secledger.store.migrations.versions.0014_sla_labeled_after_end")

# 0014's view with one column added at the end (CREATE OR REPLACE keeps the others).
_VIEW = """
CREATE OR REPLACE VIEW bi_sla_status AS
SELECT l.instance, l.project_id, l.mr_iid, l.project_path, l.url, l.title, l.risk_tier,
       l.state, s.sla_hours, s.business_hours, s.required_approvals, s.labeled_at, s.deadline,
       s.first_decision_at, s.first_decision, s.first_decision_by,
       extract(epoch FROM s.first_decision_at - s.labeled_at) / 3600.0 AS hours_to_decision,
       CASE WHEN {running}
            THEN extract(epoch FROM s.deadline - now()) / 3600.0 END AS hours_left,
       {status} AS sla_status,
       s.risk_tier AS sla_tier
FROM security_review_ledger l
LEFT JOIN review_sla s USING (instance, project_id, mr_iid);
"""
_REPAIR = f"""
DO $repair$
BEGIN
    IF NOT EXISTS (SELECT FROM information_schema.columns WHERE table_schema = current_schema()
                   AND table_name = 'review_sla' AND column_name = 'ended_before_label') THEN
        {_0014._COLUMN}
    END IF;
    IF EXISTS (SELECT FROM pg_index WHERE indexrelid = to_regclass('delivery_log_body')
               AND NOT indisunique) THEN
        DROP INDEX delivery_log_body;
        CREATE UNIQUE INDEX delivery_log_body ON delivery_log (instance, body_sha256)
            WHERE body_sha256 IS NOT NULL AND source <> 'api';
        CREATE INDEX IF NOT EXISTS delivery_log_body_before
            ON delivery_log (instance, sha256(payload))
            WHERE body_sha256 IS NULL AND source <> 'api';
    END IF;
END
$repair$;
"""
UPGRADE = _REPAIR + _VIEW.format(running=_0014.RUNNING, status=_0014.SLA_STATUS)
# A view cannot lose a column in place: drop it, write 0014's again, and give it back
# its owner and readers (migration 0004).
DOWNGRADE = (
    "DROP VIEW bi_sla_status;"
    + _0014._VIEW.format(running=_0014.RUNNING, status=_0014.SLA_STATUS)
    + "ALTER VIEW bi_sla_status OWNER TO secledger_owner;"
    " GRANT SELECT ON bi_sla_status TO secledger_readonly, secledger_app;"
)


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
