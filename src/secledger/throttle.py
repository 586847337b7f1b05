"""Log lines anyone can cause, a few of each kind per interval and a count for the rest.

Whoever can reach the receiver can make it refuse, drop a connection or fail a form
check as often as they like. A line for each would let them fill the log and the disk
under it; ``/metrics`` counts every one, so the log needs only the first of each kind
and how many followed.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import structlog

# Past this many kinds in one interval, further ones share a single count: a kind built
# from a sender's input must not grow the table either.
MAX_KINDS = 256
OTHER: tuple[tuple[str, Any], ...] = (("kind", "other"),)


class Ticked(Protocol):
    """A summary that writes its line once its interval is over, asked by ``tick_all``."""

    def tick(self) -> None:
        """Write the summary line if the interval is over and it has something to say."""


# Every summary alive: serve ticks them (``tick_all``), so that a count is written when
# its minute ends, not at the next line of its kind, which may come hours later.
_SUMMARIES: weakref.WeakSet[Any] = weakref.WeakSet()


def keep_ticked(summary: Ticked) -> None:
    """Let ``tick_all`` write ``summary``'s line when its interval ends."""
    _SUMMARIES.add(summary)


def tick_all() -> None:
    """``tick`` every summary alive."""
    for summary in list(_SUMMARIES):
        summary.tick()


class Throttle:
    """Lets the first ``each`` lines of a kind through per ``interval``; counts the rest
    and writes one ``event`` line per kind with its count when the interval ends (at the
    next ``note`` or ``tick`` after it, or at ``flush``). Safe to share between threads.
    ``clock`` is the one the callers' ``now`` comes from."""

    def __init__(
        self,
        event: str,
        *,
        interval: float = 60.0,
        each: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.event = event
        self.clock = clock
        self.interval = interval
        self.each = each
        self.since: float | None = None
        self._logged: dict[Hashable, int] = {}
        self._suppressed: dict[tuple[tuple[str, Any], ...], int] = {}
        self._lock = threading.Lock()
        self._log = structlog.get_logger("secledger.throttle")
        keep_ticked(self)

    def tick(self) -> None:
        """Write the counts if the interval is over and something was suppressed."""
        now = self.clock()
        with self._lock:
            due = (
                self.since is not None
                and now - self.since >= self.interval
                and bool(self._suppressed)
            )
        if due:
            self.flush(now)

    def note(self, now: float, kind: tuple[tuple[str, Any], ...]) -> bool:
        """True when the caller should write its line; False when it was counted instead.

        ``kind`` is a tuple of (field, value) pairs, the summary line's fields.
        """
        with self._lock:
            due = self.since is not None and now - self.since >= self.interval
        if due:
            self.flush(now)
        with self._lock:
            if self.since is None:
                self.since = now
            if kind not in self._logged and len(self._logged) >= MAX_KINDS:
                kind = OTHER
            seen = self._logged.get(kind, 0)
            if seen < self.each:
                self._logged[kind] = seen + 1
                return True
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False

    def flush(self, now: float) -> None:
        """Write the count of each kind suppressed since the interval began; begin anew."""
        with self._lock:
            suppressed, self._suppressed = self._suppressed, {}
            self._logged.clear()
            since, self.since = self.since, now
        seconds = round(now - since, 1) if since is not None else 0.0
        for kind, count in sorted(suppressed.items(), key=lambda item: repr(item[0])):
            self._log.warning(self.event, **dict(kind), count=count, seconds=seconds)
