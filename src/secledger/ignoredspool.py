"""Spooled deliveries a drain left out, kept in the spool's ``ignored/`` and judged again.

While a spool holds anything, every merge-request delivery is spooled, and its drain
leaves out those of MRs that are not security MRs. The delivery that makes such an MR a
security MR may still be in another replica's spool, drained minutes later. So a drain
moves the files it leaves out to ``ignored/`` (``Spool.keep_ignored``), and they are
judged again once their MR is known, as the receiver judges a delivery it ignored a
moment too early (``receiptorder.came_after``): one received after the MR's first logged
delivery goes back into the queue, to be recorded; one received before is deleted, as
rightly left out. One whose MR is still unknown after the hold is deleted.

This needs no process to live on: ``serve`` sweeps at start and every few seconds
(``recorder``), ``secledger spool drain`` at its start, each holding the drain lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import Engine

from secledger.errors import IntakeError
from secledger.extract import MRKey, event_time, mr_key
from secledger.intake import Delivery, Ignored
from secledger.membership import KnownMRs
from secledger.receiptorder import came_after
from secledger.recentignored import DRAINED_HOLD_SECONDS
from secledger.spool import CORRUPT, FAILED, CorruptEntry, Spool, SpooledDelivery
from secledger.store import ledger

# Files read (and decoded) per sweep, at most: after a long outage ignored/ may hold
# hundreds of thousands, and the writer thread, which sweeps, answers deliveries too.
READS_PER_SWEEP = 2000


class _Kept(NamedTuple):
    key: MRKey
    received_at: datetime
    event_at: datetime
    moved_at: float  # time.time() when the drain moved it to ignored/


@dataclass
class Swept:
    """What one sweep did with the files of ``ignored/``."""

    queued: int = 0  # put back in the queue: its MR is known and it came after
    left: int = 0  # deleted: its MR is known, and it came before (rightly left out)
    expired: int = 0  # deleted: its MR still unknown after the hold
    waiting: int = 0  # kept: within its hold, not recorded yet
    unread: int = 0  # not looked at: past the files read in one sweep

    def changed(self) -> bool:
        """Whether a file was moved or deleted."""
        return bool(self.queued or self.left or self.expired)

    def fields(self) -> dict[str, int]:
        """For a log line."""
        return asdict(self)


class IgnoredFiles:
    """The files of one spool's ``ignored/``, each read once (an index by file name)."""

    def __init__(
        self,
        spool: Spool,
        engine: Engine,
        known: KnownMRs | None,
        *,
        read: Callable[[SpooledDelivery], Delivery | Ignored],
        unreadable: Callable[[Path, str, str], None],
        hold_seconds: float = DRAINED_HOLD_SECONDS,
    ) -> None:
        self._spool = spool
        self._engine = engine
        self._known = known
        self._read = read
        self._unreadable = unreadable
        self.hold_seconds = hold_seconds
        self._index: dict[str, _Kept] = {}

    def sweep(self, now: float | None = None) -> Swept:
        """Queue again the files whose MR is known now and that came after its first
        logged delivery; at the end of a file's hold, delete it if it did not (the first
        receipt may still move earlier while another replica drains). Call it holding
        the drain lock."""
        swept = Swept()
        files, swept.unread = self._current()
        if not files:
            return swept
        expired_before = (time.time() if now is None else now) - self.hold_seconds
        keys = {kept.key for _, kept in files}
        known = {key for key in keys if key in self._known} if self._known is not None else None
        ending = {kept.key for _, kept in files if kept.moved_at < expired_before}
        if known is not None and not known and not ending:
            swept.waiting = len(files)
            return swept  # nothing to judge, and no need to reach the database
        with self._engine.connect() as conn:
            if known is None:
                known = ledger.known_among(conn, keys)
            elif ending - known:
                # A file is deleted on the database's word, not only on this process's.
                known |= ledger.known_among(conn, ending - known)
            firsts = {key: ledger.first_receipt(conn, key) for key in known}
        queued: list[Path] = []
        for path, kept in files:
            first = firsts.get(kept.key)
            expired = kept.moved_at < expired_before
            if first is not None and came_after(kept.received_at, kept.event_at, *first):
                queued.append(path)
            elif not expired:
                swept.waiting += 1
            elif first is None:
                self._forget(path)
                swept.expired += 1
            else:
                self._forget(path)
                swept.left += 1
        if queued:
            self._spool.requeue_ignored(queued)
            for path in queued:
                self._index.pop(path.name, None)
            swept.queued = len(queued)
        return swept

    def _forget(self, path: Path) -> None:
        self._spool.forget_ignored(path)
        self._index.pop(path.name, None)

    def _current(self) -> tuple[list[tuple[Path, _Kept]], int]:
        """The files there now, in name order; a new one is read, an unreadable one set aside."""
        paths = self._spool.ignored_paths()
        present = {path.name for path in paths}
        for name in [name for name in self._index if name not in present]:
            del self._index[name]
        files = []
        reads = unread = 0
        for path in paths:
            kept = self._index.get(path.name)
            if kept is None:
                if reads >= READS_PER_SWEEP:
                    unread += 1
                    continue  # the next sweep reads on: the writer must not stall long
                reads += 1
                kept = self._load(path)
                if kept is None:
                    continue
                self._index[path.name] = kept
            files.append((path, kept))
        return files, unread

    def _load(self, path: Path) -> _Kept | None:
        try:
            moved_at = path.stat().st_mtime
            delivery = self._read(self._spool.read(path))
        except FileNotFoundError:
            return None
        except CorruptEntry as exc:
            self._unreadable(path, CORRUPT, f"corrupt spool file in ignored/: {exc}")
            return None
        except IntakeError as exc:
            self._unreadable(path, FAILED, f"rejected on drain from ignored/: {exc}")
            return None
        if isinstance(delivery, Ignored):  # it was read as a merge request before
            self._unreadable(path, FAILED, f"ignored on drain from ignored/: {delivery.reason}")
            return None
        event_at = event_time(delivery.payload, delivery.received_at)[0]
        return _Kept(mr_key(delivery), delivery.received_at, event_at, moved_at)
