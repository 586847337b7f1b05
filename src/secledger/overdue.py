"""serve's periodic SLA check: running clocks that passed their deadline without any event.

Time passes without deliveries, so nothing else would record that an MR still awaiting
its review is now overdue (an open MR, or one merged or closed since without that
event recorded); every ``sla_refresh_interval_seconds`` this records ``sla-breached`` for
them (``findings.refresh_overdue``, one set-based statement), so the findings table,
``bi_findings`` and ``secledger_sla_breaches`` stay current. Reports, the read API and
the dashboard do not wait for it: they judge overdue MRs as of the request, reading
only. This task and `secledger findings --refresh-only` are the only writers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import structlog
from sqlalchemy import Engine

from secledger import findings
from secledger.config import Settings
from secledger.tierpolicy import CompliancePolicy
from secledger.times import utcnow

log = structlog.get_logger("secledger.overdue")


def refresh_step(engine: Engine, policy: CompliancePolicy, now: datetime) -> int:
    """One pass in its own transaction: the number of findings recorded or reopened."""
    with engine.begin() as conn:
        changed = findings.refresh_overdue(conn, policy, now)
    if changed:
        log.info("sla_breaches_recorded", count=changed)
    return changed


def schedule(
    settings: Settings, engine: Engine, clock: Callable[[], datetime] = utcnow
) -> asyncio.Task[None] | None:
    """Start the periodic check; ``None`` when the interval is 0 (turned off)."""
    interval = settings.sla_refresh_interval_seconds
    if interval <= 0:
        return None
    policy = CompliancePolicy.from_settings(settings)
    return asyncio.create_task(_every(interval, engine, policy, clock))


async def _every(
    interval: float, engine: Engine, policy: CompliancePolicy, clock: Callable[[], datetime]
) -> None:
    while True:
        # Sleep first: a starting receiver is busy (migrations, spool drain), and reads
        # do not depend on this pass (they compute overdue MRs themselves).
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(refresh_step, engine, policy, clock())
        except Exception as exc:  # noqa: BLE001 - a failed pass must not stop serving
            log.warning("sla_refresh_failed", error=type(exc).__name__)
