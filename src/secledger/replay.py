"""Replay protection for signed deliveries: signed messages seen recently, in memory.

A signed message is identified by ``(source, webhook-id, webhook-timestamp)``; the
signature covers both, so an attacker who captured a request can only resend it
byte for byte, and that is what is refused here within the tolerance window (older
messages fail the timestamp check). Keying on the timestamp too lets a legitimate
manual resend from GitLab, which is signed afresh, reach deduplication and be
answered ``duplicate`` instead of being counted as a failure by GitLab.

The cache is per process. Across replicas the guarantee that matters comes from
PostgreSQL: a signed delivery's dedup key is its signed webhook-id, so a replay sent
to another replica is answered ``duplicate`` and never stored twice. Only ids whose
signature verified are remembered, so unauthenticated traffic cannot fill the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime

from secledger.errors import ReplayedDelivery

DEFAULT_CAPACITY = 100_000


class ReplayGuard:
    """Signed messages seen within ``tolerance`` seconds, oldest first; bounded in size."""

    def __init__(self, tolerance: int, capacity: int = DEFAULT_CAPACITY) -> None:
        self.tolerance = tolerance
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, source: str, webhook_id: str, timestamp: str, *, now: datetime) -> None:
        """Remember this message, or raise ReplayedDelivery if it was seen in the window."""
        clock = now.timestamp()
        self._expire(clock)
        key = (source, webhook_id, timestamp)
        first = self._seen.get(key)
        if first is not None:
            raise ReplayedDelivery(
                f"this signed message (webhook-id and webhook-timestamp) was already "
                f"received {max(0, round(clock - first))} s ago"
            )
        self._seen[key] = clock
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def _expire(self, clock: float) -> None:
        # Twice the tolerance, and a second: a message may arrive up to `tolerance` early
        # or late, and the timestamp check compares whole seconds (``int(now)``), so it
        # accepts a message for 2 * tolerance + 1 s.
        horizon = clock - 2 * self.tolerance - 1
        while self._seen:
            key, seen_at = next(iter(self._seen.items()))
            if seen_at >= horizon:
                return
            del self._seen[key]
