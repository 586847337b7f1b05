"""A decision told by a webhook and again by the GitLab API is one row of ``bi_decisions``.

The ledger fold drops an API fact (backfill, ``reconcile --fix``, enrichment) that a
webhook or replayed event of its MR already tells (``projection.merge_sources``): the
same decision, by the same user when both name one, at event times at most 5 seconds
apart, or, for an approval the API gave no time, any earlier one. ``bi_decisions`` (and
so ``bi_reviewer_metrics``) now leave out the same API copies. The rule of 0010 (a
system hook's repeat of a decision counts once) stays, except that an API copy dropped
for its webhook no longer hides that webhook when it was logged first at the same event
time. ``COUNTED`` is ``copies.COUNTED`` as it stands at this revision (a test keeps them
equal); both probes use ``review_events_mr``, no new index.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_DECISIONS = """
CREATE OR REPLACE VIEW bi_decisions AS
SELECT e.seq, e.instance, e.project_id, e.mr_iid, l.project_path, l.url, l.risk_tier,
       e.decision, e.actor, e.event_at, s.labeled_at, s.deadline,
       extract(epoch FROM e.event_at - s.labeled_at) / 3600.0 AS hours_to_decision,
       e.event_at <= s.deadline AS within_sla
FROM review_events e
JOIN security_review_ledger l USING (instance, project_id, mr_iid)
LEFT JOIN review_sla s USING (instance, project_id, mr_iid)
WHERE e.decision IS NOT NULL
  AND {counted};
"""

COUNTED = """
NOT (e.facts @> '{"source": "api"}' AND EXISTS (SELECT 1 FROM review_events w
    WHERE w.instance = e.instance AND w.project_id = e.project_id AND w.mr_iid = e.mr_iid
    AND w.event_at BETWEEN
        CASE WHEN e.facts @> '{"event_at_source": "api.approval_upper_bound"}'
             THEN '-infinity' ELSE e.event_at - interval '5 seconds' END
        AND CASE WHEN e.facts @> '{"event_at_source": "api.approval_upper_bound"}'
             THEN e.event_at ELSE e.event_at + interval '5 seconds' END
    AND w.decision = e.decision
    AND (nullif(w.actor, '') IS NULL OR nullif(e.actor, '') IS NULL OR w.actor = e.actor)
    AND NOT w.facts @> '{"source": "api"}'))
AND NOT EXISTS (SELECT 1 FROM review_events t
    WHERE t.instance = e.instance AND t.project_id = e.project_id AND t.mr_iid = e.mr_iid
    AND t.event_at = e.event_at AND t.seq < e.seq AND t.kind = e.kind
    AND t.decision = e.decision AND t.actor IS NOT DISTINCT FROM e.actor
    AND NOT (t.facts @> '{"source": "api"}' AND EXISTS (SELECT 1 FROM review_events w
        WHERE w.instance = t.instance AND w.project_id = t.project_id
        AND w.mr_iid = t.mr_iid
        AND w.event_at BETWEEN
            CASE WHEN t.facts @> '{"event_at_source": "api.approval_upper_bound"}'
                 THEN '-infinity' ELSE t.event_at - interval '5 seconds' END
            AND CASE WHEN t.facts @> '{"event_at_source": "api.approval_upper_bound"}'
                 THEN t.event_at ELSE t.event_at + interval '5 seconds' END
        AND w.decision = t.decision
        AND (nullif(w.actor, '') IS NULL OR nullif(t.actor, '') IS NULL OR w.actor = t.actor)
        AND NOT w.facts @> '{"source": "api"}')))"""

# What 0010 wrote: a repeat of an earlier decision event of the MR is left out.
_REPEAT_0010 = """
NOT EXISTS (SELECT 1 FROM review_events t
      WHERE t.instance = e.instance AND t.project_id = e.project_id AND t.mr_iid = e.mr_iid
      AND t.event_at = e.event_at AND t.seq < e.seq AND t.kind = e.kind
      AND t.decision = e.decision AND t.actor IS NOT DISTINCT FROM e.actor)"""

UPGRADE = _DECISIONS.format(counted=COUNTED)
DOWNGRADE = _DECISIONS.format(counted=_REPEAT_0010)


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
