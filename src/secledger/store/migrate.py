"""Apply the Alembic migrations, safely from several replicas at once."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

# Replicas starting together queue on this lock; the first migrates, the rest find
# the schema current and do nothing.
MIGRATION_LOCK_KEY = 0x5EC1ED01


def alembic_config() -> Config:
    """Alembic configuration pointing at the packaged migrations."""
    config = Config()
    location = resources.files("secledger.store") / "migrations"
    config.set_main_option("script_location", str(location))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to ``revision`` under a session-level advisory lock."""
    config = alembic_config()
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        conn.commit()
        try:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            conn.commit()
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
            conn.commit()


def head_revision() -> str | None:
    """The newest migration shipped with this version."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    """The migration the database is at."""
    return MigrationContext.configure(conn).get_current_revision()


def is_current(conn: Connection) -> bool:
    """True when the database has every shipped migration."""
    return current_revision(conn) == head_revision()
