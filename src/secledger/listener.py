"""``LISTEN secledger_ledger`` as a wake-up signal for readers that follow the ledger.

A notification only says "something was committed, look again": ``watch`` and the sink
sender always read what changed from the tables, so a notification lost while a
connection was down costs latency, never data.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import psycopg
from sqlalchemy.exc import DBAPIError, OperationalError

CHANNEL = "secledger_ledger"
# How often a waiting reader looks at its stop flag; bounds how long a clean stop takes.
STOP_CHECK_SECONDS = 0.25


def is_connection_error(exc: BaseException) -> bool:
    """True for a lost or refused database connection (worth reconnecting for)."""
    if isinstance(exc, psycopg.OperationalError | OperationalError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def is_unreachable(error: BaseException) -> bool:
    """No connection, or one the server ended: no SQLSTATE (libpq's own failure),
    class 08 (connection exception), or 57P01-57P03 (shut down, cannot connect now).
    Not a timeout, a deadlock or a full disk: the server answered. ``error`` is the
    driver's exception (a wrapper's ``orig``)."""
    state = getattr(error, "sqlstate", None)
    return state is None or state.startswith("08") or state in {"57P01", "57P02", "57P03"}


class Listener:
    """One autocommit connection listening on the ledger channel."""

    def __init__(self, conninfo: str) -> None:
        self._conn = psycopg.connect(conninfo, autocommit=True)
        self._conn.execute(f"LISTEN {CHANNEL}")

    def __enter__(self) -> Listener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Block until a notification, ``timeout`` seconds or ``stop``; True if notified."""
        remaining = timeout
        while remaining > 0 and not stop.is_set():
            step = min(STOP_CHECK_SECONDS, remaining)
            if any(True for _ in self._conn.notifies(timeout=step, stop_after=1)):
                self._drain_queued()
                return True
            remaining -= step
        return False

    def pause(self, seconds: float, stop: threading.Event) -> None:
        """Wait ``seconds`` (or for ``stop``) whatever is notified, reading what is: a
        listener left unread holds PostgreSQL's notification queue, which every
        recording's commit writes to, from being trimmed."""
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.wait(remaining, stop)

    def _drain_queued(self) -> None:
        # A burst of commits is one wake-up: the reader catches up on all of them at once.
        for _ in self._conn.notifies(timeout=0):
            pass

    def close(self) -> None:
        """Close the connection (UNLISTEN is implicit)."""
        self._conn.close()
