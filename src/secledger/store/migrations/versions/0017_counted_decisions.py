"""Indexes that let the reviewers report read counted decisions without a probe per event.

The report counts each decision once (``copies.COUNTED``). It checked every decision
event for an earlier copy with an index probe and joined it to its MR's clock by
another: 5.3 s over 1,000,000 log rows, against a 2-second target. It now reads one row
per group of events that repeat one another (``copies.counted_groups``): webhook
decisions from an index-only scan of the first index below, API decisions (which may be
twins of a webhook's) from the second, both in the order of ``copies.GROUP``.

The predicates must stay the ones the report's query spells (``copies._from_api``), or
PostgreSQL cannot use the indexes; a test checks the plan.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE INDEX review_events_webhook_decisions
    ON review_events (instance, project_id, mr_iid, event_at, kind, decision, actor)
    WHERE decision IS NOT NULL AND actor IS NOT NULL AND NOT facts @> '{"source": "api"}';
CREATE INDEX review_events_api_decisions
    ON review_events (instance, project_id, mr_iid, event_at, kind, decision, actor)
    WHERE decision IS NOT NULL AND actor IS NOT NULL AND facts @> '{"source": "api"}';
"""

DOWNGRADE = """
DROP INDEX review_events_api_decisions;
DROP INDEX review_events_webhook_decisions;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
