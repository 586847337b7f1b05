"""What the writer reads under the chain lock before recording a batch, in one round trip."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import Cursor
from sqlalchemy import Connection

from secledger.extract import EventFacts, MRKey
from secledger.intake import Delivery
from secledger.projection import SequencedEvent
from secledger.store import eventcache, ledger
from secledger.store.eventcache import EMPTY, EventCache, Fingerprint
from secledger.store.log import Chain, Logged
from secledger.store.pipeline import Pg, lookup, pipeline


@dataclass
class Seen:
    """What the database holds about a batch's deliveries."""

    head: Cursor[Any] | None
    known: set[MRKey]
    logged: Logged
    events: dict[MRKey, list[SequencedEvent]]
    # With a cache: each MR's fingerprint before this batch, and this transaction's xid.
    prints: dict[MRKey, Fingerprint] = field(default_factory=dict)
    xid: int = 0

    def opened(self) -> Chain:
        """The chain whose lock and head this read took."""
        if self.head is None:
            raise RuntimeError("this read did not take the chain lock")
        return Chain.opened(self.head)

    def remember(self, cache: EventCache, added: dict[MRKey, list[int]]) -> None:
        """Stage every MR's events (``added``: the seqs this batch gave each) in ``cache``."""
        for key, events in self.events.items():
            before = self.prints.get(key, EMPTY)
            cache.stage(key, events, before.after(added.get(key, []), self.xid))


def read(
    conn: Connection,
    items: Sequence[tuple[Delivery, EventFacts]],
    *,
    lock: bool,
    cache: EventCache | None = None,
    begin: bool = False,
    rollback: bool = False,
) -> Seen:
    """The chain lock and head (with ``lock``), which doubtful MRs have a ledger row, which
    deliveries are already logged (by dedup key or body), and every event of each MR in
    the batch.

    With ``cache``, events come from it for each MR whose fingerprint still matches; the
    rest are read, in the same round trip unless a cached MR turns out to have changed.
    With ``begin``, a BEGIN goes first (a writer connection in autocommit mode), after a
    ROLLBACK of the transaction left open, with ``rollback``.
    """
    with pipeline(conn) as pg:
        if rollback:
            pg.execute("ROLLBACK")
        pending = send(pg, items, lock=lock, cache=cache, begin=begin)
    seen = pending.finish(conn)
    assert seen is not None  # noqa: S101 - the lock was waited for, not tried
    return seen


@dataclass
class Pending:
    """The reads of ``send``, sent but not yet synced; ``finish`` once they have been."""

    cache: EventCache | None
    cached: set[MRKey]
    taken: Cursor[Any] | None  # whether a lock that was tried without waiting was taken
    head: Cursor[Any] | None
    known: Cursor[Any] | None
    logged: Cursor[Any]
    prints: Cursor[Any] | None
    events: Cursor[Any] | None
    xid: Cursor[Any] | None

    def finish(self, conn: Connection) -> Seen | None:
        """What was read (one more round trip only when a cached MR has changed); None
        when the lock was tried and another session held it (the reads are void)."""
        if self.taken is not None and not self.taken.fetchone()[0]:  # type: ignore[index]
            return None
        seen = Seen(
            head=self.head,
            known=ledger.known_from(self.known.fetchall()) if self.known is not None else set(),
            logged=Logged.from_rows(self.logged.fetchall()),
            events=ledger.events_from(self.events.fetchall()) if self.events is not None else {},
        )
        if self.cache is not None and self.prints is not None and self.xid is not None:
            _from_cache(conn, seen, self.cache, self.cached, self.prints.fetchall())
            seen.xid = int(self.xid.fetchone()[0])  # type: ignore[index]
        return seen


def send(
    pg: Pg,
    items: Sequence[tuple[Delivery, EventFacts]],
    *,
    lock: bool,
    cache: EventCache | None = None,
    begin: bool = False,
    wait: bool = True,
) -> Pending:
    """Queue the reads of ``read`` on a pipeline (after a BEGIN, with ``begin``).

    Without ``wait`` the lock is only tried: a statement waiting for it would hold back
    every result before it in the same round trip (the writer's previous commit).
    """
    doubtful = {facts.key for _, facts in items if not facts.is_security}
    keys = {facts.key for _, facts in items}
    cached = {key for key in keys if key in cache} if cache is not None else set()
    fetch = keys - cached
    if begin:
        pg.execute("BEGIN")
    taken = head = None
    if lock and wait:
        head = Chain.send_open(pg)
    elif lock:
        taken, head = Chain.send_try_open(pg)
    known = lookup(pg, ledger.KNOWN_AMONG, ledger.keys_params(doubtful)) if doubtful else None
    logged = Logged.send_lookup(pg, [delivery for delivery, _ in items])
    prints = lookup(pg, eventcache.FINGERPRINTS, ledger.keys_params(keys)) if cache else None
    events = lookup(pg, ledger.EVENTS_OF_MANY, ledger.keys_params(fetch)) if fetch else None
    xid = pg.execute(eventcache.XID) if cache else None
    return Pending(cache, cached, taken, head, known, logged, prints, events, xid)


def _from_cache(
    conn: Connection,
    seen: Seen,
    cache: EventCache,
    cached: set[MRKey],
    rows: list[tuple[Any, ...]],
) -> None:
    seen.prints = eventcache.fingerprints(rows)
    stale: list[MRKey] = []
    for key in cached:
        events = cache.valid(key, seen.prints.get(key, EMPTY))
        if events is None:
            stale.append(key)
        else:
            seen.events[key] = list(events)
    if stale:  # written by someone else since: read again (one more round trip)
        seen.events |= ledger.events_by_mr(conn, stale)
