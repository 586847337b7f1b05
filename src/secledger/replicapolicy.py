"""Replicas that judge deliveries by other rules than this one, found through the database.

Every replica must judge a delivery alike (docs/deployment.md): otherwise the replica a
load balancer happens to pick decides an MR's tier or a finding, and nothing says so.
Each ``serve`` names a digest of its policy in its sessions' ``application_name``, which
PostgreSQL shows to every login in ``pg_stat_activity``, and looks there now and then for
sessions that name another. This needs no table and no privilege beyond connecting.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import orjson
import structlog
from sqlalchemy import Engine, text

from secledger.config import Settings
from secledger.packpolicy import policy_json
from secledger.policy import LabelPolicy
from secledger.tierpolicy import CompliancePolicy

log = structlog.get_logger("secledger.replicapolicy")

PREFIX = "secledger serve policy="
CHECK_SECONDS = 60.0
# While replicas still differ, the error is repeated this often (an alert may have been
# missed, or a replica restarted into the same mistake).
REPEAT_SECONDS = 600.0

_SESSIONS = text(
    "SELECT substr(application_name, :start) AS policy, count(*) AS sessions"
    " FROM pg_stat_activity"
    " WHERE datname = current_database() AND starts_with(application_name, :prefix)"
    " GROUP BY 1"
)


def digest(settings: Settings) -> str:
    """12 hex digits naming what judges a delivery: security label patterns, tiers, each
    tier's rule, the business calendar, each webhook source's instance and auth policy,
    the default source's, and whether it has a secret at all.

    Secrets are left out: any login can read ``pg_stat_activity``, and a hash of a
    guessable token could be tested offline.
    """
    policy = policy_json(
        LabelPolicy.from_settings(settings), CompliancePolicy.from_settings(settings)
    )
    sources = sorted((s.instance, s.auth) for s in settings.webhook_sources)
    facts: dict[str, Any] = {
        "policy": policy,
        "sources": sources,
        "auth": settings.webhook_auth,
        # Whether the default source takes any delivery (no secret set: ``--allow-open``).
        "open": not (settings.webhook_secrets or settings.webhook_signing_secrets),
    }
    return hashlib.sha256(orjson.dumps(facts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


def application_name(policy: str) -> str:
    """The ``application_name`` of ``serve``'s sessions under ``policy`` (a digest)."""
    return PREFIX + policy


def sessions(engine: Engine) -> dict[str, int]:
    """Connected ``serve`` sessions on this database, counted by the policy they name."""
    with engine.connect() as conn:
        rows = conn.execute(_SESSIONS, {"start": len(PREFIX) + 1, "prefix": PREFIX})
        return {str(policy): int(count) for policy, count in rows}


class Watch:
    """Says when other replicas run under another policy, and when they no longer do."""

    def __init__(self, own: str, repeat: float = REPEAT_SECONDS) -> None:
        self.own = own
        self.repeat = repeat
        self._told: frozenset[str] = frozenset()
        self._told_at = 0.0

    def check(self, engine: Engine, now: float | None = None) -> dict[str, int]:
        """Look once; the sessions naming another policy than this replica's."""
        now = time.monotonic() if now is None else now
        others = {p: n for p, n in sessions(engine).items() if p != self.own}
        differing = frozenset(others)
        if differing and (differing != self._told or now - self._told_at >= self.repeat):
            log.error(
                "replica_policy_differs",
                policy=self.own,
                others=dict(sorted(others.items())),
                hint="every replica must run with the same policy settings"
                " (docs/deployment.md); compare serve_starting's policy on each",
            )
            self._told_at = now
        elif not differing and self._told:
            log.info("replica_policy_agrees", policy=self.own)
        self._told = differing
        return others


def schedule(engine: Engine, watch: Watch, interval: float = CHECK_SECONDS) -> asyncio.Task[None]:
    """Check at start and then every ``interval`` seconds, off the event loop."""
    return asyncio.create_task(_every(engine, watch, interval))


async def _every(engine: Engine, watch: Watch, interval: float) -> None:
    while True:
        try:
            await asyncio.to_thread(watch.check, engine)
        except Exception as exc:  # noqa: BLE001 - a failed look must not stop serving
            log.warning("replica_policy_check_failed", error=type(exc).__name__)
        await asyncio.sleep(interval)
