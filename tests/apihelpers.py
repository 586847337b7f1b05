"""Helpers for the GitLab API tests: replay webhook bodies, read the ledger back."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, text

from secledger.policy import LabelPolicy
from secledger.service import feed

POLICY = LabelPolicy()
VOLATILE = ("updated_at",)  # the wall-clock time of the last upsert


def replay(engine: Engine, instance: str, bodies: list[dict[str, Any]]) -> list[str]:
    """Feed webhook bodies through the replay path, as sent by ``instance``."""
    headers = {"x-gitlab-event": "Merge Request Hook", "x-gitlab-instance": instance}
    return [
        feed(
            engine, POLICY, headers, json.dumps(b).encode(), max_body_bytes=1 << 20, source="replay"
        ).status
        for b in bodies
    ]


def ledger_rows(engine: Engine) -> list[dict[str, Any]]:
    """Every ledger row, without the wall-clock column."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM security_review_ledger ORDER BY project_id, mr_iid")
        )
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows.mappings()]


def log_count(engine: Engine) -> int:
    """Rows in the delivery log."""
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one())
