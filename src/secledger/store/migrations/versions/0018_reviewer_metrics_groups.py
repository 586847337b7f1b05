"""``bi_reviewer_metrics`` reads counted decisions as groups, as the reviewers report does.

The view aggregated ``bi_decisions``, whose copy check probes the table once per decision
event: about 10 s over 1,000,000 log rows. It now reads one row per group of events that
repeat one another from migration 0017's indexes (``copies.counted_groups``; ``GROUPS``
is its text at this revision, and a test keeps the two equal). The figures are the same:
every column the view reads is one of the group's. ``bi_decisions`` is unchanged.

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

GROUPS = """
SELECT e.instance, e.project_id, e.mr_iid, e.event_at, e.kind, e.decision, e.actor
FROM review_events e
WHERE e.decision IS NOT NULL AND e.actor IS NOT NULL AND NOT e.facts @> '{"source": "api"}'
  AND TRUE
UNION
SELECT e.instance, e.project_id, e.mr_iid, e.event_at, e.kind, e.decision, e.actor
FROM review_events e
WHERE e.decision IS NOT NULL AND e.actor IS NOT NULL AND e.facts @> '{"source": "api"}'
  AND NOT (e.facts @> '{"source": "api"}' AND EXISTS (SELECT 1 FROM review_events w
    WHERE w.instance = e.instance AND w.project_id = e.project_id AND w.mr_iid = e.mr_iid
    AND w.event_at BETWEEN
        CASE WHEN e.facts @> '{"event_at_source": "api.approval_upper_bound"}'
             THEN '-infinity' ELSE e.event_at - interval '5 seconds' END
        AND CASE WHEN e.facts @> '{"event_at_source": "api.approval_upper_bound"}'
             THEN e.event_at ELSE e.event_at + interval '5 seconds' END
    AND w.decision = e.decision
    AND (nullif(w.actor, '') IS NULL OR nullif(e.actor, '') IS NULL OR w.actor = e.actor)
    AND NOT w.facts @> '{"source": "api"}'
    AND NOT (e.facts @> '{"event_at_source": "api.approval_upper_bound"}'
      AND EXISTS (SELECT 1 FROM review_events r
        WHERE r.instance = w.instance AND r.project_id = w.project_id
        AND r.mr_iid = w.mr_iid AND r.event_at BETWEEN w.event_at AND e.event_at
        AND (r.event_at, r.seq) > (w.event_at, w.seq) AND r.decision = 'unapproved'
        AND r.actor = coalesce(nullif(w.actor, ''), nullif(e.actor, ''))
        AND NOT r.facts @> '{"source": "api"}'))))
  AND TRUE"""

_STOPPERS = "('approved', 'merged', 'closed')"
_METRICS = """
CREATE OR REPLACE VIEW bi_reviewer_metrics AS
SELECT {actor} AS reviewer,
       count(*) FILTER (WHERE {decision} IN {stoppers}) AS decisions,
       count(*) FILTER (WHERE {decision} = 'approved') AS approvals,
       count(*) FILTER (WHERE {decision} = 'unapproved') AS revocations,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY {hours})
           FILTER (WHERE {decision} IN {stoppers}) AS median_hours,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY {hours})
           FILTER (WHERE {decision} IN {stoppers}) AS p90_hours,
       round(100.0 * avg({within}::int)
           FILTER (WHERE {decision} IN {stoppers}), 1)::float
           AS sla_adherence_pct
FROM {source}
GROUP BY {actor};
"""


# bi_decisions' hours_to_decision and within_sla, over the group ``c`` and its MR's clock.
# No CTE of its own: a filter on the view (``WHERE reviewer = 'bob'``) then reaches the
# index scan (0.1 s for one reviewer over 1,000,000 log rows, 2.7 s for all of them).
def metrics(groups: str) -> str:
    """The view over the counted groups ``groups`` (also migration 0020's)."""
    return _METRICS.format(
        actor="c.actor",
        decision="c.decision",
        stoppers=_STOPPERS,
        hours="extract(epoch FROM c.event_at - s.labeled_at) / 3600.0",
        within="(c.event_at <= s.deadline)",
        source=f"""({groups}) c
JOIN security_review_ledger l USING (instance, project_id, mr_iid)
LEFT JOIN review_sla s USING (instance, project_id, mr_iid)""",
    )


UPGRADE = metrics(GROUPS)

# As migration 0004 wrote it.
DOWNGRADE = _METRICS.format(
    actor="actor",
    decision="decision",
    stoppers=_STOPPERS,
    hours="hours_to_decision",
    within="within_sla",
    source="bi_decisions\nWHERE actor IS NOT NULL",
)


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
