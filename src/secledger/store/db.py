"""Engines and database URLs."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from psycopg.conninfo import make_conninfo
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from secledger import embedded
from secledger.config import Settings
from secledger.errors import ConfigError

# libpq waits forever by default: for a connection to a server that does not answer
# (a partition, a firewall dropping packets), and for the answer on a connection whose
# peer is gone. The writer would then hang with its batch instead of spooling it, and a
# listener would stop hearing other replicas without noticing. These bound both; a
# parameter already in the configured URL wins. Ignored on Unix sockets (the embedded
# server), where a dead peer is seen at once.
CONNECTION_DEFAULTS = {
    "connect_timeout": "10",  # seconds
    "keepalives": "1",
    "keepalives_idle": "30",  # seconds idle before the first probe
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",  # milliseconds that sent data may stay unacknowledged
}


# libpq reads these from the environment; a value in the URL would override them.
_FROM_ENVIRONMENT = {"connect_timeout": "PGCONNECT_TIMEOUT"}


def _with_defaults(parsed: URL) -> URL:
    if "service" in parsed.query or os.environ.get("PGSERVICE"):
        return parsed  # a service file's settings are the operator's: none added
    missing = {
        name: value
        for name, value in CONNECTION_DEFAULTS.items()
        if name not in parsed.query and not os.environ.get(_FROM_ENVIRONMENT.get(name, ""))
    }
    return parsed.update_query_dict(missing) if missing else parsed


def sqlalchemy_url(url: str) -> str:
    """Make a libpq URL (``postgresql://``) use the psycopg 3 driver in SQLAlchemy, with
    ``CONNECTION_DEFAULTS`` where it sets none."""
    parsed = make_url(url)
    if parsed.drivername in {"postgres", "postgresql"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return _with_defaults(parsed).render_as_string(hide_password=False)


def create(url: str, *, pool_size: int = 5, application_name: str = "secledger") -> Engine:
    """An engine for ``url`` with a pool sized for one writer and a few readers, whose
    sessions all run in UTC and read secledger's own tables (``SESSION_SEARCH_PATH``),
    named ``application_name`` in ``pg_stat_activity``."""
    try:
        engine = _engine(url, pool_size, application_name)
    except ArgumentError as exc:
        # Its own words only where they cannot quote the URL (and a password in it).
        reason = str(exc) if "multihost" in str(exc) else "its options are not usable"
        raise ConfigError(f"the database URL is refused: {reason}") from None
    event.listen(engine, "connect", _session_defaults)
    return engine


def _engine(url: str, pool_size: int, application_name: str) -> Engine:
    return create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args={"application_name": application_name},
        # An error's text must not carry a statement's parameters into a log: payloads,
        # headers, user names.
        hide_parameters=True,
        # JSONB parameters (review_events.facts) are encoded on the writer's hot path.
        json_serializer=_json_text,
    )


def _session_defaults(dbapi_connection: Any, _record: object) -> None:
    # Every time shown (pages, API, CSV) is labelled UTC, but a timestamptz comes back
    # in the session's zone, and initdb gives a server its host's zone: a dashboard
    # showed New York times as UTC. The search path: reports, pages and the writer read
    # the tables in public, not a copy left in a schema named after the login. Set here
    # rather than through the URL's `options`, which would replace an operator's own
    # options or PGOPTIONS.
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    dbapi_connection.execute(_SESSION_DEFAULTS)
    dbapi_connection.autocommit = autocommit


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


# Every session resolves names in the tables the migrations made in public, after
# PostgreSQL's own functions. A login's default search_path searches "$user" first, where
# whoever may create a schema of that name (the database's owner) could leave a pristine
# copy of the log for the auditor to walk, or of the ledger for a report to read. A
# session's path leaves pg_catalog implicit (searched first all the same) so that what
# the migrations create goes to public; readers that prove history pin the path again
# for their transaction, with pg_catalog named.
SESSION_SEARCH_PATH = "public, pg_temp"
PINNED_SEARCH_PATH = "pg_catalog, public, pg_temp"
# Whatever path the login, the database or the URL sets: the database's owner may
# ALTER DATABASE ... SET search_path to a schema of copies. Tables kept in another
# schema are refused when migrating (``migrate``), not forked. One round trip for both.
_SESSION_DEFAULTS = f"SET TIME ZONE 'UTC'; SET search_path = {SESSION_SEARCH_PATH}"


def pin_search_path(conn: Connection) -> None:
    """For the rest of ``conn``'s transaction, read secledger's own tables only."""
    conn.execute(text(f"SET LOCAL search_path = {PINNED_SEARCH_PATH}"))


def _json_text(value: object) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True)
class Database:
    """The configured database: its URL, and whether secledger started it."""

    url: str
    embedded: bool

    def redacted(self) -> str:
        """The URL without its password, for messages and logs: also one given as a
        query option, which libpq accepts as well."""
        parsed = make_url(self.url).difference_update_query(_SECRET_OPTIONS)
        return parsed.render_as_string(hide_password=True)


_SECRET_OPTIONS = ("password", "sslpassword")


def resolve(settings: Settings) -> Database:
    """The configured server, or the embedded one started on demand."""
    if settings.database_url is not None:
        url = _parsed(settings.database_url.get_secret_value(), "SECLEDGER_DATABASE_URL")
        return Database(url, embedded=False)
    return Database(embedded.start(settings.pg_data_dir), embedded=True)


def migration_url(settings: Settings) -> str | None:
    """The owner login for migrations and rebuilds, when one is configured apart."""
    if settings.migration_database_url is None:
        return None
    url = settings.migration_database_url.get_secret_value()
    return _parsed(url, "SECLEDGER_MIGRATION_DATABASE_URL")


def _parsed(url: str, setting: str) -> str:
    """``url`` once it parses; ConfigError otherwise, without the parser's message, which
    may quote it: a password typed where the port belongs came out in a traceback."""
    try:
        make_url(url)
    except Exception:  # noqa: BLE001 - whatever the parser raises, its text is unsafe
        message = f"{setting} is not a valid database URL (not shown: it may hold a password)"
        if "," in url.partition("://")[2].partition("/")[0].rpartition("@")[2]:
            # libpq takes h1:p1,h2:p2 there; the URL parser in front of it does not.
            message += (
                "; for several hosts, name them in the query:"
                " postgresql://user@/db?host=h1:5432&host=h2:5432"
            )
        raise ConfigError(message) from None
    return url


def admin_url(settings: Settings, database: Callable[[], Database]) -> str:
    """The URL for owner-only work: the migration URL, else the ordinary one. The
    ordinary one is resolved only when needed: with none configured, resolving it starts
    the embedded server, which a release job holding only the migration URL must not."""
    return migration_url(settings) or database().url


# Advisory lock class of the handshake below (logins.py uses its own).
HANDSHAKE_CLASS = 0x5EC1ED02
_HOLD = text("SELECT pg_advisory_xact_lock(:cls, :key), current_database()")
_TRY = text("SELECT pg_try_advisory_xact_lock(:cls, :key), current_database()")


def check_same_urls(app_url: str, owner_url: str) -> None:
    """``check_same_database`` on two URLs (engines made and disposed of here)."""
    if app_url == owner_url:
        return
    app, owner = create(app_url, pool_size=1), create(owner_url, pool_size=1)
    try:
        check_same_database(app, owner)
    finally:
        app.dispose()
        owner.dispose()


def check_same_database(app: Engine, owner: Engine) -> None:
    """Refuse when SECLEDGER_MIGRATION_DATABASE_URL and SECLEDGER_DATABASE_URL name two
    databases (a restore into a new one, with one URL of the two updated): the owner's
    work (migrations, rebuild) went to the other one, and said it was done.

    A handshake, not a comparison of names or identifiers, which a restored physical
    copy shares with its original: the owner's session takes an advisory lock with a
    random key, which the receiver's session finds taken only in the same database.
    Where the receiver's URL cannot be used from here (a release job holding the owner's
    login only), nothing is refused.
    """
    key = secrets.randbits(31)
    try:
        mine = app.connect()
    except OperationalError:
        return
    with mine, owner.connect() as theirs, theirs.begin(), mine.begin():
        _, owner_name = theirs.execute(_HOLD, {"cls": HANDSHAKE_CLASS, "key": key}).one()
        taken, app_name = mine.execute(_TRY, {"cls": HANDSHAKE_CLASS, "key": key}).one()
    if taken:
        raise ConfigError(
            "SECLEDGER_MIGRATION_DATABASE_URL and SECLEDGER_DATABASE_URL name different"
            f" databases ({owner_name} and {app_name}, or one name on two servers): the"
            " owner's work would not reach the ledger the receiver writes; make them name one"
        )


def conninfo(url: str) -> str:
    """The same database as plain libpq understands it (for psycopg connections), with
    ``CONNECTION_DEFAULTS`` where it sets none: a keyword/value conninfo, made as the
    engine's own driver makes its connection arguments.

    A URL listing several hosts (``?host=db1:5432&host=db2:5432``, as docs/deployment.md
    advises without a writer endpoint) reaches libpq as ``host=db1,db2 port=5432,5432``;
    passed on as a URL, libpq read its last ``host`` alone, port and all, as one host
    name, and every LISTEN connection failed.
    """
    parsed = make_url(sqlalchemy_url(url))
    try:
        _args, options = parsed.get_dialect()().create_connect_args(parsed)
    except ArgumentError:
        # As create() says it, without the URL (its password): the engine, made first
        # by every caller, refuses such a URL before this is reached.
        raise ConfigError("the database URL is refused: its options are not usable") from None
    return make_conninfo(**options)
