"""Record spooled deliveries, oldest first, through the one recording path.

A file is deleted only after the transaction that logged it has committed. A crash
between the commit and the delete records it again on the next drain, which the
log's unique dedup key turns into a harmless ``duplicate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from secledger.errors import IntakeError, first_line
from secledger.extract import EventFacts, MRKey, extract_facts, mr_key
from secledger.ignoredspool import IgnoredFiles, Swept
from secledger.intake import Delivery, Ignored, parse_delivery
from secledger.membership import KnownMRs
from secledger.policy import LabelPolicy
from secledger.service import DEFAULT_RECORDING, Recording, record_batch
from secledger.spool import (
    CORRUPT,
    FAILED,
    SUFFIX,
    CorruptEntry,
    DrainBusy,
    Spool,
    SpooledDelivery,
    SpoolUnavailable,
)
from secledger.store.log import Chain

log = structlog.get_logger("secledger.drain")

_LOGGED = frozenset({"recorded", "duplicate"})

# The body was accepted when it arrived; a later, smaller limit must not refuse it now.
_NO_LIMIT = 1 << 62


# SQLSTATE classes psycopg reports as operational errors that are about the statement,
# not the server's state: the same write fails again every time. Class 54 is "program
# limit exceeded" (an index row too large, too many arguments). Taken as an outage, one
# such delivery was spooled and retried for ever, and every later one queued behind it.
_REFUSALS = ("54",)
# SQLSTATEs of the server's state, not of the write, whatever class psycopg gives them:
# 25006, a read-only server (a standby reached after a failover, or a database its
# provider set read-only when nearly full). Taken as refusals, every delivery, the
# spool's too, went to failed/ and held its MR's later ones there once it was writable.
_SERVER_STATES = ("25006",)


def is_transient(exc: BaseException) -> bool:
    """True when the database could not be reached or cannot write for now, rather than
    refusing the write."""
    if isinstance(exc, PoolTimeout):
        # No connection free in the pool (the dashboard, the sink and the periodic jobs
        # share it) within its wait: not a DBAPIError, and taken as a refusal it sent a
        # delivery to failed/ and held every later one of its MR there.
        return True
    if isinstance(exc, DBAPIError) and str(getattr(exc.orig, "sqlstate", "")).startswith(
        _SERVER_STATES
    ):
        return True
    if isinstance(exc, OperationalError | InterfaceError):
        state = getattr(exc.orig, "sqlstate", None) or ""
        return not state.startswith(_REFUSALS)
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


@dataclass
class DrainResult:
    """What one drain did."""

    recorded: int = 0
    duplicates: int = 0
    ignored: int = 0
    set_aside: int = 0
    remaining: int = 0
    unavailable: bool = False
    why: str = ""  # the database's first line, when it did not take them
    keys: list[MRKey] = field(default_factory=list)

    def add(self, other: DrainResult) -> None:
        """Accumulate another step into this one."""
        self.recorded += other.recorded
        self.duplicates += other.duplicates
        self.ignored += other.ignored
        self.set_aside += other.set_aside
        self.remaining = other.remaining
        self.unavailable = other.unavailable
        self.why = other.why or self.why
        self.keys.extend(other.keys)


@dataclass(frozen=True)
class _Item:
    path: Path
    delivery: Delivery
    facts: EventFacts


def to_delivery(spooled: SpooledDelivery) -> Delivery | Ignored:
    """Run a spooled delivery through intake again, keeping what was decided at receipt."""
    delivery = parse_delivery(
        spooled.headers,
        spooled.body,
        secrets=(),
        max_body_bytes=_NO_LIMIT,
        received_at=spooled.received_at,
        require_token=False,  # the token was checked before the delivery was spooled
        source=spooled.source,
    )
    if isinstance(delivery, Ignored):
        return delivery
    # The identity computed from the full request headers at receipt is authoritative.
    return replace(
        delivery, event=spooled.event, instance=spooled.instance, dedup_key=spooled.dedup_key
    )


class Drainer:
    """Drains one spool into one database."""

    def __init__(
        self,
        engine: Engine,
        spool: Spool,
        policy: LabelPolicy,
        known: KnownMRs | None = None,
        *,
        recording: Recording = DEFAULT_RECORDING,
    ) -> None:
        self.engine = engine
        self.recording = recording
        # Told of the deliveries a drain found ignored (``serve`` holds them: the one
        # making their MR a security MR may be in another replica's spool still).
        self.on_ignored: Callable[[list[Delivery]], None] | None = None
        self.spool = spool
        self.policy = policy
        self.known = known
        # Merge requests with a delivery in failed/: their later deliveries wait there too.
        # Replaced, never changed in place, when failed/ changes; read by the event loop.
        self.held: set[MRKey] = set()
        self._failed_stamp: int | None = None
        self.refresh_held()
        self.ignored = IgnoredFiles(
            spool, engine, known, read=to_delivery, unreadable=self._set_aside_unreadable
        )

    def sweep_ignored(self) -> Swept:
        """Judge the files of ``ignored/`` again (``ignoredspool``), holding the drain lock."""
        swept = self.ignored.sweep()
        if swept.changed():
            log.info("spool_ignored_swept", **swept.fields())
        return swept

    def sweep_ignored_locked(self) -> bool:
        """``sweep_ignored_logged`` under the drain lock, unless another process is
        draining (it sweeps too); False when the sweep failed (logged)."""
        try:
            with self.spool.draining():
                return self.sweep_ignored_logged()
        except DrainBusy:
            return True
        except SpoolUnavailable as exc:
            log.warning("spool_ignored_sweep_failed", error=type(exc).__name__)
            return False

    def sweep_ignored_logged(self, *, all_files: bool = False) -> bool:
        """``sweep_ignored`` (with ``all_files``, again until every file was read); a
        failure is logged, the files kept for the next sweep: False then."""
        try:
            swept = self.sweep_ignored()
            while all_files and swept.unread:
                swept = self.sweep_ignored()
        except Exception as exc:  # noqa: BLE001 - the files wait for the next sweep
            log.warning("spool_ignored_sweep_failed", error=type(exc).__name__)
            return False
        return True

    def step(self, limit: int) -> DrainResult:
        """Record up to ``limit`` of the oldest spooled deliveries in one transaction."""
        result = DrainResult()
        why = self._unreachable()
        if why is not None:
            # Asked again and again while the database is down: fail before reading files.
            result.unavailable = True
            result.why = why
            result.remaining = self.spool.depth
            return result
        self.refresh_held()
        items = self._load(self.spool.entries()[:limit], result)
        if items:
            self._record(items, result)
        result.remaining = self.spool.recount()
        return result

    def all(self, batch: int = 128) -> DrainResult:
        """Drain until the spool is empty or the database is unavailable."""
        total = DrainResult(remaining=self.spool.recount())
        while total.remaining and not total.unavailable:
            total.add(self.step(batch))
        return total

    def _unreachable(self) -> str | None:
        """Why the database cannot be reached now; None when it can."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            if is_transient(exc):
                return first_line(exc)
            raise
        return None

    def refresh_held(self) -> None:
        """Read failed/ again when it changed (its files are decoded only then)."""
        try:
            stamp: int | None = (self.spool.directory / FAILED).stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp != self._failed_stamp:
            self._failed_stamp = stamp
            self.held = self._failed_mrs() if stamp is not None else set()

    def hold_mr(self, key: MRKey) -> None:
        """Hold ``key``'s later deliveries behind one just set aside in failed/."""
        self.held = self.held | {key}

    def _failed_mrs(self) -> set[MRKey]:
        """The merge requests of the deliveries in failed/ (usually none). A later
        delivery of one, recorded now, could not be judged without it: one that no longer
        carries a security label would be ignored, and lost once the first is fixed and
        drained. It is set aside behind it instead, in order."""
        folder = self.spool.directory / FAILED
        keys: set[MRKey] = set()
        if not folder.is_dir():
            return keys
        for path in sorted(folder.iterdir()):
            if not path.name.endswith(SUFFIX):
                continue
            try:
                delivery = to_delivery(self.spool.read(path))
                if isinstance(delivery, Delivery):
                    keys.add(mr_key(delivery))
            except Exception:  # noqa: BLE001, S112 - one that cannot be read holds no MR back
                continue
        return keys

    def _hold(self, item: _Item, result: DrainResult) -> bool:
        """Set ``item`` aside behind an earlier delivery of its MR in failed/, if there is one."""
        if item.facts.key not in self.held:
            return False
        reason = (
            "behind an earlier delivery of the same merge request in failed/:"
            " move them back together, in name order"
        )
        self._set_aside(item.path, FAILED, reason, result)
        return True

    def _load(self, paths: list[Path], result: DrainResult) -> list[_Item]:
        items = []
        for path in paths:
            try:
                spooled = self.spool.read(path)
                delivery = to_delivery(spooled)
            except FileNotFoundError:
                continue  # drained meanwhile by another process
            except CorruptEntry as exc:
                self._set_aside(path, CORRUPT, f"corrupt spool file: {exc}", result)
                continue
            except IntakeError as exc:
                self._set_aside(path, FAILED, f"rejected on drain: {exc}", result)
                continue
            if isinstance(delivery, Ignored):
                self._set_aside(path, FAILED, f"ignored on drain: {delivery.reason}", result)
                continue
            try:
                facts = extract_facts(delivery, self.policy)
            except Exception as exc:  # noqa: BLE001 - a file that fails here fails at every pass
                # Left in place, it would be read first by every pass, for ever, and every
                # later delivery would wait behind it.
                reason = f"extraction failed on drain: {type(exc).__name__}"
                self._set_aside(path, FAILED, reason, result)
                self.hold_mr(mr_key(delivery))
                continue
            item = _Item(path, delivery, facts)
            if not self._hold(item, result):
                items.append(item)
        return items

    def _set_aside_unreadable(self, path: Path, folder: str, reason: str) -> None:
        self._set_aside(path, folder, reason, DrainResult())

    def _set_aside(self, path: Path, folder: str, reason: str, result: DrainResult) -> None:
        target = self.spool.set_aside(path, folder, reason)
        result.set_aside += 1
        log.error("spool_file_set_aside", file=str(target), reason=reason)

    def _record(self, items: list[_Item], result: DrainResult) -> None:
        try:
            with self.engine.begin() as conn:
                chain = Chain.open(conn)
                batch = [(i.delivery, i.facts) for i in items]
                outcomes = record_batch(conn, chain, batch, recording=self.recording)
        except Exception as exc:  # noqa: BLE001 - sorted into unavailable or refused below
            if is_transient(exc):
                result.unavailable = True
                result.why = first_line(exc)
                return
            if len(items) > 1:
                # One delivery the database refuses must not hold back the others.
                for item in items:
                    if not self._hold(item, result):
                        self._record([item], result)
                    if result.unavailable:
                        return
                return
            reason = str(getattr(exc, "orig", None) or type(exc).__name__)[:300]
            self._set_aside(items[0].path, FAILED, f"refused by the database: {reason}", result)
            self.hold_mr(items[0].facts.key)
            return
        self._settle(items, [o.status for o in outcomes], result)

    def _settle(self, items: list[_Item], statuses: list[str], result: DrainResult) -> None:
        """After the commit: delete the files logged, keep the ignored ones, count."""
        logged = [status in _LOGGED for status in statuses]
        self.spool.remove([item.path for item, done in zip(items, logged, strict=True) if done])
        if not all(logged):
            # Kept on disk, beside serve's copy in memory, and judged again once their
            # MR is known, by this process or the next (``ignoredspool``).
            self.spool.keep_ignored(
                [item.path for item, done in zip(items, logged, strict=True) if not done]
            )
        ignored = []
        for item, status in zip(items, statuses, strict=True):
            if status == "recorded":
                result.recorded += 1
                result.keys.append(item.facts.key)
                if self.known is not None:
                    self.known.add(item.facts.key)
            elif status == "duplicate":
                result.duplicates += 1
                if self.known is not None:  # logged before: a security MR all the same
                    self.known.add(item.facts.key)
            else:
                result.ignored += 1
                ignored.append(item.delivery)
        if ignored and self.on_ignored is not None:
            self.on_ignored(ignored)
