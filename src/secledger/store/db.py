"""Engines and database URLs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import orjson
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url

from secledger import embedded
from secledger.config import Settings


def sqlalchemy_url(url: str) -> str:
    """Make a libpq URL (``postgresql://``) use the psycopg 3 driver in SQLAlchemy."""
    parsed = make_url(url)
    if parsed.drivername in {"postgres", "postgresql"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def create(url: str, *, pool_size: int = 5) -> Engine:
    """An engine for ``url`` with a pool sized for one writer and a few readers."""
    return create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args={"application_name": "secledger"},
        # JSONB parameters (review_events.facts) are encoded on the writer's hot path.
        json_serializer=_json_text,
    )


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection whose transactions are ``READ ONLY``, for reports, listings and pages.

    A read that would write (as reports once did, recording SLA breaches) is then refused
    by PostgreSQL for every login, not only for ``secledger_readonly``.
    """
    with engine.connect() as conn:
        # psycopg opens the transaction with BEGIN READ ONLY: no extra round trip; the
        # pool resets the flag when the connection is returned.
        conn.execution_options(postgresql_readonly=True)
        yield conn


def _json_text(value: object) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True)
class Database:
    """The configured database: its URL, and whether secledger started it."""

    url: str
    embedded: bool

    def redacted(self) -> str:
        """The URL without its password, for messages and logs."""
        return make_url(self.url).render_as_string(hide_password=True)


def resolve(settings: Settings) -> Database:
    """The configured server, or the embedded one started on demand."""
    if settings.database_url is not None:
        return Database(settings.database_url.get_secret_value(), embedded=False)
    return Database(embedded.start(settings.pg_data_dir), embedded=True)


def migration_url(settings: Settings) -> str | None:
    """The owner login for migrations and rebuilds, when one is configured apart."""
    if settings.migration_database_url is None:
        return None
    return settings.migration_database_url.get_secret_value()


def admin_url(settings: Settings, database: Database) -> str:
    """The URL for owner-only work: the migration URL, else the ordinary one."""
    return migration_url(settings) or database.url


def libpq_url(url: str) -> str:
    """The same URL as plain libpq understands it (for psycopg connections)."""
    parsed = make_url(url)
    if "+" in parsed.drivername:
        parsed = parsed.set(drivername=parsed.drivername.split("+", 1)[0])
    return parsed.render_as_string(hide_password=False)
