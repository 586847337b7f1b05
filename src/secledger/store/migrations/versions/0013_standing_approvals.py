"""An undated API approval copies only an approval still standing, in ``bi_decisions`` too.

The GitLab API lists the approvals that stand, some without a time (older GitLab). The
ledger fold took such an approval for a copy of any earlier webhook approval by the same
user, even one that user revoked before the API was asked: bob's approval, told by the
API after bob revoked and approved again with no webhook telling it, was dropped, and the
revoked approval stood for it. The fold now matches it only to an approval not revoked
(in fold order) by the API fact's time (``projection.merge_sources``). ``bi_decisions``
(and so ``bi_reviewer_metrics``) counts the same events: ``COUNTED`` is
``copies.COUNTED`` as it stands at this revision (a test keeps them equal); the new probe
is one range on ``review_events_mr``. Ledger rows change at their MR's next event or at
``secledger rebuild``; the views change at once.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_0011 = importlib.import_module("secledger.store.migrations.versions.0011_api_twins")

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
    AND NOT w.facts @> '{"source": "api"}'
    AND NOT (e.facts @> '{"event_at_source": "api.approval_upper_bound"}'
        AND EXISTS (SELECT 1 FROM review_events r
            WHERE r.instance = w.instance AND r.project_id = w.project_id
            AND r.mr_iid = w.mr_iid AND r.event_at BETWEEN w.event_at AND e.event_at
            AND (r.event_at, r.seq) > (w.event_at, w.seq) AND r.decision = 'unapproved'
            AND r.actor = coalesce(nullif(w.actor, ''), nullif(e.actor, ''))
            AND NOT r.facts @> '{"source": "api"}'))))
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
        AND NOT w.facts @> '{"source": "api"}'
        AND NOT (t.facts @> '{"event_at_source": "api.approval_upper_bound"}'
            AND EXISTS (SELECT 1 FROM review_events r
                WHERE r.instance = w.instance AND r.project_id = w.project_id
                AND r.mr_iid = w.mr_iid AND r.event_at BETWEEN w.event_at AND t.event_at
                AND (r.event_at, r.seq) > (w.event_at, w.seq) AND r.decision = 'unapproved'
                AND r.actor = coalesce(nullif(w.actor, ''), nullif(t.actor, ''))
                AND NOT r.facts @> '{"source": "api"}')))))"""

UPGRADE = _0011._DECISIONS.format(counted=COUNTED)
DOWNGRADE = _0011.UPGRADE


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
