"""The writer's memory of recently written merge requests' events, checked against the table.

Folding a delivery needs every event of its merge request. Reading them back each
batch (and decoding their JSON) was the largest part of the writer's work, although
this writer had just written most of them. So it keeps them, and under the chain lock
trusts them only when the table still agrees: same number of events, same highest
seq, same newest row version (``xmin``). Anything else that wrote or rewrote an event
of that merge request (another replica, backfill, the spool drain, a repair) changes
one of the three, and the events are read again. Entries are only added after the
transaction that wrote them has committed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from secledger.extract import MRKey
from secledger.projection import SequencedEvent
from secledger.quickinit import quick

# Read in the same pipeline as the events, and before them, so that a fingerprint can
# only be older than the events it is stored with (a later check then reads again).
FINGERPRINTS = (
    "SELECT instance, project_id, mr_iid, count(*), max(seq), max(xmin::text::bigint)"
    " FROM review_events WHERE (instance, project_id, mr_iid) IN (SELECT * FROM unnest("
    "%(instances)b::text[], %(project_ids)s::bigint[], %(mr_iids)s::bigint[]))"
    " GROUP BY instance, project_id, mr_iid"
)
# The xid this transaction's rows get as xmin (32 bits, as the xmin column shows it).
XID = "SELECT txid_current() % 4294967296"
DEFAULT_SIZE = 4096


@quick
@dataclass(frozen=True)
class Fingerprint:
    """What the table says about one merge request's events."""

    count: int
    last_seq: int
    xmin: int

    def after(self, seqs: list[int], xid: int) -> Fingerprint:
        """The fingerprint once this transaction's events ``seqs`` are added."""
        if not seqs:
            return self
        return Fingerprint(self.count + len(seqs), max(self.last_seq, *seqs), max(self.xmin, xid))


EMPTY = Fingerprint(0, 0, 0)


def fingerprints(rows: Iterable[tuple[Any, ...]]) -> dict[MRKey, Fingerprint]:
    """``FINGERPRINTS`` rows by merge request."""
    return {
        MRKey(instance, project_id, mr_iid): Fingerprint(int(count), int(last), int(xmin))
        for instance, project_id, mr_iid, count, last, xmin in rows
    }


@quick
@dataclass(frozen=True)
class Cached:
    """One merge request's events and the fingerprint they were read or written under."""

    events: tuple[SequencedEvent, ...]
    fingerprint: Fingerprint


class EventCache:
    """A bounded, least-recently-used map of merge request to events (one writer thread)."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[MRKey, Cached] = OrderedDict()
        self._staged: dict[MRKey, Cached] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def valid(self, key: MRKey, now: Fingerprint) -> tuple[SequencedEvent, ...] | None:
        """The cached events of ``key`` if the table still has exactly them."""
        entry = self._entries.get(key)
        if entry is None or entry.fingerprint != now:
            return None
        self._entries.move_to_end(key)
        return entry.events

    def stage(self, key: MRKey, events: list[SequencedEvent], fingerprint: Fingerprint) -> None:
        """Remember ``events`` once the current transaction commits."""
        self._staged[key] = Cached(tuple(events), fingerprint)

    def commit(self) -> None:
        """The transaction committed: keep what it staged."""
        for key, entry in self._staged.items():
            self._entries[key] = entry
            self._entries.move_to_end(key)
        self._staged.clear()
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def discard(self) -> None:
        """The transaction failed: forget what it staged."""
        self._staged.clear()
