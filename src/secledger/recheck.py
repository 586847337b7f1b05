"""Ignored deliveries looked at again when their merge request becomes known.

The receiver answers ``ignored`` for a delivery without a security label whose MR it
does not know (``membership``), and holds it for a moment (``recentignored``). When the
MR's key is learnt (its first delivery recorded here or by another replica), each
delivery held for it is recorded if it came after that first delivery; of one no longer
held, only its receipt and event times are left, and if it should have been recorded,
its MR is recorded from GitLab's API (``recovery``, when a token is configured) or the
delivery is reported lost, for an operator to look for it there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import datetime
from typing import Any, Literal

import structlog

from secledger.errors import StoreUnavailable
from secledger.extract import RECEIVED, MRKey, Stamps, event_time, event_time_of
from secledger.intake import Delivery, Ignored, decode_mr, to_delivery
from secledger.metrics import RecheckOutcome
from secledger.receiptorder import came_after, surely_after
from secledger.recentignored import Forgotten, Held, Lost, RecentlyIgnored
from secledger.runtime import Runtime
from secledger.service import Outcome
from secledger.store import ledger

log = structlog.get_logger("secledger.recheck")

# The writer's answers to a held delivery it took, as counted.
_WRITER_ANSWERS: dict[str, RecheckOutcome] = {
    "recorded": "recorded",
    "duplicate": "duplicate",
    "spooled": "spooled",
}
SHUT_DOWN = "the receiver shut down first"
RECOVER_HINT = (
    "GitLab's API still has the event: run secledger backfill --label-history for this"
    " project over the days around it"
)


class Recheck:
    """Looks again, on the event loop, at what ``recent`` (and ``more``) hold or remember."""

    def __init__(self, runtime: Runtime, recent: RecentlyIgnored, *more: RecentlyIgnored) -> None:
        self.runtime, self.holders = runtime, (recent, *more)
        self.tally = runtime.metrics.rechecked
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def watching(self) -> bool:
        """Whether a key learnt now could concern anything held or forgotten (any thread)."""
        return any(holder.watching for holder in self.holders)

    def reconsider(self, keys: list[MRKey]) -> None:
        """Start looking at the deliveries ignored for ``keys``, MRs just learnt."""
        wanted = set(keys)
        by_key: dict[MRKey, list[Held]] = {}
        forgotten: dict[MRKey, Forgotten] = {}
        for holder in self.holders:
            for held in holder.take(wanted):
                by_key.setdefault(held.key, []).append(held)
            for key, found in holder.take_forgotten(keys).items():
                if key not in forgotten or found[0] > forgotten[key][0]:
                    forgotten[key] = found
        for key, deliveries in by_key.items():
            # Held by several holders, each oldest first: recorded in order of receipt.
            deliveries.sort(key=lambda held: held.received_at)
            self._start(self._record_held(key, deliveries))
        for key, (received_at, stamps) in forgotten.items():
            self._start(self._check_forgotten(key, received_at, stamps))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # a task only weakly referenced could be collected midway
        task.add_done_callback(self._tasks.discard)

    async def _record_held(self, key: MRKey, held: list[Held]) -> None:
        """Record each delivery that would have been kept had this replica known the MR
        when it arrived (``came_after``); one received before was rightly ignored."""
        where = _where(key)
        first = await self._first_or_unchecked(key, len(held), where)
        if first is False:
            return
        done = 0
        try:
            for one in held:
                delivery = _delivery(one)
                event_at = event_time(delivery.payload, delivery.received_at)[0]
                if first is None or not came_after(delivery.received_at, event_at, *first):
                    self._left(where)
                else:
                    self._answered(await self.runtime.recorder.submit(delivery), where)
                done += 1
        except asyncio.CancelledError:  # the receiver stops: said, then stopped
            self.tally.note("not_recorded", len(held) - done)
            log.warning(
                "ignored_delivery_not_recorded",
                error=SHUT_DOWN,
                count=len(held) - done,
                hint=RECOVER_HINT,
                **where,
            )
            raise
        except StoreUnavailable as exc:  # shutting down, or the database and spool failed
            self.tally.note("not_recorded", len(held) - done)
            log.warning(
                "ignored_delivery_not_recorded",
                error=str(exc),
                count=len(held) - done,
                hint=RECOVER_HINT,
                **where,
            )
        except Exception as exc:  # the sender was answered already: logged as an error
            self.tally.note("not_recorded", len(held) - done)
            log.exception(
                "ignored_delivery_not_recorded",
                error=type(exc).__name__,
                count=len(held) - done,
                hint=RECOVER_HINT,
                **where,
            )

    async def _check_forgotten(self, key: MRKey, received_at: datetime, stamps: Stamps) -> None:
        """Report the newest delivery ignored for the MR and no longer held as lost when
        it surely came after the MR's first logged delivery (``surely_after``)."""
        where = _where(key)
        first = await self._first_or_unchecked(key, 1, where)
        if first is False:
            return
        event_at, source = event_time_of(stamps, received_at)
        in_gitlab = None if source == RECEIVED else event_at  # GitLab gave no time
        if first is None or not surely_after(received_at, in_gitlab, *first):
            self._left(where)
            return
        lost = Lost(key, received_at, first[0])
        recover = self.runtime.recover
        refused = recover(lost) if recover is not None else "recovery is not set up"
        if refused is None:  # ``recovery`` logs and counts the rest
            log.warning("ignored_delivery_recovering", **lost.fields())
            return
        self.tally.note("lost")
        log.error("ignored_delivery_lost", error=refused, hint=RECOVER_HINT, **lost.fields())

    async def _first_or_unchecked(
        self, key: MRKey, count: int, where: dict[str, Any]
    ) -> tuple[datetime, datetime] | Literal[False] | None:
        """The MR's first logged receipt and event times (``ledger.first_receipt``), or
        False, once ``count`` deliveries are counted ``unchecked``, when the database
        cannot say."""
        try:
            return await asyncio.to_thread(self._first_receipt, key)
        except asyncio.CancelledError:  # the receiver stops: said, then stopped
            self._unchecked(SHUT_DOWN, count, where)
            raise
        except Exception as exc:  # noqa: BLE001 - after the answer: logged, not raised
            self._unchecked(type(exc).__name__, count, where)
            return False

    def _unchecked(self, error: str, count: int, where: dict[str, Any]) -> None:
        self.tally.note("unchecked", count)
        log.error(
            "ignored_delivery_unchecked", error=error, count=count, hint=RECOVER_HINT, **where
        )

    def _answered(self, outcome: Outcome, where: dict[str, Any]) -> None:
        status = outcome.status
        counted = _WRITER_ANSWERS.get(status)
        if counted is not None:
            self.tally.note(counted)
            log.warning("ignored_delivery_recorded", outcome=status, seq=outcome.seq, **where)
            return
        # The writer keeps every delivery of a known MR: not expected, but not hidden.
        self.tally.note("not_recorded")
        log.error("ignored_delivery_not_recorded", outcome=status, hint=RECOVER_HINT, **where)

    def _left(self, where: dict[str, Any]) -> None:
        self.tally.note("left")
        log.info("ignored_delivery_left", reason="came before the MR was known", **where)

    def _first_receipt(self, key: MRKey) -> tuple[datetime, datetime] | None:
        with self.runtime.engine.connect() as conn:
            return ledger.first_receipt(conn, key)


def _delivery(held: Held) -> Delivery:
    if held.delivery is not None:
        return held.delivery.with_payload()
    decoded = decode_mr(held.headers, held.body, verified=held.verified)
    if isinstance(decoded, Ignored):  # it was decoded the same way once
        raise TypeError("a held delivery no longer decodes as a merge request")
    return to_delivery(
        decoded, held.headers, held.body, received_at=held.received_at, verified=held.verified
    )


def _where(key: MRKey) -> dict[str, Any]:
    return {"instance": key.instance, "project_id": key.project_id, "mr_iid": key.mr_iid}
