"""``secledger watch``: ledger changes as JSON lines, caught up from the database.

The database is the source: on start, after every wake-up and after every reconnect the
watcher reads every seq above the last one it emitted (``store.changes.after``);
``LISTEN`` only tells it when to look again. Each line is flushed; the state file is
written once per read (a page of the catch-up, or one wake-up), after its lines, so a
restarted watcher resumes after the last saved line: no gap, no repeat after a clean
stop, and after a crash at most the lines of the read in hand again.

Several seqs of one merge request read together (a catch-up, or one group commit) make
one line: the MR's row as it is now, at the position of its highest seq, listing every
seq it covers in ``seqs``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson
import psycopg
import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from secledger.errors import SecledgerError
from secledger.extract import MRKey
from secledger.listener import Listener, is_connection_error
from secledger.service import ledger_json
from secledger.store import changes

log = structlog.get_logger("secledger.watch")

PAGE = 1000
HASH_BYTES = 32  # SHA-256


class StateFileError(SecledgerError):
    """The state file exists but does not hold a last seq."""


class LogReplaced(SecledgerError):
    """The log the watcher followed is not the database's any more."""


@dataclass(frozen=True)
class Change:
    """One emitted line: a merge request's current row and the seqs it covers."""

    seq: int
    seqs: tuple[int, ...]
    key: MRKey
    row: dict[str, object] | None
    hash: bytes = b""  # the chain hash of the log row at ``seq``

    def to_json(self) -> dict[str, Any]:
        """The JSON object written as one line."""
        return {
            "seq": self.seq,
            "seqs": list(self.seqs),
            "instance": self.key.instance,
            "project_id": self.key.project_id,
            "mr_iid": self.key.mr_iid,
            "ledger": ledger_json(self.row) if self.row is not None else None,
        }


def coalesce(rows: Iterable[changes.SeqRow]) -> list[Change]:
    """One change per merge request, ordered by its highest seq."""
    seqs: dict[MRKey, list[int]] = {}
    latest: dict[MRKey, changes.SeqRow] = {}
    for item in rows:
        seqs.setdefault(item.key, []).append(item.seq)
        latest[item.key] = item
    found = [
        Change(max(s), tuple(s), key, latest[key].row, latest[key].hash) for key, s in seqs.items()
    ]
    return sorted(found, key=lambda change: change.seq)


@dataclass(frozen=True)
class Position:
    """What a state file holds: the last emitted seq and its log row's chain hash (None
    in files written before the hash was kept)."""

    seq: int
    hash: bytes | None


class StateFile:
    """The last emitted seq and its chain hash, replaced atomically (temp file, fsync,
    rename). The hash tells the log the seq was of from a log restored from an older
    backup and written on since, whose rows took the same seqs again."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> int | None:
        """The saved seq, or None when there is no state yet."""
        position = self.position()
        return None if position is None else position.seq

    def position(self) -> Position | None:
        """The saved seq and hash, or None when there is no state yet."""
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except orjson.JSONDecodeError as exc:
            raise StateFileError(f"{self.path} is not a watch state file") from exc
        seq = data.get("last_seq") if isinstance(data, dict) else None
        # ``true`` is an int to isinstance(), and was taken for seq 1.
        if type(seq) is not int or seq < 0:
            raise StateFileError(f"{self.path} has no valid last_seq")
        saved = data.get("hash")
        if saved is None:
            return Position(seq, None)
        try:
            chained = bytes.fromhex(saved) if isinstance(saved, str) else b""
        except ValueError:
            chained = b""
        if len(chained) != HASH_BYTES:
            raise StateFileError(f"{self.path} has no valid hash")
        return Position(seq, chained)

    def probe(self) -> None:
        """Raise StateFileError now when the state could not be saved (no such directory,
        no permission), rather than after the first lines went out."""
        temp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with temp.open("wb"):
                pass
            temp.unlink()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise StateFileError(f"cannot save the state file {self.path}: {reason}") from None

    def save(self, seq: int, chained: bytes | None = None) -> None:
        """Replace the file with ``seq`` (and the hash of its log row); after a crash it
        holds the old or the new value."""
        data: dict[str, Any] = {"last_seq": seq}
        if chained:
            data["hash"] = chained.hex()
        temp = self.path.with_name(f".{self.path.name}.tmp")
        with temp.open("wb") as handle:
            handle.write(orjson.dumps(data) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        # The rename is atomic; its durability is not needed (no directory fsync): after
        # a power loss the old value can come back, which repeats lines, never skips one.
        temp.replace(self.path)


@dataclass
class Watcher:
    """Emits every change after ``last_seq`` to ``out``, then follows new ones."""

    engine: Engine
    conninfo: str
    out: TextIO
    last_seq: int
    stop: threading.Event
    state: StateFile | None = None
    poll_seconds: float = 5.0
    reconnect_max_seconds: float = 30.0
    emitted: int = 0
    last_hash: bytes | None = None  # of the log row at last_seq, once a line is written
    # Times it connected and caught up: a retry delay starts again from 1 s after one.
    _connections: int = field(default=0, init=False)

    def run(self) -> None:
        """Catch up and follow until ``stop`` is set; reconnects after database errors."""
        delay = 1.0
        while not self.stop.is_set():
            connected = self._connections
            try:
                self._follow()
            except (psycopg.OperationalError, DBAPIError) as exc:
                if not is_connection_error(exc):
                    raise
                if self._connections != connected:
                    delay = 1.0  # it had followed again: a new outage starts from 1 s
                log.warning("watch_reconnecting", error=type(exc).__name__, in_seconds=delay)
                self.stop.wait(delay)
                delay = min(delay * 2, self.reconnect_max_seconds)
            else:
                return

    def _follow(self) -> None:
        # LISTEN before catching up: a commit between the two wakes us, so none is missed.
        with Listener(self.conninfo) as listener:
            self.check_same_log()
            self.catch_up()
            self._connections += 1
            while not self.stop.is_set():
                listener.wait(self.poll_seconds, self.stop)
                # At every wake-up, not only on connecting: `pg_restore --clean` into the
                # live database leaves this process's connections as they were.
                self.check_same_log()
                self.catch_up()

    def check_same_log(self) -> None:
        """Raise LogReplaced when the log's row at ``last_seq`` is not the one this watcher
        went past: the database was restored from an older backup while it was away (a
        reconnect), and the seqs it would skip are other deliveries. On the first
        connection, remember that row's hash."""
        if self.last_seq <= 0:
            return
        with self.engine.connect() as conn:
            found = changes.hash_at(conn, self.last_seq)
        if self.last_hash is None and self._connections == 0:
            self.last_hash = found
            return
        if self.last_hash is not None and found != self.last_hash:
            raise LogReplaced(
                f"the log's row at seq {self.last_seq}, the last one emitted, is"
                f" {'gone' if found is None else 'another one'} since"
                " (the database restored from an older backup?); lines after it were not"
                " written: restart watch with --from-seq to say where to resume"
            )

    def catch_up(self) -> None:
        """Emit every change after ``last_seq`` committed so far, saving once per read."""
        while not self.stop.is_set():
            with self.engine.connect() as conn:
                rows = changes.after(conn, self.last_seq, PAGE)
            saved = self.last_seq
            # One fsync per read instead of per line (it bounded a catch-up at a few
            # hundred lines/s). The finally also saves the lines flushed before a stop or
            # a broken pipe, so neither repeats them.
            try:
                for change in coalesce(rows):
                    if self.stop.is_set():
                        return
                    self.emit(change)
            finally:
                if self.last_seq != saved:
                    self.save()
            if len(rows) < PAGE:
                return

    def emit(self, change: Change) -> None:
        """Write one line, flush it, then remember its seq (saved by ``save``)."""
        self.out.write(orjson.dumps(change.to_json()).decode() + "\n")
        self.out.flush()
        self.last_seq = change.seq
        self.last_hash = change.hash or None
        self.emitted += 1

    def save(self) -> None:
        """Save ``last_seq``; every line up to it has been flushed by ``emit``."""
        if self.state is not None:
            self.state.save(self.last_seq, self.last_hash)
