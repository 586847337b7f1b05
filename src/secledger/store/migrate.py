"""Apply the Alembic migrations, safely from several replicas at once."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import ProgrammingError

from secledger.errors import ConfigError
from secledger.store import db

# Replicas starting together queue on this lock; the first migrates, the rest find
# the schema current and do nothing.
MIGRATION_LOCK_KEY = 0x5EC1ED01
INSUFFICIENT_PRIVILEGE = "42501"


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
            if current_revision(conn) is not None:  # a new database gets both from 0002
                _refuse_unknown_revision(conn)
                _let_owner_create(conn)
                conn.commit()
            else:
                _refuse_tables_elsewhere(conn)
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            conn.commit()
        finally:
            # After a failed migration the transaction is aborted; roll back first so the
            # unlock runs and the original error is the one raised.
            conn.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
            conn.commit()


# A schema holding secledger's tables, not only a table of a common name: its log and
# ledger, and Alembic's version table beside them.
_ELSEWHERE = text(
    "SELECT n.nspname FROM pg_namespace n"
    " WHERE n.nspname <> 'public' AND n.nspname NOT LIKE 'pg\\_%'"
    " AND (SELECT count(*) FROM pg_class c WHERE c.relnamespace = n.oid"
    " AND c.relkind IN ('r', 'p')"
    " AND c.relname IN ('delivery_log', 'security_review_ledger', 'alembic_version')) = 3"
    " ORDER BY 1 LIMIT 1"
)


def _refuse_tables_elsewhere(conn: Connection) -> None:
    """No ledger in public, one in another schema: every session reads public
    (``db.SESSION_SEARCH_PATH``), and migrating would start a new, empty ledger there."""
    schema = conn.execute(_ELSEWHERE).scalar()
    if schema is not None:
        raise ConfigError(
            f"this database keeps secledger's tables in schema {schema}, and secledger uses"
            " schema public only (docs/data-model.md): move them there (ALTER TABLE ..."
            " SET SCHEMA public, as their owner), or give secledger a database of its own"
        )


def _refuse_unknown_revision(conn: Connection) -> None:
    """A database a newer version migrated: this one cannot tell what its schema holds."""
    current = current_revision(conn)
    script = ScriptDirectory.from_config(alembic_config())
    if current not in {rev.revision for rev in script.walk_revisions()}:
        raise ConfigError(
            f"the database is at revision {current}, which this version of secledger"
            f" ({head_revision()} at most) does not know: a newer version migrated it."
            " Run that version (or newer); migrations are never undone by an older one"
        )


# What 0002 grants a new database since PostgreSQL 15 stopped giving everyone CREATE on
# public. 0002 ran without it on databases made before that line was added, and a
# migration that ran is never run again: the owner role's migrations then fail.
_OWNER_MAY_CREATE = text(
    "SELECT to_regrole('secledger_owner') IS NULL"
    " OR has_schema_privilege('secledger_owner', 'public', 'CREATE')"
)
GRANT_OWNER_CREATE = "GRANT CREATE ON SCHEMA public TO secledger_owner"


def _let_owner_create(conn: Connection) -> None:
    """Give secledger_owner CREATE on public where 0002 could not, or say who must."""
    if conn.execute(_OWNER_MAY_CREATE).scalar_one():
        return
    # Granted by the schema's owner (or a superuser); anyone else grants nothing, with a
    # warning, not an error: asked again below.
    conn.execute(text(GRANT_OWNER_CREATE))
    if conn.execute(_OWNER_MAY_CREATE).scalar_one():
        return
    raise ConfigError(
        "secledger_owner may not create objects in schema public (PostgreSQL 15 and later"
        " no longer let everyone), and this login cannot grant it: run"
        f" `{GRANT_OWNER_CREATE};` once as the database's owner or a superuser, then"
        " migrate again (docs/integrity.md, Roles and logins)"
    )


def head_revision() -> str | None:
    """The newest migration shipped with this version."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    """The migration the database is at."""
    return MigrationContext.configure(conn).get_current_revision()


def is_current(conn: Connection) -> bool:
    """True when the database has every shipped migration."""
    return current_revision(conn) == head_revision()


# What to do once migrations ran on a schema that held rows: said by every path that
# migrates (``db upgrade``, and the start of ``serve`` and of every other command).
REBUILD_HINT = (
    "run `secledger rebuild` once (with the owner login) so that every ledger row, SLA"
    " clock and finding follows this version's rules; until then each changes at its"
    " MR's next event (see the CHANGELOG)"
)


def ensure_current(engine: Engine, migration_url: str | None) -> str | None:
    """Bring the schema to head at start-up, as the owner when a migration URL is given;
    the revision an existing schema was at when it was behind (None when it was current
    or new), for the caller to give ``REBUILD_HINT``.

    ``serve`` runs as a least-privilege login that cannot run DDL. When the schema is
    already current nothing is attempted; when it is behind and no owner URL is
    configured, the app login tries, and a privilege error becomes a clear ConfigError
    instead of a half-started receiver.
    """
    with engine.connect() as conn:
        before = current_revision(conn)
    if before == head_revision():
        return None
    if migration_url is not None:
        owner = db.create(migration_url, pool_size=1)
        try:
            db.check_same_database(engine, owner)
            upgrade(owner)
        finally:
            owner.dispose()
        return before
    try:
        upgrade(engine)
    except ProgrammingError as exc:
        if getattr(exc.orig, "sqlstate", None) != INSUFFICIENT_PRIVILEGE:
            raise
        raise ConfigError(
            f"the database is at revision {_revision_of(engine)} but this version needs "
            f"{head_revision()}, and this login may not migrate: run `secledger db upgrade` "
            "as the owner, or set SECLEDGER_MIGRATION_DATABASE_URL"
        ) from None
    return before


def _revision_of(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return current_revision(conn)
