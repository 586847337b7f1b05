"""Integrity operations over an engine: checkpoints, rebuilds, and the serve-side schedule."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Engine, text

from secledger import checkpoint as signing
from secledger import findings
from secledger.checkpoint import Checkpoint
from secledger.config import Settings
from secledger.errors import ConfigError, SecledgerError
from secledger.extract import MRKey
from secledger.policy import LabelPolicy
from secledger.progress import Silent, Tracker
from secledger.rebuild import Difference, log_rows, rebuild
from secledger.store import checkpoints, derived
from secledger.store.db import pin_search_path
from secledger.store.log import Chain
from secledger.tierpolicy import CompliancePolicy
from secledger.times import utcnow

log = structlog.get_logger("secledger.integrity")


class EmptyChain(SecledgerError):
    """There is nothing to checkpoint yet."""


class CheckpointFileFailed(SecledgerError):
    """The checkpoint was signed and stored, but its copy outside the database was not."""


def take_checkpoint(
    engine: Engine, key: Ed25519PrivateKey, directory: Path | None
) -> tuple[Checkpoint, Path | None]:
    """Sign the committed head, store it, and copy it to ``directory``."""
    if directory is not None:  # refused before signing: nothing is stored then
        _check_writable(directory)
    written = _checkpoint(engine, key, directory, only_if_new=False)
    if written is None:
        raise EmptyChain("the delivery log is empty: there is no head to sign yet")
    return written


def checkpoint_if_new(
    engine: Engine, key: Ed25519PrivateKey, directory: Path | None
) -> tuple[Checkpoint, Path | None] | None:
    """Like :func:`take_checkpoint`, but skip an empty log or an already signed head; and
    a directory that cannot take the file does not stop the database's checkpoint (the
    failed file is raised after it is stored)."""
    return _checkpoint(engine, key, directory, only_if_new=True)


def _checkpoint(
    engine: Engine, key: Ed25519PrivateKey, directory: Path | None, *, only_if_new: bool
) -> tuple[Checkpoint, Path | None] | None:
    with engine.begin() as conn:
        seq, head_hash = checkpoints.head(conn)
        if seq == 0 or (only_if_new and checkpoints.latest_seq(conn) == seq):
            return None
        signed = signing.sign(key, seq, head_hash, utcnow())
        checkpoints.add(conn, signed)
    # Written after the commit: a file never vouches for a head the database lost.
    try:
        path = signing.write_file(directory, signed) if directory is not None else None
    except OSError as exc:
        raise CheckpointFileFailed(
            f"checkpoint seq={signed.seq} is stored in the database, but its file in"
            f" {directory} was not written: {exc.strerror}"
        ) from exc
    return signed, path


def _check_writable(directory: Path) -> None:
    """Refuse, before signing, a checkpoint directory that cannot take the file (it is
    made when the file is written: nothing is created here)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(
            f"cannot use checkpoint directory {directory}: {existing} is not a directory"
            " this user can write in"
        )


@dataclass(frozen=True)
class Rebuilt:
    """What ``rebuild_ledger`` found (and, writing, fixed)."""

    differences: list[Difference]
    # Writing: SLA clocks and findings that came out different when re-run (0 checking).
    rederived: int = 0
    # ... and the merge requests they belong to, for people to look at.
    rederived_mrs: list[MRKey] = field(default_factory=list)


# What an SLA clock and a finding say, without when they were last written.
_CLOCKS = text(
    "SELECT instance, project_id, mr_iid, md5((instance, project_id, mr_iid, risk_tier,"
    " sla_hours, business_hours, required_approvals, labeled_at, label_seq, deadline,"
    " first_decision_at, first_decision, first_decision_by, first_decision_seq,"
    " ended_before_label)::text) FROM review_sla"
    " UNION ALL SELECT instance, project_id, mr_iid, md5((instance, project_id, mr_iid, rule,"
    " subject, severity, seqs, evidence, resolved_at IS NULL)::text) FROM findings"
)


def rebuild_ledger(
    engine: Engine,
    policy: LabelPolicy,
    *,
    write: bool,
    compliance: CompliancePolicy,
    tracker: Tracker | None = None,
) -> Rebuilt:
    """Every derived row that differs from the log; with ``write``, also fix them, and
    then re-run every MR's SLA clock and findings under ``compliance`` (they are derived
    from the rows just fixed), counting those that came out different."""
    with engine.connect() as conn:
        if not write:
            # One snapshot for the log and the tables it is compared with: deliveries
            # recorded meanwhile would otherwise show as rows the log does not explain.
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            # The log and the derived tables of public, as verify reads them: a schema
            # named after the login could hold pristine copies to compare instead.
            pin_search_path(conn)
            return _rebuild_in(conn, policy, write, compliance, tracker or Silent())


def _rebuild_in(
    conn: Connection,
    policy: LabelPolicy,
    write: bool,
    compliance: CompliancePolicy,
    tracker: Tracker,
) -> Rebuilt:
    if write:
        # Hold the chain lock: no delivery is recorded while the tables are repaired.
        Chain.open(conn)
    rebuilt = rebuild(conn, policy, tracker.task("reading the log", log_rows(conn)))
    if not write:
        return Rebuilt(derived.differences(conn, rebuilt))
    fixed = derived.repair(conn, rebuilt)
    before = {tuple(row) for row in conn.execute(_CLOCKS)}
    findings.reevaluate_all(conn, compliance, utcnow(), tracker)
    after = {tuple(row) for row in conn.execute(_CLOCKS)}
    changed = after - before
    mrs = sorted({MRKey(*row[:3]) for row in changed | (before - after)})
    return Rebuilt(fixed, len(changed), mrs)


def schedule(settings: Settings, engine: Engine) -> asyncio.Task[None] | None:
    """Start writing checkpoints every ``checkpoint_interval_minutes`` when a key is set."""
    key = scheduled_key(settings)
    if key is None:
        return None
    interval = settings.checkpoint_interval_minutes * 60
    return asyncio.create_task(_every(interval, engine, key, settings.checkpoint_dir))


def scheduled_key(settings: Settings) -> Ed25519PrivateKey | None:
    """The key ``schedule`` signs with, read now so that a bad one fails at start-up."""
    if settings.checkpoint_key_file is None or settings.checkpoint_interval_minutes <= 0:
        return None
    return signing.load_private(settings.checkpoint_key_file)


async def _every(
    interval: float, engine: Engine, key: Ed25519PrivateKey, directory: Path | None
) -> None:
    while True:
        try:
            written = await asyncio.to_thread(checkpoint_if_new, engine, key, directory)
        except Exception as exc:  # a missed checkpoint must not stop serving
            log.exception("checkpoint_failed", error=type(exc).__name__)
        else:
            if written is not None:
                log.info("checkpoint", seq=written[0].seq, file=str(written[1] or ""))
        await asyncio.sleep(interval)
