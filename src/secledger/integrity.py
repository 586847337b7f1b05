"""Integrity operations over an engine: checkpoints, rebuilds, and the serve-side schedule."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
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
from secledger.store.chain import time_text
from secledger.store.db import pin_search_path
from secledger.store.log import Chain
from secledger.tierpolicy import CompliancePolicy
from secledger.times import utcnow

log = structlog.get_logger("secledger.integrity")


class EmptyChain(SecledgerError):
    """There is nothing to checkpoint yet."""


class CheckpointFileFailed(SecledgerError):
    """The checkpoint was signed and stored, but its copy outside the database was not."""


class HeadNotExtended(SecledgerError):
    """The log no longer holds the head this key signed last: signing its head now would
    vouch for a history rewritten or cut since."""


RESTORED_HINT = (
    "run `secledger verify --checkpoint <that file> --public-key ...` to see what changed;"
    " after restoring a backup, sign the restored head once with `secledger checkpoint"
    " --restored` (docs/operations.md, Backup and restore)"
)
# Files and stored rows looked at, newest first, for the last head this key signed:
# others' files in a shared directory, or rows the app's login inserted, may be newer.
_LOOK_BACK = 64


def take_checkpoint(
    engine: Engine, key: Ed25519PrivateKey, directory: Path | None, *, restored: bool = False
) -> tuple[Checkpoint, Path | None]:
    """Sign the committed head, store it, and copy it to ``directory``.

    Refused (HeadNotExtended) when the log does not hold the head this key signed last,
    unless ``restored`` (a backup was restored, and the operator says so)."""
    if directory is not None:  # refused before signing: nothing is stored then
        _check_writable(directory)
    written = _checkpoint(engine, key, directory, only_if_new=False, restored=restored)
    if written is None:
        raise EmptyChain("the delivery log is empty: there is no head to sign yet")
    return written


def checkpoint_if_new(
    engine: Engine,
    key: Ed25519PrivateKey,
    directory: Path | None,
    remembered: Checkpoint | None = None,
) -> tuple[Checkpoint, Path | None] | None:
    """Like :func:`take_checkpoint`, but skip an empty log or an already signed head; and
    a directory that cannot take the file does not stop the database's checkpoint (the
    failed file is raised after it is stored). ``remembered`` is the checkpoint this
    process signed last (serve keeps it), one more place the last signed head is read
    from: the stored ones can be deleted by whoever rewrites the log."""
    return _checkpoint(engine, key, directory, only_if_new=True, remembered=remembered)


def _checkpoint(
    engine: Engine,
    key: Ed25519PrivateKey,
    directory: Path | None,
    *,
    only_if_new: bool,
    restored: bool = False,
    remembered: Checkpoint | None = None,
) -> tuple[Checkpoint, Path | None] | None:
    with engine.begin() as conn:
        seq, head_hash = checkpoints.head(conn)
        if seq == 0:
            return None
        last = last_signed(conn, key.public_key(), directory, remembered)
        problem = None if last is None else _not_extended(conn, last, seq)
        if problem is not None and not restored:
            raise HeadNotExtended(f"{problem}; not signed: {RESTORED_HINT}")
        if only_if_new and problem is None and last is not None and last.seq == seq:
            return None
        now = utcnow()
        if restored and last is not None and last.signed_at >= now:
            # Newest by signing time is what later checks start from: one stamped after
            # this host's clock would stay the newest, and every later check refuse.
            raise HeadNotExtended(
                f"the newest checkpoint this key signed is dated {time_text(last.signed_at)},"
                f" after this host's clock ({time_text(now)}): sign the restored head from"
                " a host whose clock is right, or after that time"
            )
        signed = signing.sign(key, seq, head_hash, now)
        checkpoints.add(conn, signed)
        if problem is not None:
            log.warning("checkpoint_restored", seq=seq, overriding=problem)
    # Written after the commit: a file never vouches for a head the database lost.
    try:
        path = signing.write_file(directory, signed) if directory is not None else None
    except OSError as exc:
        raise CheckpointFileFailed(
            f"checkpoint seq={signed.seq} is stored in the database, but its file in"
            f" {directory} was not written: {exc.strerror}"
        ) from exc
    return signed, path


def last_signed(
    conn: Connection,
    public: Ed25519PublicKey,
    directory: Path | None,
    remembered: Checkpoint | None = None,
) -> Checkpoint | None:
    """The newest checkpoint (by signing time) that ``public``'s key signed, whose
    signature holds, among ``remembered``, the stored ones and the files in
    ``directory``. Files and memory are read too because whoever rewrites the log can
    delete the stored ones, not (on object-locked storage) the files."""
    found = [] if remembered is None else [remembered]
    # Whatever key_id a stored row names (it is not signed, and may be edited).
    found += _holding(checkpoints.recent(conn, _LOOK_BACK), public)
    if directory is not None:
        found += _holding(_newest_files(directory), public)
    return max(found, key=lambda checkpoint: checkpoint.signed_at, default=None)


def _holding(candidates: Iterable[Checkpoint], public: Ed25519PublicKey) -> list[Checkpoint]:
    """The first of ``candidates`` that ``public``'s key signed (or none)."""
    return next(([c] for c in candidates if signing.signed_by(c, public)), [])


def _newest_files(directory: Path) -> Iterator[Checkpoint]:
    """The checkpoint files in ``directory``, newest signing time first (from the names
    ``write_file`` gives them), at most ``_LOOK_BACK`` read."""
    try:
        names = [path for path in directory.iterdir() if _FILE_NAME.fullmatch(path.name)]
    except OSError:
        return  # no directory yet, or one this user cannot list: nothing to compare with
    names.sort(key=lambda path: path.name.rsplit("-", 1)[1], reverse=True)
    for path in names[:_LOOK_BACK]:
        try:
            yield signing.read_file(path)
        except signing.BadCheckpoint:
            continue


_FILE_NAME = re.compile(r"checkpoint-\d{12,}-\d{8}T\d{12}Z\.json")


def _not_extended(conn: Connection, last: Checkpoint, head_seq: int) -> str | None:
    """Why the log's head does not extend ``last``, or None when it does."""
    signed = f"the checkpoint signed at {time_text(last.signed_at)}"
    if last.seq > head_seq:
        return (
            f"the log ends at seq {head_seq}, but {signed} covers seq {last.seq}: rows"
            f" {head_seq + 1}..{last.seq} were removed"
        )
    found = checkpoints.hash_at(conn, last.seq)
    if found != last.head_hash:
        return (
            f"the log's hash at seq {last.seq} is not the one {signed} vouches for:"
            " history was rewritten"
        )
    return None


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
    remembered: Checkpoint | None = None
    while True:
        refused: HeadNotExtended | None = None
        try:
            written = await asyncio.to_thread(checkpoint_if_new, engine, key, directory, remembered)
        except HeadNotExtended as exc:
            refused = exc
        except Exception as exc:  # a missed checkpoint must not stop serving
            log.exception("checkpoint_failed", error=type(exc).__name__)
        else:
            if written is not None:
                remembered = written[0]
                log.info("checkpoint", seq=written[0].seq, file=str(written[1] or ""))
        if refused is not None:
            # An alarm, not a passing failure: asked again every interval, refused each time.
            log.error("checkpoint_refused", reason=str(refused))
        await asyncio.sleep(interval)
