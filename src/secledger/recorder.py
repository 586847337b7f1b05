"""Group commit: one writer thread records deliveries in batches, one commit per batch.

Each request waits for the commit that covers its delivery before it is answered, so
a 2xx still means "durably recorded". Batching makes the chain lock and the WAL flush
cost once per batch instead of once per delivery.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from secledger.errors import StoreUnavailable
from secledger.extract import EventFacts
from secledger.intake import Delivery
from secledger.service import Outcome, record
from secledger.store.log import Chain
from secledger.tierpolicy import CompliancePolicy

log = structlog.get_logger("secledger.recorder")


@dataclass
class _Job:
    delivery: Delivery
    facts: EventFacts
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Outcome]

    def resolve(self, result: Outcome | BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, result)


def _settle(future: asyncio.Future[Outcome], result: Outcome | BaseException) -> None:
    if future.done():  # the client went away; the delivery is recorded all the same
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


_STOP = object()


class Recorder:
    """Owns the writer thread. ``submit`` from the event loop; ``close`` on shutdown."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 128,
        compliance: CompliancePolicy | None = None,
    ) -> None:
        self._engine = engine
        self._compliance = compliance
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="secledger-writer", daemon=True)
        self.batches = 0
        self.recorded = 0

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def close(self) -> None:
        """Finish queued work, then stop the writer thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    async def submit(self, delivery: Delivery, facts: EventFacts) -> Outcome:
        """Record a delivery; returns once its transaction has committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._queue.put(_Job(delivery, facts, loop, future))
        return await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(item)
            self._record_batch([job for job in batch if isinstance(job, _Job)])

    def _record_batch(self, jobs: list[_Job]) -> None:
        try:
            with self._engine.begin() as conn:
                chain = Chain.open(conn)
                outcomes = [
                    record(conn, chain, job.delivery, job.facts, compliance=self._compliance)
                    for job in jobs
                ]
        except Exception as exc:  # noqa: BLE001 - every failure is sorted below
            if _is_transient(exc) or len(jobs) == 1:
                self._fail(jobs, exc)
            else:
                # One bad delivery must not sink the others: retry each on its own.
                for job in jobs:
                    self._record_batch([job])
            return
        self.batches += 1
        self.recorded += len(jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            job.resolve(outcome)

    @staticmethod
    def _fail(jobs: list[_Job], exc: BaseException) -> None:
        transient = _is_transient(exc)
        log.error(
            "batch_failed",
            deliveries=len(jobs),
            transient=transient,
            error=type(exc).__name__,
        )
        message = "the database is unavailable" if transient else "the database refused the write"
        for job in jobs:
            job.resolve(StoreUnavailable(message))
