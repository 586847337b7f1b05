"""Deliveries answered ``ignored`` a moment ago, held in case their MR turns out known.

The receiver ignores a delivery without a security label when its MR is not in the
known set (``membership``). An MR recorded for the first time elsewhere (another
replica) is missing from that set until its NOTIFY arrives, and one recorded by this
replica's writer until the write commits. A delivery for it without a security label in
that window (its label removed in between, say) would be lost. Held here, bounded in
bytes and (while newer ones come) in age, it is recorded once its MR's key is learnt.
Of one forgotten before that, the MR and the receipt and event times are kept a while
longer, so that a loss is reported instead of passing unseen (``recheck``).

Only the event loop's thread changes a ``RecentlyIgnored``: no lock on the hot path.
Other threads may ask whether it is ``watching`` (atomic under the interpreter lock)
before they disturb the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from secledger.extract import MRKey, Stamps
from secledger.intake import Delivery, Verified
from secledger.times import isoformat

# Long enough for a batch to commit and its NOTIFY to arrive under load, and for the
# writer of another replica to get through a spool drain's first batches.
HOLD_SECONDS = 5.0
# About 25 bodies of 10 KB: a tenth of a second at 250 ignored deliveries a second, many
# times what a commit and its notification take. Held bodies are memory the allocator
# cannot hand out again while they are held: 16 MiB cost the ignored path 12 points of
# its ratio to the ceiling under `make bench` load (89 % to 77 %).
HOLD_BYTES = 2**18
# MRs of forgotten deliveries, with the newest one's receipt and event times: at least
# half of this many (2048 keys: about 8 s of ignored deliveries at 250 a second, each
# for another MR), at most all of it.
FORGOTTEN_KEYS = 4096
# Deliveries the spool's drain found ignored: the delivery that makes their MR a
# security one may still be in another replica's spool, drained seconds or minutes
# later. Held here to be recorded at once; their files in the spool's ignored/ keep
# them through a restart or past this limit (``ignoredspool``).
DRAINED_HOLD_SECONDS = 300.0
DRAINED_HOLD_BYTES = 2**25


class Held(NamedTuple):
    """An ignored delivery, as it was received."""

    at: float  # time.monotonic() when it was held
    key: MRKey
    headers: Mapping[str, str]
    body: bytes
    received_at: datetime
    verified: Verified | None
    stamps: Stamps  # what the event's time in GitLab is read from (``extract.event_stamps``)
    # The delivery itself when it was built already (by the writer or the spool's
    # drain, whose identity from the time of receipt must be kept); None on the hot path.
    delivery: Delivery | None = None


Entry = tuple[
    float, MRKey, Mapping[str, str], bytes, datetime, Verified | None, Stamps, Delivery | None
]
Forgotten = tuple[datetime, Stamps]  # receipt time, event time stamps


@dataclass(frozen=True)
class Lost:
    """A forgotten delivery that should have been recorded (``recheck``), for recovery."""

    key: MRKey
    received_at: datetime
    first_received_at: datetime  # the MR's first logged delivery's

    def fields(self) -> dict[str, object]:
        """What a log line says of it."""
        return {
            "instance": self.key.instance,
            "project_id": self.key.project_id,
            "mr_iid": self.key.mr_iid,
            "received_at": isoformat(self.received_at),
            "first_received_at": isoformat(self.first_received_at),
        }


class RecentlyIgnored:
    """The ignored deliveries of the last ``seconds``, at most ``max_bytes`` of bodies."""

    def __init__(
        self,
        seconds: float = HOLD_SECONDS,
        max_bytes: int = HOLD_BYTES,
        forgotten_keys: int = FORGOTTEN_KEYS,
    ) -> None:
        self.seconds = seconds
        self.max_bytes = max_bytes
        self.forgotten_keys = forgotten_keys
        # Plain tuples: holding is on the path of every ignored delivery.
        self._held: deque[Entry] = deque()
        self._bytes = 0
        # Two generations, the newer one first: forgetting is one dict store, and the
        # older generation is dropped whole when the newer one is full.
        self._forgotten: dict[MRKey, Forgotten] = {}
        self._forgotten_before: dict[MRKey, Forgotten] = {}

    def __len__(self) -> int:
        """How many deliveries are held (safe to ask from any thread)."""
        return len(self._held)

    @property
    def watching(self) -> bool:
        """Whether a key learnt now could concern anything here, held or forgotten (safe
        to ask from any thread). Forgotten MRs are not let go by age: once anything was
        ignored, every MR learnt wakes the event loop, and the database is read for each
        one held or forgotten here (new security MRs are few)."""
        return bool(self._held) or bool(self._forgotten) or bool(self._forgotten_before)

    def hold(self, entry: Entry) -> None:
        """Keep one ignored delivery, ``(at, key, headers, body, received_at, verified,
        stamps, delivery)`` as ``Held`` names them; forget the oldest past the age or size
        limit. A body larger than the limit is not held, only noted as forgotten: it would
        push out everything else."""
        if len(entry[3]) > self.max_bytes:
            self._forget(entry)
            return
        held = self._held
        held.append(entry)
        at = entry[0]
        self._bytes += len(entry[3])
        if self._bytes > self.max_bytes or held[0][0] < at - self.seconds:
            self._expire(at)

    def take(self, keys: Collection[MRKey]) -> list[Held]:
        """Remove and return, oldest first, the held deliveries of MRs in ``keys``, of
        any age: a body still here is recorded rather than reported lost."""
        taken = [Held(*entry) for entry in self._held if entry[1] in keys]
        if taken:
            self._held = deque(entry for entry in self._held if entry[1] not in keys)
            self._bytes = sum(len(entry[3]) for entry in self._held)
        return taken

    def take_forgotten(self, keys: Collection[MRKey]) -> dict[MRKey, Forgotten]:
        """Remove and return, of the MRs in ``keys``, the receipt time and event time
        stamps of the newest delivery forgotten (not held any more, or never held)."""
        taken: dict[MRKey, Forgotten] = {}
        for generation in (self._forgotten_before, self._forgotten):
            for key in keys:
                found = generation.pop(key, None)
                if found is not None and (key not in taken or found[0] > taken[key][0]):
                    taken[key] = found
        return taken

    def _expire(self, now: float) -> None:
        held = self._held
        oldest = now - self.seconds
        while held and (self._bytes > self.max_bytes or held[0][0] < oldest):
            # Remembered before it leaves: another thread must never find both empty.
            self._forget(held[0])
            self._bytes -= len(held.popleft()[3])

    def _forget(self, entry: Entry) -> None:
        forgotten = self._forgotten
        key, received_at = entry[1], entry[4]
        kept = forgotten.get(key)
        # A body too large to hold is forgotten on arrival, before older held ones.
        if kept is None or kept[0] <= received_at:
            forgotten[key] = (received_at, entry[6])
        if len(forgotten) * 2 >= self.forgotten_keys:
            self._forgotten_before, self._forgotten = forgotten, {}
