"""Time limits for many concurrent awaits, enforced by one periodic sweep.

``asyncio.timeout`` arms a timer, builds a context manager and reschedules it for each
use: on the webhook hot path, where the body of nearly every delivery is already
buffered when it is read, that was a measurable share of a request's cost. Here a use
costs a dict entry; one timer, running only while something is being waited for,
cancels what has outlived its deadline. A limit fires up to ``granularity`` late.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadlines:
    """``with deadlines.limit():`` around an await raises TimeoutError once ``seconds`` pass."""

    def __init__(self, seconds: float, granularity: float = 0.25) -> None:
        self.seconds = seconds
        self.granularity = min(granularity, seconds)
        self._running: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def limit(self) -> _Limit:
        """Start the clock for the current task; use the result as a context manager."""
        # current_task() without a loop asks get_running_loop(), which costs a getpid()
        # system call each time; the loop is the same for every request of a receiver.
        loop = self._loop
        if loop is None or not loop.is_running():
            self._loop = loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("Deadlines.limit() must be used inside a task")
        self._running[task] = loop.time() + self.seconds
        if self._timer is None:
            self._timer = loop.call_later(self.granularity, self._sweep, loop)
        return _Limit(self, task)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        for task, deadline in list(self._running.items()):
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        if self._running:
            self._timer = loop.call_later(self.granularity, self._sweep, loop)


class _Limit:
    __slots__ = ("_cancelling", "_owner", "_task")

    def __init__(self, owner: Deadlines, task: asyncio.Task[object]) -> None:
        self._owner = owner
        self._task = task
        self._cancelling = task.cancelling()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        owner, task = self._owner, self._task
        del owner._running[task]
        if task not in owner._expired:
            return
        owner._expired.discard(task)
        # Our own cancellation becomes TimeoutError; one from outside (shutdown, a
        # client gone) that arrived as well still propagates, as with asyncio.timeout.
        if kind is asyncio.CancelledError and task.uncancel() <= self._cancelling:
            raise TimeoutError
