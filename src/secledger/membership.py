"""Which merge requests are already in the ledger, kept in memory for the hot path.

Most deliveries are for merge requests that never carried a security label; they
must be answered without a database round trip. A merge request that *was* a
security MR stays one after its label is removed, so the receiver remembers every
ledger key: loaded at start, added on each local write, on every
``NOTIFY secledger_ledger`` from other replicas, and read again whenever the listener
(re)connects. A delivery without a security label for a key missing here is answered
``ignored`` without reaching ``service.record``, so a missed key would lose, for
example, the merge of an MR whose label was removed: the set must not miss one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
import structlog
from sqlalchemy import Engine

from secledger.extract import MRKey
from secledger.store import ledger

log = structlog.get_logger("secledger.membership")


class KnownMRs:
    """A thread-safe set of ledger keys."""

    def __init__(self) -> None:
        self._keys: set[MRKey] = set()
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        # Told the keys added after load(), from whichever thread adds them (the web
        # edge records ignored deliveries of an MR that has just become known).
        self.on_new: Callable[[list[MRKey]], None] | None = None

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: MRKey) -> None:
        """Remember one key."""
        if key in self._keys:  # nearly always, on the hot path: no lock to take
            return
        with self._lock:
            new = key not in self._keys
            self._keys.add(key)
        if new:
            self._tell([key])

    def load(self, engine: Engine) -> None:
        """Read every key from the ledger."""
        with engine.connect() as conn:
            keys = set(ledger.known_keys(conn))
        with self._lock:
            self._keys |= keys

    def listen(self, conninfo: str) -> None:
        """Follow other replicas' writes in a background thread."""
        self._listener = threading.Thread(
            target=self._follow, args=(conninfo,), name="secledger-listen", daemon=True
        )
        self._listener.start()

    def close(self) -> None:
        """Stop following."""
        self._stop.set()

    def _follow(self, conninfo: str) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute("LISTEN secledger_ledger")
                    # Notifications sent before LISTEN (between load() and now, or while
                    # the connection was lost) are gone: read the keys again once listening.
                    self._reload(conn)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._take(note.payload)
            except psycopg.Error as exc:
                if self._stop.is_set():  # closed, and the server went first (at exit)
                    return
                log.warning("listen_lost", error=type(exc).__name__)
                self._stop.wait(2.0)
            except Exception as exc:
                # Not a database error: a bug, or a driver unlike the one tested. A dead
                # follower would miss keys silently: it goes on all the same, and says so.
                log.exception("listen_failed", error=type(exc).__name__, detail=str(exc)[:300])
                self._stop.wait(2.0)

    def _reload(self, conn: psycopg.Connection[Any]) -> None:
        # Named with its schema: this raw connection does not get db.create's search path.
        rows = conn.execute(
            "SELECT instance, project_id, mr_iid FROM public.security_review_ledger"
        )
        keys = {MRKey(instance, project_id, mr_iid) for instance, project_id, mr_iid in rows}
        with self._lock:
            new = keys - self._keys
            self._keys |= keys
        if new:
            self._tell(sorted(new))

    def _tell(self, keys: list[MRKey]) -> None:
        told = self.on_new
        if told is None:
            return
        try:
            told(keys)
        except RuntimeError:  # the event loop is closing: nothing is held any more
            log.debug("new_keys_not_told", keys=len(keys))

    def _take(self, payload: str) -> None:
        try:
            data: dict[str, Any] = orjson.loads(payload)
            self.add(MRKey(data["instance"], int(data["project_id"]), int(data["mr_iid"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("bad_notification")
