"""Compliance: SLA clock per MR, separation-of-duties findings, BI views, read-only role.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLES = """
CREATE TABLE review_sla (
    instance           text NOT NULL,
    project_id         bigint NOT NULL,
    mr_iid             bigint NOT NULL,
    risk_tier          text NOT NULL,
    sla_hours          double precision NOT NULL,
    business_hours     boolean NOT NULL,
    required_approvals integer NOT NULL,
    labeled_at         timestamptz,
    label_seq          bigint,
    deadline           timestamptz,
    first_decision_at  timestamptz,
    first_decision     text,
    first_decision_by  text,
    first_decision_seq bigint,
    updated_at         timestamptz NOT NULL,
    PRIMARY KEY (instance, project_id, mr_iid)
);
COMMENT ON TABLE review_sla IS
  'SLA clock per security MR under the tier policy in force when it was last evaluated.';
CREATE INDEX review_sla_labeled_at ON review_sla (labeled_at);
CREATE INDEX review_sla_running ON review_sla (deadline) WHERE first_decision_at IS NULL;

CREATE TABLE findings (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance    text NOT NULL,
    project_id  bigint NOT NULL,
    mr_iid      bigint NOT NULL,
    rule        text NOT NULL,
    subject     text NOT NULL DEFAULT '',
    severity    text NOT NULL CHECK (severity IN ('critical', 'high', 'medium', 'low')),
    seqs        bigint[] NOT NULL,
    evidence    jsonb NOT NULL,
    detected_at timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    resolved_at timestamptz,
    UNIQUE (instance, project_id, mr_iid, rule, subject)
);
COMMENT ON TABLE findings IS
  'Separation-of-duties findings; one row per (MR, rule, subject), resolved rather than deleted.';
CREATE INDEX findings_detected_at ON findings (detected_at);

-- Reviewer reports read decisions by time without touching the wide facts column.
CREATE INDEX review_events_decisions ON review_events (event_at)
    INCLUDE (instance, project_id, mr_iid, decision, actor)
    WHERE decision IS NOT NULL;
CREATE INDEX security_review_ledger_project ON security_review_ledger (project_path);
"""

VIEWS = """
CREATE VIEW bi_decisions AS
SELECT e.seq, e.instance, e.project_id, e.mr_iid, l.project_path, l.url, l.risk_tier,
       e.decision, e.actor, e.event_at, s.labeled_at, s.deadline,
       extract(epoch FROM e.event_at - s.labeled_at) / 3600.0 AS hours_to_decision,
       e.event_at <= s.deadline AS within_sla
FROM review_events e
JOIN security_review_ledger l USING (instance, project_id, mr_iid)
LEFT JOIN review_sla s USING (instance, project_id, mr_iid)
WHERE e.decision IS NOT NULL;

CREATE VIEW bi_reviewer_metrics AS
SELECT actor AS reviewer,
       count(*) FILTER (WHERE decision IN ('approved', 'merged', 'closed')) AS decisions,
       count(*) FILTER (WHERE decision = 'approved') AS approvals,
       count(*) FILTER (WHERE decision = 'unapproved') AS revocations,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY hours_to_decision)
           FILTER (WHERE decision IN ('approved', 'merged', 'closed')) AS median_hours,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY hours_to_decision)
           FILTER (WHERE decision IN ('approved', 'merged', 'closed')) AS p90_hours,
       round(100.0 * avg(within_sla::int)
           FILTER (WHERE decision IN ('approved', 'merged', 'closed')), 1)::float
           AS sla_adherence_pct
FROM bi_decisions
WHERE actor IS NOT NULL
GROUP BY actor;

CREATE VIEW bi_sla_status AS
SELECT l.instance, l.project_id, l.mr_iid, l.project_path, l.url, l.title, l.risk_tier,
       l.state, s.sla_hours, s.business_hours, s.required_approvals, s.labeled_at, s.deadline,
       s.first_decision_at, s.first_decision, s.first_decision_by,
       extract(epoch FROM s.first_decision_at - s.labeled_at) / 3600.0 AS hours_to_decision,
       CASE WHEN s.first_decision_at IS NULL
            THEN extract(epoch FROM s.deadline - now()) / 3600.0 END AS hours_left,
       CASE WHEN s.deadline IS NULL THEN 'no_clock'
            WHEN s.first_decision_at IS NOT NULL AND s.first_decision_at <= s.deadline THEN 'met'
            WHEN s.first_decision_at IS NOT NULL THEN 'breached'
            WHEN now() > s.deadline THEN 'overdue'
            ELSE 'running' END AS sla_status
FROM security_review_ledger l
LEFT JOIN review_sla s USING (instance, project_id, mr_iid);

CREATE VIEW bi_findings AS
SELECT f.id, f.rule, f.severity, f.instance, f.project_id, f.mr_iid, l.project_path, l.url,
       l.risk_tier, f.subject, f.seqs, f.evidence, f.detected_at, f.updated_at, f.resolved_at,
       f.resolved_at IS NULL AS is_open
FROM findings f
LEFT JOIN security_review_ledger l USING (instance, project_id, mr_iid);
"""

# Least privilege (roles from 0002): serve evaluates findings in the recording
# transaction, so the app role keeps the clocks and findings current; BI tools read.
ROLE = """
ALTER TABLE review_sla OWNER TO secledger_owner;
ALTER TABLE findings OWNER TO secledger_owner;
ALTER VIEW bi_decisions OWNER TO secledger_owner;
ALTER VIEW bi_reviewer_metrics OWNER TO secledger_owner;
ALTER VIEW bi_sla_status OWNER TO secledger_owner;
ALTER VIEW bi_findings OWNER TO secledger_owner;
REVOKE ALL ON review_sla, findings FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON review_sla, findings TO secledger_app;
GRANT SELECT ON review_sla, findings TO secledger_readonly;
GRANT SELECT ON bi_decisions, bi_reviewer_metrics, bi_sla_status, bi_findings
    TO secledger_readonly, secledger_app;
"""

DOWNGRADE = """
DROP VIEW bi_findings;
DROP VIEW bi_sla_status;
DROP VIEW bi_reviewer_metrics;
DROP VIEW bi_decisions;
DROP INDEX security_review_ledger_project;
DROP INDEX review_events_decisions;
DROP TABLE findings;
DROP TABLE review_sla;
"""


def upgrade() -> None:
    op.execute(TABLES)
    op.execute(VIEWS)
    op.execute(ROLE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
