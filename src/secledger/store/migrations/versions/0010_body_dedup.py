"""One GitLab event delivered through several hooks is logged once and counted once.

* ``delivery_log.body_sha256`` and the unique index ``delivery_log_body``: a project hook
  and a group hook send the same event's body byte for byte, each with its own
  ``Idempotency-Key``; the recording path looks the body's SHA-256 up, under the chain
  lock, and answers ``duplicate``. The writer stores the hash it computed anyway for that
  lookup, so PostgreSQL hashes no payload at insert (its ``sha256`` measured ~30 µs per
  6 KB body, which made recording a batch 20-30 % slower). The index is unique per
  instance (API rows aside): the database refuses a second copy even from a writer that
  skipped the lookup, and the planner knows a probe finds at most one row. Rows logged
  before this revision keep a NULL (the log refuses UPDATE, and needs none); the index
  ``delivery_log_body_before`` holds their payloads' hashes, so building it hashes each
  of them once. Not a generated column: adding one rewrites the whole log under an
  exclusive lock and hashes in PostgreSQL at every insert. The column is not part of the
  chain: it is derived from ``payload``, which is.
* ``bi_decisions`` (and so ``bi_reviewer_metrics``) count a decision once when a system
  hook repeats it with a different body: a decision event of an MR with the same kind,
  decision, actor and event time as an earlier one (lower seq) is left out, the rule
  ``projection.fact_identity`` applies to the fold.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_BODY = """
ALTER TABLE delivery_log ADD COLUMN body_sha256 bytea;
-- NOT VALID: existing rows are all NULL; every new row is checked.
ALTER TABLE delivery_log ADD CONSTRAINT delivery_log_body_sha256_length
    CHECK (octet_length(body_sha256) = 32) NOT VALID;
COMMENT ON COLUMN delivery_log.body_sha256 IS
  'SHA-256 of payload, written with each row since revision 0010 (NULL before); not chained.';
CREATE UNIQUE INDEX delivery_log_body ON delivery_log (instance, body_sha256)
    WHERE body_sha256 IS NOT NULL AND source <> 'api';
CREATE INDEX delivery_log_body_before ON delivery_log (instance, sha256(payload))
    WHERE body_sha256 IS NULL AND source <> 'api';
"""

_DECISIONS = """
CREATE OR REPLACE VIEW bi_decisions AS
SELECT e.seq, e.instance, e.project_id, e.mr_iid, l.project_path, l.url, l.risk_tier,
       e.decision, e.actor, e.event_at, s.labeled_at, s.deadline,
       extract(epoch FROM e.event_at - s.labeled_at) / 3600.0 AS hours_to_decision,
       e.event_at <= s.deadline AS within_sla
FROM review_events e
JOIN security_review_ledger l USING (instance, project_id, mr_iid)
LEFT JOIN review_sla s USING (instance, project_id, mr_iid)
WHERE e.decision IS NOT NULL{repeat};
"""
# ``NOT reports.REPEATED`` as it stood at this revision (0011 replaced it).
_REPEAT = """
  AND NOT EXISTS (SELECT 1 FROM review_events t
      WHERE t.instance = e.instance AND t.project_id = e.project_id AND t.mr_iid = e.mr_iid
      AND t.event_at = e.event_at AND t.seq < e.seq AND t.kind = e.kind
      AND t.decision = e.decision AND t.actor IS NOT DISTINCT FROM e.actor)"""

UPGRADE = _BODY + _DECISIONS.format(repeat=_REPEAT)

DOWNGRADE = (
    _DECISIONS.format(repeat="")
    + """
DROP INDEX delivery_log_body_before;
DROP INDEX delivery_log_body;
ALTER TABLE delivery_log DROP COLUMN body_sha256;
"""
)


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
