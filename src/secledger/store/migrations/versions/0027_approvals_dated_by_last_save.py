"""An approval a webhook dated by the MR's last save is one with the API's, hours later.

A GitLab that sends no ``actioned_at`` dates an approval by the MR's last save, which
an approval does not move: the approval was given then or later. The API's approval,
read by ``backfill`` or ``reconcile --fix`` from a GitLab that tells ``approved_at``,
can be hours later, and the two were matched only within 5 seconds: the ledger counted
one approval twice (``event_count``, ``decided_at`` moved to the API's time) and so
did ``bi_decisions`` and the reviewers report. ``projection._told_early`` now matches
such an approval with a later API one by its (named) user when the fold counts it (not
a repeat of an earlier one at its time), no save of the MR came between the two times,
and it still stands then (neither revoked by its user nor reset by a push); a reset
ends a standing approval for an undated API one too. ``copies.api_twin`` says the same
in SQL. ``bi_decisions`` and ``bi_reviewer_metrics``
are written again with it: ``COUNTED`` and ``GROUPS`` are ``copies.COUNTED`` and
``copies.counted_groups("TRUE")`` as they stand at this revision (a test keeps them
equal). Ledger rows change at their MR's next event or at ``secledger rebuild``; the
views change at once.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-02
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None

_0011 = importlib.import_module("secledger.store.migrations.versions.0011_api_twins")
_0020 = importlib.import_module("secledger.store.migrations.versions.0020_same_user_by_id")
_0026 = importlib.import_module("secledger.store.migrations.versions.0026_metrics_after_label")

COUNTED = """
NOT (e.facts @> '{"source": "api"}' AND EXISTS (SELECT 1 FROM review_events w WHERE
w.instance = e.instance AND w.project_id = e.project_id AND w.mr_iid = e.mr_iid AND
(w.event_at BETWEEN CASE WHEN e.facts @> '{"event_at_source":
"api.approval_upper_bound"}' THEN '-infinity' ELSE e.event_at - interval '5 seconds' END
AND CASE WHEN e.facts @> '{"event_at_source": "api.approval_upper_bound"}' THEN
e.event_at ELSE e.event_at + interval '5 seconds' END OR (NOT e.facts @>
'{"event_at_source": "api.approval_upper_bound"}' AND w.decision = 'approved' AND
(w.facts @> '{"event_at_source": "changes.updated_at"}' OR w.facts @>
'{"event_at_source": "object_attributes.updated_at"}') AND w.event_at < e.event_at -
interval '5 seconds' AND (CASE WHEN (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') =
'number' THEN w.facts -> 'actor_id' END) IS NOT NULL AND (CASE WHEN jsonb_typeof(e.facts
-> 'actor_id') = 'number' THEN e.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN
jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts -> 'actor_id' END) = (CASE
WHEN jsonb_typeof(e.facts -> 'actor_id') = 'number' THEN e.facts -> 'actor_id' END) WHEN
nullif(w.actor, '') IS NULL OR nullif(e.actor, '') IS NULL THEN NULL ELSE w.actor =
e.actor END) IS TRUE AND NOT EXISTS (SELECT 1 FROM review_events t2 WHERE t2.instance =
w.instance AND t2.project_id = w.project_id AND t2.mr_iid = w.mr_iid AND t2.event_at =
w.event_at AND t2.seq < w.seq AND t2.kind = w.kind AND t2.decision = w.decision AND
t2.actor IS NOT DISTINCT FROM w.actor AND NOT t2.facts @> '{"source": "api"}') AND NOT
EXISTS (SELECT 1 FROM review_events s2 WHERE s2.instance = w.instance AND s2.project_id
= w.project_id AND s2.mr_iid = w.mr_iid AND s2.event_at > w.event_at AND s2.event_at <
e.event_at - interval '5 seconds' AND (s2.facts @> '{"event_at_source":
"changes.updated_at"}' OR s2.facts @> '{"event_at_source":
"object_attributes.updated_at"}')))) AND w.decision = e.decision AND (CASE WHEN (CASE
WHEN jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts -> 'actor_id' END) IS
NOT NULL AND (CASE WHEN jsonb_typeof(e.facts -> 'actor_id') = 'number' THEN e.facts ->
'actor_id' END) IS NOT NULL THEN (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') =
'number' THEN w.facts -> 'actor_id' END) = (CASE WHEN jsonb_typeof(e.facts ->
'actor_id') = 'number' THEN e.facts -> 'actor_id' END) WHEN nullif(w.actor, '') IS NULL
OR nullif(e.actor, '') IS NULL THEN NULL ELSE w.actor = e.actor END) IS NOT FALSE AND
NOT w.facts @> '{"source": "api"}' AND NOT (e.facts @> '{"event_at_source":
"api.approval_upper_bound"}' AND EXISTS (SELECT 1 FROM review_events t2 WHERE
t2.instance = w.instance AND t2.project_id = w.project_id AND t2.mr_iid = w.mr_iid AND
t2.event_at = w.event_at AND t2.seq < w.seq AND t2.kind = w.kind AND t2.decision =
w.decision AND t2.actor IS NOT DISTINCT FROM w.actor AND NOT t2.facts @> '{"source":
"api"}')) AND NOT ((e.facts @> '{"event_at_source": "api.approval_upper_bound"}' OR (NOT
e.facts @> '{"event_at_source": "api.approval_upper_bound"}' AND w.decision = 'approved'
AND (w.facts @> '{"event_at_source": "changes.updated_at"}' OR w.facts @>
'{"event_at_source": "object_attributes.updated_at"}') AND w.event_at < e.event_at -
interval '5 seconds' AND (CASE WHEN (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') =
'number' THEN w.facts -> 'actor_id' END) IS NOT NULL AND (CASE WHEN jsonb_typeof(e.facts
-> 'actor_id') = 'number' THEN e.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN
jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts -> 'actor_id' END) = (CASE
WHEN jsonb_typeof(e.facts -> 'actor_id') = 'number' THEN e.facts -> 'actor_id' END) WHEN
nullif(w.actor, '') IS NULL OR nullif(e.actor, '') IS NULL THEN NULL ELSE w.actor =
e.actor END) IS TRUE AND NOT EXISTS (SELECT 1 FROM review_events t2 WHERE t2.instance =
w.instance AND t2.project_id = w.project_id AND t2.mr_iid = w.mr_iid AND t2.event_at =
w.event_at AND t2.seq < w.seq AND t2.kind = w.kind AND t2.decision = w.decision AND
t2.actor IS NOT DISTINCT FROM w.actor AND NOT t2.facts @> '{"source": "api"}') AND NOT
EXISTS (SELECT 1 FROM review_events s2 WHERE s2.instance = w.instance AND s2.project_id
= w.project_id AND s2.mr_iid = w.mr_iid AND s2.event_at > w.event_at AND s2.event_at <
e.event_at - interval '5 seconds' AND (s2.facts @> '{"event_at_source":
"changes.updated_at"}' OR s2.facts @> '{"event_at_source":
"object_attributes.updated_at"}')))) AND EXISTS (SELECT 1 FROM review_events r WHERE
r.instance = w.instance AND r.project_id = w.project_id AND r.mr_iid = w.mr_iid AND
r.event_at BETWEEN w.event_at AND e.event_at AND (r.event_at, r.seq) > (w.event_at,
w.seq) AND (r.kind = 'approvals_reset' OR r.decision = 'unapproved' AND CASE WHEN
nullif(w.actor, '') IS NOT NULL OR (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') =
'number' THEN w.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN (CASE WHEN
jsonb_typeof(r.facts -> 'actor_id') = 'number' THEN r.facts -> 'actor_id' END) IS NOT
NULL AND (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts ->
'actor_id' END) IS NOT NULL THEN (CASE WHEN jsonb_typeof(r.facts -> 'actor_id') =
'number' THEN r.facts -> 'actor_id' END) = (CASE WHEN jsonb_typeof(w.facts ->
'actor_id') = 'number' THEN w.facts -> 'actor_id' END) WHEN nullif(r.actor, '') IS NULL
OR nullif(w.actor, '') IS NULL THEN NULL ELSE r.actor = w.actor END) ELSE (CASE WHEN
(CASE WHEN jsonb_typeof(r.facts -> 'actor_id') = 'number' THEN r.facts -> 'actor_id'
END) IS NOT NULL AND (CASE WHEN jsonb_typeof(e.facts -> 'actor_id') = 'number' THEN
e.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN jsonb_typeof(r.facts ->
'actor_id') = 'number' THEN r.facts -> 'actor_id' END) = (CASE WHEN jsonb_typeof(e.facts
-> 'actor_id') = 'number' THEN e.facts -> 'actor_id' END) WHEN nullif(r.actor, '') IS
NULL OR nullif(e.actor, '') IS NULL THEN NULL ELSE r.actor = e.actor END) END) AND NOT
r.facts @> '{"source": "api"}')))) AND NOT EXISTS (SELECT 1 FROM review_events t WHERE
t.instance = e.instance AND t.project_id = e.project_id AND t.mr_iid = e.mr_iid AND
t.event_at = e.event_at AND t.seq < e.seq AND t.kind = e.kind AND t.decision =
e.decision AND t.actor IS NOT DISTINCT FROM e.actor AND NOT (t.facts @> '{"source":
"api"}' AND EXISTS (SELECT 1 FROM review_events w WHERE w.instance = t.instance AND
w.project_id = t.project_id AND w.mr_iid = t.mr_iid AND (w.event_at BETWEEN CASE WHEN
t.facts @> '{"event_at_source": "api.approval_upper_bound"}' THEN '-infinity' ELSE
t.event_at - interval '5 seconds' END AND CASE WHEN t.facts @> '{"event_at_source":
"api.approval_upper_bound"}' THEN t.event_at ELSE t.event_at + interval '5 seconds' END
OR (NOT t.facts @> '{"event_at_source": "api.approval_upper_bound"}' AND w.decision =
'approved' AND (w.facts @> '{"event_at_source": "changes.updated_at"}' OR w.facts @>
'{"event_at_source": "object_attributes.updated_at"}') AND w.event_at < t.event_at -
interval '5 seconds' AND (CASE WHEN (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') =
'number' THEN w.facts -> 'actor_id' END) IS NOT NULL AND (CASE WHEN jsonb_typeof(t.facts
-> 'actor_id') = 'number' THEN t.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN
jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts -> 'actor_id' END) = (CASE
WHEN jsonb_typeof(t.facts -> 'actor_id') = 'number' THEN t.facts -> 'actor_id' END) WHEN
nullif(w.actor, '') IS NULL OR nullif(t.actor, '') IS NULL THEN NULL ELSE w.actor =
t.actor END) IS TRUE AND NOT EXISTS (SELECT 1 FROM review_events t2 WHERE t2.instance =
w.instance AND t2.project_id = w.project_id AND t2.mr_iid = w.mr_iid AND t2.event_at =
w.event_at AND t2.seq < w.seq AND t2.kind = w.kind AND t2.decision = w.decision AND
t2.actor IS NOT DISTINCT FROM w.actor AND NOT t2.facts @> '{"source": "api"}') AND NOT
EXISTS (SELECT 1 FROM review_events s2 WHERE s2.instance = w.instance AND s2.project_id
= w.project_id AND s2.mr_iid = w.mr_iid AND s2.event_at > w.event_at AND s2.event_at <
t.event_at - interval '5 seconds' AND (s2.facts @> '{"event_at_source":
"changes.updated_at"}' OR s2.facts @> '{"event_at_source":
"object_attributes.updated_at"}')))) AND w.decision = t.decision AND (CASE WHEN (CASE
WHEN jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts -> 'actor_id' END) IS
NOT NULL AND (CASE WHEN jsonb_typeof(t.facts -> 'actor_id') = 'number' THEN t.facts ->
'actor_id' END) IS NOT NULL THEN (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') =
'number' THEN w.facts -> 'actor_id' END) = (CASE WHEN jsonb_typeof(t.facts ->
'actor_id') = 'number' THEN t.facts -> 'actor_id' END) WHEN nullif(w.actor, '') IS NULL
OR nullif(t.actor, '') IS NULL THEN NULL ELSE w.actor = t.actor END) IS NOT FALSE AND
NOT w.facts @> '{"source": "api"}' AND NOT (t.facts @> '{"event_at_source":
"api.approval_upper_bound"}' AND EXISTS (SELECT 1 FROM review_events t2 WHERE
t2.instance = w.instance AND t2.project_id = w.project_id AND t2.mr_iid = w.mr_iid AND
t2.event_at = w.event_at AND t2.seq < w.seq AND t2.kind = w.kind AND t2.decision =
w.decision AND t2.actor IS NOT DISTINCT FROM w.actor AND NOT t2.facts @> '{"source":
"api"}')) AND NOT ((t.facts @> '{"event_at_source": "api.approval_upper_bound"}' OR (NOT
t.facts @> '{"event_at_source": "api.approval_upper_bound"}' AND w.decision = 'approved'
AND (w.facts @> '{"event_at_source": "changes.updated_at"}' OR w.facts @>
'{"event_at_source": "object_attributes.updated_at"}') AND w.event_at < t.event_at -
interval '5 seconds' AND (CASE WHEN (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') =
'number' THEN w.facts -> 'actor_id' END) IS NOT NULL AND (CASE WHEN jsonb_typeof(t.facts
-> 'actor_id') = 'number' THEN t.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN
jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts -> 'actor_id' END) = (CASE
WHEN jsonb_typeof(t.facts -> 'actor_id') = 'number' THEN t.facts -> 'actor_id' END) WHEN
nullif(w.actor, '') IS NULL OR nullif(t.actor, '') IS NULL THEN NULL ELSE w.actor =
t.actor END) IS TRUE AND NOT EXISTS (SELECT 1 FROM review_events t2 WHERE t2.instance =
w.instance AND t2.project_id = w.project_id AND t2.mr_iid = w.mr_iid AND t2.event_at =
w.event_at AND t2.seq < w.seq AND t2.kind = w.kind AND t2.decision = w.decision AND
t2.actor IS NOT DISTINCT FROM w.actor AND NOT t2.facts @> '{"source": "api"}') AND NOT
EXISTS (SELECT 1 FROM review_events s2 WHERE s2.instance = w.instance AND s2.project_id
= w.project_id AND s2.mr_iid = w.mr_iid AND s2.event_at > w.event_at AND s2.event_at <
t.event_at - interval '5 seconds' AND (s2.facts @> '{"event_at_source":
"changes.updated_at"}' OR s2.facts @> '{"event_at_source":
"object_attributes.updated_at"}')))) AND EXISTS (SELECT 1 FROM review_events r WHERE
r.instance = w.instance AND r.project_id = w.project_id AND r.mr_iid = w.mr_iid AND
r.event_at BETWEEN w.event_at AND t.event_at AND (r.event_at, r.seq) > (w.event_at,
w.seq) AND (r.kind = 'approvals_reset' OR r.decision = 'unapproved' AND CASE WHEN
nullif(w.actor, '') IS NOT NULL OR (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') =
'number' THEN w.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN (CASE WHEN
jsonb_typeof(r.facts -> 'actor_id') = 'number' THEN r.facts -> 'actor_id' END) IS NOT
NULL AND (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts ->
'actor_id' END) IS NOT NULL THEN (CASE WHEN jsonb_typeof(r.facts -> 'actor_id') =
'number' THEN r.facts -> 'actor_id' END) = (CASE WHEN jsonb_typeof(w.facts ->
'actor_id') = 'number' THEN w.facts -> 'actor_id' END) WHEN nullif(r.actor, '') IS NULL
OR nullif(w.actor, '') IS NULL THEN NULL ELSE r.actor = w.actor END) ELSE (CASE WHEN
(CASE WHEN jsonb_typeof(r.facts -> 'actor_id') = 'number' THEN r.facts -> 'actor_id'
END) IS NOT NULL AND (CASE WHEN jsonb_typeof(t.facts -> 'actor_id') = 'number' THEN
t.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN jsonb_typeof(r.facts ->
'actor_id') = 'number' THEN r.facts -> 'actor_id' END) = (CASE WHEN jsonb_typeof(t.facts
-> 'actor_id') = 'number' THEN t.facts -> 'actor_id' END) WHEN nullif(r.actor, '') IS
NULL OR nullif(t.actor, '') IS NULL THEN NULL ELSE r.actor = t.actor END) END) AND NOT
r.facts @> '{"source": "api"}')))))"""

GROUPS = """
SELECT e.instance, e.project_id, e.mr_iid, e.event_at, e.kind, e.decision, e.actor FROM
review_events e WHERE e.decision IS NOT NULL AND e.actor IS NOT NULL AND NOT e.facts @>
'{"source": "api"}' AND TRUE UNION SELECT e.instance, e.project_id, e.mr_iid,
e.event_at, e.kind, e.decision, e.actor FROM review_events e WHERE e.decision IS NOT
NULL AND e.actor IS NOT NULL AND e.facts @> '{"source": "api"}' AND NOT (e.facts @>
'{"source": "api"}' AND EXISTS (SELECT 1 FROM review_events w WHERE w.instance =
e.instance AND w.project_id = e.project_id AND w.mr_iid = e.mr_iid AND (w.event_at
BETWEEN CASE WHEN e.facts @> '{"event_at_source": "api.approval_upper_bound"}' THEN
'-infinity' ELSE e.event_at - interval '5 seconds' END AND CASE WHEN e.facts @>
'{"event_at_source": "api.approval_upper_bound"}' THEN e.event_at ELSE e.event_at +
interval '5 seconds' END OR (NOT e.facts @> '{"event_at_source":
"api.approval_upper_bound"}' AND w.decision = 'approved' AND (w.facts @>
'{"event_at_source": "changes.updated_at"}' OR w.facts @> '{"event_at_source":
"object_attributes.updated_at"}') AND w.event_at < e.event_at - interval '5 seconds' AND
(CASE WHEN (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts ->
'actor_id' END) IS NOT NULL AND (CASE WHEN jsonb_typeof(e.facts -> 'actor_id') =
'number' THEN e.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN
jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts -> 'actor_id' END) = (CASE
WHEN jsonb_typeof(e.facts -> 'actor_id') = 'number' THEN e.facts -> 'actor_id' END) WHEN
nullif(w.actor, '') IS NULL OR nullif(e.actor, '') IS NULL THEN NULL ELSE w.actor =
e.actor END) IS TRUE AND NOT EXISTS (SELECT 1 FROM review_events t2 WHERE t2.instance =
w.instance AND t2.project_id = w.project_id AND t2.mr_iid = w.mr_iid AND t2.event_at =
w.event_at AND t2.seq < w.seq AND t2.kind = w.kind AND t2.decision = w.decision AND
t2.actor IS NOT DISTINCT FROM w.actor AND NOT t2.facts @> '{"source": "api"}') AND NOT
EXISTS (SELECT 1 FROM review_events s2 WHERE s2.instance = w.instance AND s2.project_id
= w.project_id AND s2.mr_iid = w.mr_iid AND s2.event_at > w.event_at AND s2.event_at <
e.event_at - interval '5 seconds' AND (s2.facts @> '{"event_at_source":
"changes.updated_at"}' OR s2.facts @> '{"event_at_source":
"object_attributes.updated_at"}')))) AND w.decision = e.decision AND (CASE WHEN (CASE
WHEN jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts -> 'actor_id' END) IS
NOT NULL AND (CASE WHEN jsonb_typeof(e.facts -> 'actor_id') = 'number' THEN e.facts ->
'actor_id' END) IS NOT NULL THEN (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') =
'number' THEN w.facts -> 'actor_id' END) = (CASE WHEN jsonb_typeof(e.facts ->
'actor_id') = 'number' THEN e.facts -> 'actor_id' END) WHEN nullif(w.actor, '') IS NULL
OR nullif(e.actor, '') IS NULL THEN NULL ELSE w.actor = e.actor END) IS NOT FALSE AND
NOT w.facts @> '{"source": "api"}' AND NOT (e.facts @> '{"event_at_source":
"api.approval_upper_bound"}' AND EXISTS (SELECT 1 FROM review_events t2 WHERE
t2.instance = w.instance AND t2.project_id = w.project_id AND t2.mr_iid = w.mr_iid AND
t2.event_at = w.event_at AND t2.seq < w.seq AND t2.kind = w.kind AND t2.decision =
w.decision AND t2.actor IS NOT DISTINCT FROM w.actor AND NOT t2.facts @> '{"source":
"api"}')) AND NOT ((e.facts @> '{"event_at_source": "api.approval_upper_bound"}' OR (NOT
e.facts @> '{"event_at_source": "api.approval_upper_bound"}' AND w.decision = 'approved'
AND (w.facts @> '{"event_at_source": "changes.updated_at"}' OR w.facts @>
'{"event_at_source": "object_attributes.updated_at"}') AND w.event_at < e.event_at -
interval '5 seconds' AND (CASE WHEN (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') =
'number' THEN w.facts -> 'actor_id' END) IS NOT NULL AND (CASE WHEN jsonb_typeof(e.facts
-> 'actor_id') = 'number' THEN e.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN
jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts -> 'actor_id' END) = (CASE
WHEN jsonb_typeof(e.facts -> 'actor_id') = 'number' THEN e.facts -> 'actor_id' END) WHEN
nullif(w.actor, '') IS NULL OR nullif(e.actor, '') IS NULL THEN NULL ELSE w.actor =
e.actor END) IS TRUE AND NOT EXISTS (SELECT 1 FROM review_events t2 WHERE t2.instance =
w.instance AND t2.project_id = w.project_id AND t2.mr_iid = w.mr_iid AND t2.event_at =
w.event_at AND t2.seq < w.seq AND t2.kind = w.kind AND t2.decision = w.decision AND
t2.actor IS NOT DISTINCT FROM w.actor AND NOT t2.facts @> '{"source": "api"}') AND NOT
EXISTS (SELECT 1 FROM review_events s2 WHERE s2.instance = w.instance AND s2.project_id
= w.project_id AND s2.mr_iid = w.mr_iid AND s2.event_at > w.event_at AND s2.event_at <
e.event_at - interval '5 seconds' AND (s2.facts @> '{"event_at_source":
"changes.updated_at"}' OR s2.facts @> '{"event_at_source":
"object_attributes.updated_at"}')))) AND EXISTS (SELECT 1 FROM review_events r WHERE
r.instance = w.instance AND r.project_id = w.project_id AND r.mr_iid = w.mr_iid AND
r.event_at BETWEEN w.event_at AND e.event_at AND (r.event_at, r.seq) > (w.event_at,
w.seq) AND (r.kind = 'approvals_reset' OR r.decision = 'unapproved' AND CASE WHEN
nullif(w.actor, '') IS NOT NULL OR (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') =
'number' THEN w.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN (CASE WHEN
jsonb_typeof(r.facts -> 'actor_id') = 'number' THEN r.facts -> 'actor_id' END) IS NOT
NULL AND (CASE WHEN jsonb_typeof(w.facts -> 'actor_id') = 'number' THEN w.facts ->
'actor_id' END) IS NOT NULL THEN (CASE WHEN jsonb_typeof(r.facts -> 'actor_id') =
'number' THEN r.facts -> 'actor_id' END) = (CASE WHEN jsonb_typeof(w.facts ->
'actor_id') = 'number' THEN w.facts -> 'actor_id' END) WHEN nullif(r.actor, '') IS NULL
OR nullif(w.actor, '') IS NULL THEN NULL ELSE r.actor = w.actor END) ELSE (CASE WHEN
(CASE WHEN jsonb_typeof(r.facts -> 'actor_id') = 'number' THEN r.facts -> 'actor_id'
END) IS NOT NULL AND (CASE WHEN jsonb_typeof(e.facts -> 'actor_id') = 'number' THEN
e.facts -> 'actor_id' END) IS NOT NULL THEN (CASE WHEN jsonb_typeof(r.facts ->
'actor_id') = 'number' THEN r.facts -> 'actor_id' END) = (CASE WHEN jsonb_typeof(e.facts
-> 'actor_id') = 'number' THEN e.facts -> 'actor_id' END) WHEN nullif(r.actor, '') IS
NULL OR nullif(e.actor, '') IS NULL THEN NULL ELSE r.actor = e.actor END) END) AND NOT
r.facts @> '{"source": "api"}')))) AND TRUE"""

UPGRADE = _0011._DECISIONS.format(counted=COUNTED) + _0026.metrics(GROUPS)
DOWNGRADE = _0011._DECISIONS.format(counted=_0020.COUNTED) + _0026.UPGRADE


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
