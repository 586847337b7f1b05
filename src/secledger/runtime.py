"""What a running receiver holds: database, writer thread, known merge requests."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from secledger.config import Settings
from secledger.membership import KnownMRs
from secledger.metrics import Metrics
from secledger.policy import LabelPolicy
from secledger.recorder import Recorder
from secledger.store import db, migrate


@dataclass
class Runtime:
    """Everything the web edge needs, opened once at start-up."""

    settings: Settings
    policy: LabelPolicy
    database: db.Database
    engine: Engine
    recorder: Recorder
    known: KnownMRs
    metrics: Metrics

    @classmethod
    def open(cls, settings: Settings, database: db.Database) -> Runtime:
        """Migrate (under the advisory lock), load known MRs, start the writer."""
        engine = db.create(database.url)
        migrate.upgrade(engine)
        known = KnownMRs()
        known.load(engine)
        known.listen(db.libpq_url(database.url))
        recorder = Recorder(engine, max_batch=settings.max_batch)
        recorder.start()
        return cls(
            settings=settings,
            policy=LabelPolicy.from_settings(settings),
            database=database,
            engine=engine,
            recorder=recorder,
            known=known,
            metrics=Metrics(engine),
        )

    def close(self) -> None:
        """Drain the writer, stop listening, close connections."""
        self.recorder.close()
        self.known.close()
        self.engine.dispose()
