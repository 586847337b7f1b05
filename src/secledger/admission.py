"""How many deliveries, and how many body bytes, the receiver holds at once.

Two limits: a count (``max_concurrent_deliveries``) and the sum of the bodies' declared
lengths (``max_inflight_body_bytes``). The byte budget is what bounds memory, whatever
the bodies' sizes, so the count can be high enough for the group commit to gather
large batches of ordinary (~10 KB) deliveries. A delivery is always admitted when
nothing else is in progress, so a body up to ``max_body_bytes`` still gets through.
Admission is first come, first served: a large delivery waiting for bytes is not
overtaken by small ones arriving after it.
"""

from __future__ import annotations

import asyncio
from collections import deque

from secledger.errors import Saturated


class Admission:
    """Slots for deliveries in progress; ``enter`` waits up to ``wait`` seconds, then refuses."""

    def __init__(
        self, count: int, budget: int, wait: float, *, max_waiting: int | None = None
    ) -> None:
        self.count = count
        self.budget = budget
        self.wait = wait
        # Past this many waiting, refused at once: a request waiting is one the server
        # holds (uvicorn's limit on requests in progress counts it), and for requests
        # nothing has proved, anyone could fill that limit with them.
        self.max_waiting = max_waiting
        self.active = 0
        self.held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, size: int) -> bool:
        if self.active >= self.count:
            return False
        return self.active == 0 or self.held + size <= self.budget

    def _take(self, size: int) -> None:
        self.active += 1
        self.held += size

    def try_enter(self, size: int) -> bool:
        """Take a slot at once if one is free and nobody waits; False otherwise (then
        ``await enter``). The usual case, without creating a coroutine."""
        if not self._waiters and self._fits(size):
            self._take(size)
            return True
        return False

    async def enter(self, size: int) -> None:
        """Hold a slot for a delivery of ``size`` body bytes (raise Saturated after ``wait``)."""
        if not self._waiters and self._fits(size):
            self._take(size)  # the usual case: no timer, no suspension
            return
        if self.max_waiting is not None and len(self._waiters) >= self.max_waiting:
            raise Saturated(
                f"{self.active} requests are in progress and {len(self._waiters)} waiting;"
                " retry later"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.wait):
                await waiter
        except (TimeoutError, asyncio.CancelledError) as exc:
            admitted = waiter.done() and not waiter.cancelled()
            if admitted and isinstance(exc, TimeoutError):
                return  # admitted just as the wait ran out: keep the slot
            if admitted:
                self.leave(size)  # admitted just as the sender went away
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._admit()  # those behind it may fit now that it no longer waits
            if isinstance(exc, TimeoutError):
                raise Saturated(
                    f"{self.active} deliveries ({self.held} body bytes) are in progress;"
                    " retry later"
                ) from None
            raise

    def leave(self, size: int) -> None:
        """Give back the slot ``enter(size)`` took, and admit whoever now fits, in order."""
        self.active -= 1
        self.held -= size
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            size_next, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self._take(size_next)
            waiter.set_result(None)
