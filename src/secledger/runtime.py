"""What a running receiver holds: database, writer thread, known merge requests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlalchemy import Engine

from secledger.config import Settings
from secledger.drain import Drainer
from secledger.membership import KnownMRs
from secledger.metrics import Metrics
from secledger.policy import LabelPolicy
from secledger.recentignored import Lost
from secledger.recorder import Recorder
from secledger.replicapolicy import application_name, digest
from secledger.service import Recording
from secledger.spool import Spool
from secledger.store import db, migrate

log = structlog.get_logger("secledger.runtime")


@dataclass
class Runtime:
    """Everything the web edge needs, opened once at start-up."""

    settings: Settings
    policy: LabelPolicy
    database: db.Database
    engine: Engine
    recorder: Recorder
    known: KnownMRs
    spool: Spool
    metrics: Metrics
    # What judges a delivery here, as a digest other replicas compare (``replicapolicy``).
    policy_digest: str
    # Records a lost delivery's MR from GitLab's API (``recovery``), when one is set up:
    # None once queued, else why not.
    recover: Callable[[Lost], str | None] | None = None

    @classmethod
    def open(cls, settings: Settings, database: db.Database) -> Runtime:
        """Migrate (under the advisory lock), load known MRs, open the spool, start the writer."""
        policy_digest = digest(settings)
        engine = db.create(database.url, application_name=application_name(policy_digest))
        before = migrate.ensure_current(engine, db.migration_url(settings))
        if before is not None:
            log.warning("schema_upgraded", from_revision=before, hint=migrate.REBUILD_HINT)
        known = KnownMRs()
        known.load(engine)
        known.listen(db.conninfo(database.url))
        policy = LabelPolicy.from_settings(settings)
        # What an earlier run spooled is drained first, before any new delivery.
        spool = Spool.open(settings.spool_path)
        recording = Recording.from_settings(settings)
        drainer = Drainer(engine, spool, policy, known, recording=recording)
        recorder = Recorder(
            engine,
            max_batch=settings.max_batch,
            drainer=drainer,
            retry_seconds=settings.spool_retry_seconds,
            recording=recording,
            policy=policy,
            spool_after=settings.spool_after_seconds,
        )
        # What an earlier run kept of the deliveries its drain left out, judged again now.
        drainer.sweep_ignored_locked()
        recorder.start()
        metrics = Metrics(engine, [*settings.risk_tiers, settings.unclassified_tier])
        # Read at scrape time, so the gauge can never be stale.
        metrics.spool_depth.set_function(lambda: spool.depth)
        return cls(
            settings=settings,
            policy=policy,
            database=database,
            engine=engine,
            recorder=recorder,
            known=known,
            spool=spool,
            metrics=metrics,
            policy_digest=policy_digest,
        )

    def close(self) -> None:
        """Drain the writer, stop listening, close connections."""
        # Held ignored deliveries are not looked at again once the writer stops.
        self.known.on_new = None
        self.recorder.close()
        self.known.close()
        self.engine.dispose()
