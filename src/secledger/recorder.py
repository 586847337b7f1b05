"""Group commit: one writer thread records deliveries in batches, one commit per batch.

Each request waits for the commit that covers its delivery before it is answered, so
a 2xx still means "durably recorded". Batching makes the chain lock and the WAL flush
cost once per batch instead of once per delivery. Under load a batch costs one round
trip: what is queued when a batch's writes have been sent becomes the next batch, and
its BEGIN, chain lock and reads follow the COMMIT in the same round trip (the writer's
connection is in autocommit mode and sends both itself). That lock is only tried: when
another writer was already waiting for it, this one rolls back and waits its turn.

When the database is unreachable, the batch goes to the durable spool instead and is
answered ``spooled`` once its files are fsync'd. While the spool holds anything, new
deliveries are spooled behind it, so none overtakes an older one; the same thread
drains the spool, oldest first, whenever the database answers again.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from psycopg.pq import TransactionStatus
from sqlalchemy import Connection, Engine

from secledger import logs
from secledger.drain import Drainer, DrainResult, is_transient
from secledger.errors import StoreUnavailable, first_line
from secledger.extract import EventFacts, MRKey, extract_facts
from secledger.intake import Delivery
from secledger.policy import LabelPolicy
from secledger.recentignored import DRAINED_HOLD_BYTES
from secledger.service import DEFAULT_RECORDING, Outcome, Recording, record_locked
from secledger.spool import FAILED, DrainBusy, Spool, SpoolUnavailable
from secledger.store import batchread
from secledger.store import log as log_store
from secledger.store.eventcache import EventCache
from secledger.store.pipeline import Pg, transaction_status
from secledger.throttle import Throttle
from secledger.times import utcnow

log = structlog.get_logger("secledger.recorder")


@dataclass
class _Submitted:
    """A delivery as the event loop hands it over: decoded, not extracted yet."""

    delivery: Delivery
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Outcome]

    def resolve(self, result: Outcome | BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, result)


@dataclass
class _Job(_Submitted):
    """A delivery the writer has extracted (``facts``), ready for a batch."""

    facts: EventFacts


def _resolve_all(jobs: list[_Job], outcomes: list[Outcome]) -> None:
    """Answer a batch with one wake-up of each event loop, not one per delivery."""
    # Answered already (``spooled``, after waiting past spool_after_seconds): read before
    # this batch's answers are queued, which the sender no longer waits for.
    early = [job.future.done() and not job.future.cancelled() for job in jobs]
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Outcome], Outcome]]] = {}
    for job, outcome in zip(jobs, outcomes, strict=True):
        by_loop.setdefault(job.loop, []).append((job.future, outcome))
    for loop, settled in by_loop.items():
        loop.call_soon_threadsafe(_settle_many, settled)
    # The answers are on their way: the lines need not hold them up.
    _log_answers(jobs, outcomes, early)


def _log_answers(
    jobs: Sequence[_Submitted], outcomes: Sequence[Outcome], early: Sequence[bool] = ()
) -> None:
    """The ``delivery`` line of each delivery answered from here (all but ``ignored``).

    Written on the writer thread rather than by the request on the event loop, like the
    extraction (see ``Recorder.submit``); ``ms`` is the time from receipt to this answer.
    A delivery answered ``spooled`` before its write ended says so (``answered``); its
    ``ms`` is then the time to the write.
    """
    now = utcnow()
    records: list[dict[str, Any]] = []
    for i, (job, outcome) in enumerate(zip(jobs, outcomes, strict=True)):
        if outcome.status == "ignored":
            continue  # counted by the web edge's summary line
        row = outcome.row or {}
        record = {
            "outcome": outcome.status,
            "seq": outcome.seq,
            "ms": round((now - job.delivery.received_at).total_seconds() * 1000, 2),
        }
        if row:
            record.update((key, row[key]) for key in _ROW_IDS if key in row)
        elif isinstance(job, _Job):  # spooled: no row yet, the MR all the same
            record.update(zip(_ROW_IDS[:3], job.facts.key, strict=True))
        if i < len(early) and early[i]:
            record["answered"] = "spooled"
        records.append(record)
    logs.info_lines(log, "delivery", records)


_ROW_IDS = ("instance", "project_id", "mr_iid", "decision")


def _settle_many(settled: list[tuple[asyncio.Future[Outcome], Outcome]]) -> None:
    for future, outcome in settled:
        _settle(future, outcome)


def _settle(future: asyncio.Future[Outcome], result: Outcome | BaseException) -> None:
    if future.done():  # the client went away; the delivery is recorded all the same
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


_STOP = object()
# Wakes a writer waiting for work with no timeout: a delivery spooled from the event loop
# (``_spool_late``) raised the spool's depth, and only the writer drains it.
_WAKE = object()
# How long ``close`` waits for the writer's last batch.
CLOSE_WAIT_SECONDS = 30.0
_NONE_HELD: set[MRKey] = set()
_SPOOL_FAILED = (("error", "spool_write_failed"),)
_SPOOL_UNLISTED = (("error", "spool_unreadable"),)
# Bodies the drain found ignored before the receiver asked for them: as many as it holds.
EARLY_IGNORED_BYTES = DRAINED_HOLD_BYTES
# The least a delivery that waited past spool_after_seconds before reaching the writer
# (admission, a slow body) is given to commit before it is spooled: a healthy database
# commits well within it, and GitLab's 10 s leave room for it.
LATE_GRACE_SECONDS = 0.25
# How often an idle writer looks whether files were moved into the spool (an operator
# moving one back from failed/): they are then drained, and counted by the gauge.
RESCAN_SECONDS = 5.0
# How often the files a drain left out in ignored/ are judged again while serving.
SWEEP_SECONDS = 5.0
SWEEP_BACKOFF_SECONDS = 60.0
# How long a stop drains the spool while the database answers (under CLOSE_WAIT_SECONDS).
STOP_DRAIN_SECONDS = 20.0
# When the tried lock goes to another writer, the next batches are recorded without
# carrying: 1 batch, then 2, 4 ... each time it happens again, at most this many.
MAX_PREFETCH_BACKOFF = 64
REFUSED = (
    "the database refused this delivery; it is kept in the spool's failed/ folder for an"
    " operator (secledger spool status)"
)
SPOOLED = (
    "kept in the durable spool; it will be recorded with this receipt time"
    " as soon as the database takes it (if its merge request is a security one)"
)


def _same(carried: list[_Job], jobs: list[_Job]) -> bool:
    """Whether ``jobs`` are the very jobs whose reads were carried."""
    return len(carried) == len(jobs) and all(a is b for a, b in zip(carried, jobs, strict=True))


class Recorder:
    """Owns the writer thread. ``submit`` from the event loop; ``close`` on shutdown."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 128,
        *,
        drainer: Drainer | None = None,
        retry_seconds: float = 1.0,
        recording: Recording = DEFAULT_RECORDING,
        policy: LabelPolicy | None = None,
        spool_after: float = 0.0,
    ) -> None:
        self._engine = engine
        self._spool_after = spool_after
        self._policy = policy or LabelPolicy()
        self._max_batch = max_batch
        self._drainer = drainer
        self._retry_seconds = retry_seconds
        self._next_drain = 0.0
        self._next_sweep = 0.0
        self._recording = recording
        self._queue: queue.SimpleQueue[_Submitted | object] = queue.SimpleQueue()
        # The writer keeps one connection across batches: checking one out of the pool
        # per batch cost a pre-ping round trip each time.
        self._conn: Connection | None = None
        self._cache = EventCache()
        # Jobs taken while the previous batch's writes were being queued, and their reads,
        # sent in that batch's round trip after its COMMIT (in their own transaction).
        self._carry: list[_Job | object] = []
        self._pending: tuple[list[_Job], batchread.Pending] | None = None
        self._retrying = False  # one by one after a refused batch: nothing is carried
        self._stopping = False
        self._closed = False
        # After another writer (a replica) won the lock a next batch tried for, that many
        # batches go without: under steady contention the tried reads are wasted work.
        self._no_prefetch = 0
        self._backoff = 1
        # A spool that cannot keep anything fails every delivery of an outage: 20 lines
        # of each kind a minute, then a count.
        self._spool_failures = Throttle("spool_write_failed_suppressed")
        self._spool_unlisted = Throttle("spool_unreadable_suppressed")
        # What the spool's drain found ignored, for the receiver to hold (webhook.py);
        # kept here until it asks, as a drain may run before the first request.
        self._ignored_lock = threading.Lock()
        self._ignored_hook: Callable[[list[Delivery]], None] | None = None
        self._ignored_early: list[Delivery] = []
        if drainer is not None:
            drainer.on_ignored = self._drained_ignored
        self._thread = threading.Thread(target=self._run, name="secledger-writer", daemon=True)
        self.batches = 0
        self.recorded = 0
        # When the writer began the database work it is still in (None: it waits for work).
        self._busy_since: float | None = None
        # Deliveries being spooled because the database did not commit them in time.
        self._late: set[asyncio.Future[None]] = set()
        # Their writes have threads of their own: in the loop's default executor they
        # queued behind database calls that hang in the very stall being worked around
        # (the recheck's lookups, the periodic jobs), past GitLab's 10 s.
        self._late_writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="secledger-late")

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def close(self) -> None:
        """Finish queued work, then stop the writer thread."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout=CLOSE_WAIT_SECONDS)
        if self._thread.is_alive():
            # Its requests were answered before this (from the spool when they waited
            # past spool_after_seconds), so this stop loses nothing: say why it waited.
            log.error(
                "writer_still_busy_at_stop",
                waiting_seconds=round(self.waiting_seconds, 1),
                spool_depth=self.spool_depth,
                hint="the database did not finish the last batch; the next start drains"
                " what was spooled",
            )

    async def submit(self, delivery: Delivery, arrived: float | None = None) -> Outcome:
        """Record (or spool) a decoded delivery; returns once it is durable.

        ``arrived`` (``time.monotonic()``) is when its request came: the spool-after
        timer counts from then, since GitLab's 10 s include the wait for admission and
        for the body.

        The facts are extracted on the writer thread; an error extracting them is
        raised here, for this request alone. Work moved off the event loop is worth more
        than the same work on the writer: the loop's time per delivery is what every
        request in flight waits behind (benchmarks/RESULTS.md).
        """
        if self._closed:  # nobody would ever answer it
            raise StoreUnavailable("the receiver is shutting down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._queue.put(_Submitted(delivery, loop, future))
        if self._spool_after and self._drainer is not None:
            # A timer, not wait_for: this runs for every security delivery, on the loop.
            since = time.monotonic() if arrived is None else arrived
            delay = max(self._spool_after - (time.monotonic() - since), LATE_GRACE_SECONDS)
            timer = loop.call_later(delay, self._spool_waiting, delivery, future, since)
            future.add_done_callback(lambda _: timer.cancel())
        return await future

    def _spool_waiting(
        self, delivery: Delivery, future: asyncio.Future[Outcome], since: float
    ) -> None:
        """Keep a delivery the database has not committed in time in the spool, and answer
        it ``spooled`` (on the event loop, when its time is up).

        GitLab waits 10 s and does not retry; a database that answers nothing (a stalled
        disk, a failover, a long ``rebuild`` holding the chain lock) would otherwise cost
        a failure per delivery until it disables the hook. The writer still has the job:
        whichever of its commit and the drain comes second finds the delivery logged (its
        dedup key), so it is recorded once either way, and the writer's own answer, once
        this one is given, is dropped (``_settle``).
        """
        if future.done():
            return
        self._late.add(asyncio.ensure_future(self._spool_late(delivery, future, since)))

    async def _spool_late(
        self, delivery: Delivery, future: asyncio.Future[Outcome], since: float
    ) -> None:
        assert self._drainer is not None  # noqa: S101 - only timed with a spool
        spool = self._drainer.spool
        failure: SpoolUnavailable | None = None
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._late_writer, spool.write, [delivery])
        except SpoolUnavailable as exc:
            failure = exc
        finally:
            self._late.discard(asyncio.current_task())
        if failure is not None:
            # Kept nowhere else: the database's answer, whenever it comes, is the answer.
            if self._spool_failures.note(time.monotonic(), _SPOOL_FAILED):
                log.error("spool_write_failed", deliveries=1, error=str(failure))
            return
        # The writer may be asleep with nothing to wait for: it drains the copy (a
        # duplicate by then, when the commit came first) only once it knows of it.
        self._queue.put(_WAKE)
        if future.done():
            return  # committed meanwhile: the drain will find it logged
        log.warning(
            "delivery_spooled_waiting",
            waited_seconds=round(time.monotonic() - since, 2),
            spool_depth=spool.depth,
            dedup_key=delivery.dedup_key,
        )
        future.set_result(Outcome("spooled", reason=SPOOLED))

    def on_drained_ignored(self, hook: Callable[[list[Delivery]], None]) -> None:
        """Have ``hook`` told (on the writer's thread) of the deliveries the spool's drain
        finds ignored, and now of those it found before (a drain at start-up)."""
        with self._ignored_lock:
            self._ignored_hook = hook
            early, self._ignored_early = self._ignored_early, []
        if early:
            hook(early)

    def _drained_ignored(self, deliveries: list[Delivery]) -> None:
        with self._ignored_lock:
            hook = self._ignored_hook
            if hook is None:
                # Kept until the receiver asks for them, up to what it would hold.
                kept = self._ignored_early + [d.without_payload() for d in deliveries]
                size = sum(len(delivery.body) for delivery in kept)
                dropped = 0
                while kept and size > EARLY_IGNORED_BYTES:
                    size -= len(kept.pop(0).body)
                    dropped += 1
                self._ignored_early = kept
        if hook is not None:
            hook(deliveries)
        elif dropped:
            # Their files in ignored/ are judged by the sweeps all the same: said, not alarmed.
            log.info("ignored_delivery_not_held", count=dropped)

    @property
    def held_mrs(self) -> set[MRKey]:
        """Merge requests with a delivery in the spool's failed/ folder."""
        return self._drainer.held if self._drainer else _NONE_HELD

    @property
    def spool_depth(self) -> int:
        """Deliveries waiting in the spool (0 without a spool)."""
        return self._drainer.spool.depth if self._drainer else 0

    @property
    def alive(self) -> bool:
        """Whether the writer thread runs (once started, until stopped)."""
        return self._thread.is_alive()

    @property
    def waiting_seconds(self) -> float:
        """How long the writer has been in its current database work (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            # Whatever ended the thread, in the JSON log (/readyz says writer.alive false).
            log.critical("writer_stopped", exc_info=True)
            raise

    def _loop(self) -> None:
        while True:
            batch, self._carry = self._carry or self._next_batch(), []
            spool = self._drainer.spool if self._drainer is not None else None
            # Only while it counts as empty: otherwise the drain lists it at every step,
            # and during an outage, listing a spool of 100,000 files at every batch
            # would cost more than the batch. Idle, it is listed anyway, in case a move
            # fell in the same clock tick as the mtime last seen.
            if spool is not None and not spool.depth:
                self._look_at_spool(spool, bool(batch))
            self._stopping = _STOP in batch
            self._sweep_step()  # first: a file it queues again is drained just below
            if self.spool_depth:
                self._release_carried_reads()
                self._drain_step()
            jobs = [job for job in batch if isinstance(job, _Job)]
            if jobs:
                self._busy_since = time.monotonic()
                try:
                    self._dispatch(jobs)
                except Exception as exc:  # noqa: BLE001 - the thread must outlive one batch
                    self._unexpected(jobs, exc)
                finally:
                    self._busy_since = None
            if self._stopping:
                if self.spool_depth:
                    self._release_carried_reads()
                    self._drain_before_stop()
                self._report_kept_ignored()
                self._drop_connection()
                self._refuse_late()
                self._spool_failures.flush(time.monotonic())
                self._spool_unlisted.flush(time.monotonic())
                return

    def _look_at_spool(self, spool: Spool, busy: bool) -> None:
        failure: SpoolUnavailable | None = None
        try:
            if busy:
                spool.refresh()
            else:
                spool.recount()
        except SpoolUnavailable as exc:
            failure = exc
        # Its depth stays as last counted; the drain and the spooling report their own
        # failures. Idle, this is every few seconds: a few lines a minute, then a count.
        if failure is not None and self._spool_unlisted.note(time.monotonic(), _SPOOL_UNLISTED):
            log.error("spool_unreadable", error=str(failure))

    def _unexpected(self, jobs: list[_Job], exc: Exception) -> None:
        """A failure nothing below sorted (a bug, a disk error out of place): the batch's
        requests still waiting are answered 503 rather than left to GitLab's timeout, and
        the writer carries on with the next batch on a new connection."""
        log.error("writer_failed", error=type(exc).__name__, exc_info=exc)
        self._pending = None
        self._drop_connection()
        failure = StoreUnavailable(
            "the delivery could not be recorded: the receiver met an internal error"
            " (logged as writer_failed)"
        )
        for job in jobs:
            job.resolve(failure)

    def _drain_before_stop(self) -> None:
        """Drain while the database takes the spooled deliveries, for up to
        STOP_DRAIN_SECONDS: a replica's spool is on its own disk, and a replica scaled
        down or replaced takes what it left there with it."""
        deadline = time.monotonic() + STOP_DRAIN_SECONDS
        drained = DrainResult()
        while self.spool_depth and time.monotonic() < deadline:
            result = self._drain_locked()
            if result is None or result.unavailable:
                break
            drained.add(result)
            if not _moved(result):
                break
        _log_drained(drained, self.spool_depth)
        if self.spool_depth:
            log.error(
                "spool_left_at_stop",
                spool_depth=self.spool_depth,
                hint="run `secledger spool drain` with this spool directory, or start serve"
                " on it again, once the database answers",
            )

    def _report_kept_ignored(self) -> None:
        """Say at stop that ``ignored/`` holds files, which only a start (or a drain by
        hand) within the hold judges again: the hold in memory ends with the process."""
        if self._drainer is None:
            return
        spool = self._drainer.spool
        try:
            kept = spool.ignored_count()
        except OSError:
            return
        if kept:
            log.warning(
                "spool_ignored_kept_at_stop",
                count=kept,
                hint="start serve on this spool directory again within 5 minutes, or run"
                " `secledger spool drain` on it then: either judges them once more",
            )

    def _release_carried_reads(self) -> None:
        """End the transaction of reads carried for the next batch before draining: it
        holds the chain lock, which the drain, on a connection of its own, would wait for
        behind this very thread forever. The carried jobs are dispatched as usual."""
        if self._pending is not None:
            self._pending = None
            self._drop_connection()

    def _refuse_late(self) -> None:
        """Answer what was submitted after the stop (503: GitLab may resend it)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Submitted):
                job.resolve(StoreUnavailable("the receiver is shutting down"))

    def _next_batch(self) -> list[_Job | object]:
        """Wait for work; while the spool is not empty, wake up in time to drain it."""
        timeout = None
        if self.spool_depth:
            timeout = max(0.0, self._next_drain - time.monotonic())
        elif self._drainer is not None:
            timeout = RESCAN_SECONDS  # files moved into the spool from outside
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        ready = self._ready(first)
        return self._take_queued([] if ready is None else [ready])

    def _take_queued(self, batch: list[_Job | object]) -> list[_Job | object]:
        """Add what is queued now to ``batch``, up to the batch size or a stop."""
        while (not batch or batch[-1] is not _STOP) and len(batch) < self._max_batch:
            try:
                taken = self._queue.get_nowait()
            except queue.Empty:
                break
            ready = self._ready(taken)
            if ready is not None:
                batch.append(ready)
        return batch

    def _ready(self, taken: _Submitted | object) -> _Job | object | None:
        """What was taken from the queue, a submitted delivery made a job (extracted), or
        None once its extraction error is answered."""
        if not isinstance(taken, _Submitted):
            return taken  # the stop
        submitted, delivery = taken, taken.delivery
        try:
            facts = extract_facts(delivery, self._policy)
        except Exception as exc:  # noqa: BLE001 - the sender gets its 4xx (or a bug its 500)
            submitted.resolve(exc)
            return None
        # The decoded JSON is not needed past this point: dropped now, it dies before the
        # collector can promote it while the batch waits for its commit.
        stripped = delivery.without_payload()
        return _Job(stripped, submitted.loop, submitted.future, facts)

    def _dispatch(self, jobs: list[_Job]) -> None:
        held = self.held_mrs
        if self.spool_depth or (held and any(job.facts.key in held for job in jobs)):
            # Never let a new delivery overtake a spooled one; one of an MR with a delivery
            # in failed/ goes there behind it, through the drain.
            self._spool(jobs)
        else:
            self._record_batch(jobs)

    def _drain_step(self) -> None:
        assert self._drainer is not None  # noqa: S101 - spool_depth is 0 without one
        if time.monotonic() < self._next_drain:
            return
        self._busy_since = time.monotonic()
        try:
            result = self._drain_locked()
        finally:
            self._busy_since = None
        if result is None or result.unavailable:
            self._next_drain = time.monotonic() + self._retry_seconds
            return
        _log_drained(result, result.remaining)

    def _sweep_step(self) -> None:
        """Every ``SWEEP_SECONDS``: the files the drain left out in ignored/ whose MR is
        known now go back in the queue, or are deleted (``ignoredspool``)."""
        if self._drainer is None or time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + SWEEP_SECONDS
        self._busy_since = time.monotonic()
        try:
            if self._drainer.spool.has_ignored() and not self._drainer.sweep_ignored_locked():
                # A database or disk that fails: not every 5 s on the writer's time.
                self._next_sweep = time.monotonic() + SWEEP_BACKOFF_SECONDS
        except Exception as exc:  # noqa: BLE001 - the writer thread must survive to answer
            log.warning("spool_ignored_sweep_failed", error=type(exc).__name__)
            self._next_sweep = time.monotonic() + SWEEP_BACKOFF_SECONDS
        finally:
            self._busy_since = None

    def _drain_locked(self) -> DrainResult | None:
        assert self._drainer is not None  # noqa: S101 - spool_depth is 0 without one
        failure: Exception | None = None
        try:
            with self._drainer.spool.draining():
                return self._drainer.step(self._max_batch)
        except DrainBusy:
            return None  # `secledger spool drain` is at it; look again shortly
        except Exception as exc:  # noqa: BLE001 - the writer thread must survive to answer
            failure = exc
        log.error("spool_drain_failed", error=type(failure).__name__, detail=str(failure)[:300])
        return None

    def _record_batch(self, jobs: list[_Job]) -> None:
        try:
            outcomes = self._write(jobs)
        except Exception as exc:  # noqa: BLE001 - every failure is sorted below
            if is_transient(exc) and self._drainer is not None:
                self._next_drain = time.monotonic() + self._retry_seconds
                self._spool(jobs)
            elif len(jobs) == 1 and not is_transient(exc) and self._drainer is not None:
                self._keep_refused(jobs[0], exc)
            elif is_transient(exc) or len(jobs) == 1:
                self._fail(jobs, exc)
            else:
                # One bad delivery must not sink the others: retry each on its own.
                self._retrying = True
                try:
                    for job in jobs:
                        self._dispatch([job])
                finally:
                    self._retrying = False
            return
        self.batches += 1
        self.recorded += len(jobs)
        _resolve_all(jobs, outcomes)

    def _write(self, jobs: list[_Job]) -> list[Outcome]:
        """Record ``jobs`` in one transaction on the held connection, committed on return."""
        fresh = self._conn is None
        try:
            return self._transaction(jobs)
        except Exception as exc:
            self._drop_connection()
            if fresh or not is_transient(exc):
                raise
        # The held connection went stale while idle (a database restart, a proxy's idle
        # timeout): once more on a new, pre-pinged one before calling it unavailable.
        # Nothing was committed, or, if the connection broke while the COMMIT's answer was
        # on its way, everything was: the retry then finds each delivery already logged.
        try:
            outcomes = self._transaction(jobs)
        except Exception:
            # Its transaction may be left open, aborted and holding the chain lock, which
            # the drain's connection (or another replica) would then wait for forever.
            self._drop_connection()
            raise
        return self._own_rows(jobs, outcomes)

    def _own_rows(self, jobs: list[_Job], outcomes: list[Outcome]) -> list[Outcome]:
        """After a retry: ``recorded``, not ``duplicate``, for each delivery whose row was
        written by the attempt whose COMMIT's answer was lost.

        A row is the request's own when it has the same dedup key and the same receipt
        time (to the microsecond): a resend by GitLab is another request, received at
        another instant, and stays a duplicate. When this cannot be read, the answers
        stay ``duplicate``: a 200 all the same, with the right seq.
        """
        seqs = [o.seq for o in outcomes if o.status == "duplicate" and o.seq is not None]
        if not seqs:
            return outcomes
        try:
            with self._engine.connect() as conn:
                found = log_store.receipts(conn, seqs)
        except Exception as exc:  # noqa: BLE001 - the answers stand as they are
            log.warning("in_doubt_check_failed", error=type(exc).__name__)
            return outcomes
        owned: list[Outcome] = []
        for job, outcome in zip(jobs, outcomes, strict=True):
            mine = (job.delivery.dedup_key, job.delivery.received_at)
            seq = outcome.seq
            if outcome.status == "duplicate" and seq is not None and found.get(seq) == mine:
                del found[seq]  # a second copy of this request in the batch is a duplicate
                owned.append(Outcome("recorded", seq=seq, row=outcome.row))
            else:
                owned.append(outcome)
        recovered = sum(a is not b for a, b in zip(owned, outcomes, strict=True))
        if recovered:
            log.warning("commit_answer_lost", deliveries=len(jobs), recorded_by_it=recovered)
        return owned

    def _transaction(self, jobs: list[_Job]) -> list[Outcome]:
        if self._conn is None:
            # Autocommit: the writer sends BEGIN and COMMIT itself, so that the next
            # batch's transaction can start in the round trip that commits this one.
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        conn = self._conn
        items = [(job.delivery, job.facts) for job in jobs]
        carried, self._pending = self._pending, None
        pending = None
        if carried is not None and _same(carried[0], jobs):
            pending = carried[1]
        try:
            seen = pending.finish(conn) if pending is not None else None
            if pending is not None:
                self._contended(lost=seen is None)
            outcomes = record_locked(
                conn,
                items,
                recording=self._recording,
                cache=self._cache,
                commit=True,
                seen=seen,
                begin=seen is None,
                # Reads were carried for these jobs but another writer took the lock
                # first, or for other jobs: end the transaction they began.
                rollback=carried is not None and seen is None,
                then=self._prefetch,
            )
        except BaseException:
            self._cache.discard()  # not committed: nothing it staged may be kept
            self._pending = None  # the next batch's reads were aborted with this batch
            raise
        self._cache.commit()
        expected = TransactionStatus.IDLE if self._pending is None else TransactionStatus.INTRANS
        if transaction_status(conn) != expected:
            # This batch committed, but what followed its COMMIT failed (the next batch's
            # reads, or the session itself): carried jobs are read again on a fresh one.
            self._pending = None
            self._drop_connection()
        return outcomes

    def _contended(self, *, lost: bool) -> None:
        if lost:
            self._no_prefetch = self._backoff
            self._backoff = min(2 * self._backoff, MAX_PREFETCH_BACKOFF)
        else:
            self._backoff = 1

    def _prefetch(self, pg: Pg) -> None:
        """Take what is queued now as the next batch, and queue its BEGIN and reads."""
        if self._carry or self._retrying or self._stopping:
            return  # jobs taken before and not recorded yet, or no next batch to start
        if self._no_prefetch:
            self._no_prefetch -= 1
            return
        taken = self._take_queued([])
        self._carry = taken
        jobs = [job for job in taken if isinstance(job, _Job)]
        if jobs:
            items = [(job.delivery, job.facts) for job in jobs]
            pending = batchread.send(
                pg, items, lock=True, cache=self._cache, begin=True, wait=False
            )
            self._pending = (jobs, pending)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()  # back to the pool, which discards it if it is broken
            except Exception as exc:  # noqa: BLE001 - the writer thread must survive
                log.warning("writer_connection_close_failed", error=type(exc).__name__)

    def _spool(self, jobs: list[_Job]) -> None:
        assert self._drainer is not None  # noqa: S101 - only called with a spool
        failure: SpoolUnavailable | None = None
        try:
            self._drainer.spool.write([job.delivery for job in jobs])
        except SpoolUnavailable as exc:
            failure = exc
        if failure is not None:
            # Not durable anywhere: the sender must be told to try again (503).
            if self._spool_failures.note(time.monotonic(), _SPOOL_FAILED):
                log.error("spool_write_failed", deliveries=len(jobs), error=str(failure))
            for job in jobs:
                job.resolve(failure)
            return
        depth = self._drainer.spool.depth
        log.warning("deliveries_spooled", deliveries=len(jobs), spool_depth=depth)
        spooled = Outcome("spooled", reason=SPOOLED)
        for job in jobs:
            job.resolve(spooled)
        _log_answers(jobs, [spooled] * len(jobs))

    def _keep_refused(self, job: _Job, exc: BaseException) -> None:
        """Keep a delivery the database refuses in the spool's failed/ folder, and say so.

        Answering 503 would make GitLab count a failure for a delivery it cannot fix by
        resending (and disable the hook after four); kept on disk it is not lost, shows in
        ``spool status`` and /readyz, and is recorded once the cause is fixed and the file
        moved back into the spool (docs/operations.md).
        """
        assert self._drainer is not None  # noqa: S101 - only called with a spool
        spool = self._drainer.spool
        try:
            (path,) = spool.write([job.delivery])
        except SpoolUnavailable:
            self._fail([job], exc)
            return
        # The database's own words, as the drain keeps them: the cause to fix.
        reason = f"the database refused it: {type(exc).__name__}: {first_line(exc)}"
        target = spool.directory / FAILED / path.name
        try:
            spool.set_aside(path, FAILED, reason)
        except (OSError, SpoolUnavailable):
            if not target.exists():
                # Left in the spool, the drain would meet it again and again, and every
                # delivery after it would wait behind it: taken back, and answered 503.
                spool.discard([path])
                self._fail([job], exc)
                return
            # Moved, though not every fsync (or the count) after the move went through:
            # kept, and its MR held behind it all the same.
        self._drainer.hold_mr(job.facts.key)
        # The line the drain writes for a file it sets aside (docs/operations.md).
        log.error("spool_file_set_aside", file=str(target), reason=reason)
        kept = Outcome("spooled", reason=REFUSED)
        job.resolve(kept)
        _log_answers([job], [kept])

    @staticmethod
    def _fail(jobs: list[_Job], exc: BaseException) -> None:
        transient = is_transient(exc)
        log.error(
            "batch_failed",
            deliveries=len(jobs),
            transient=transient,
            error=type(exc).__name__,
        )
        message = "the database is unavailable" if transient else "the database refused the write"
        for job in jobs:
            job.resolve(StoreUnavailable(message))


def _moved(result: DrainResult) -> bool:
    """Whether a drain took any file out of the spool."""
    return bool(result.recorded or result.duplicates or result.set_aside or result.ignored)


def _log_drained(result: DrainResult, depth: int) -> None:
    if _moved(result):
        log.info(
            "spool_drained",
            recorded=result.recorded,
            duplicates=result.duplicates,
            ignored=result.ignored,
            set_aside=result.set_aside,
            spool_depth=depth,
        )
