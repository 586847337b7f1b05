"""A durable on-disk queue of verified deliveries, for when PostgreSQL cannot take them.

One file per delivery, named so that sorting the names gives arrival order. A file
appears under its final name only once its bytes are on disk: it is written under a
temporary name, fsync'd, renamed, and the directory is fsync'd, so a crash at any
point leaves either a complete delivery or a temporary file that is never read as one.
A file whose checksum does not match is moved to ``corrupt/`` and reported, never
dropped. No database here: :mod:`secledger.drain` records what this module keeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from secledger.errors import SecledgerError, StoreUnavailable
from secledger.intake import Delivery
from secledger.times import isoformat

MAGIC = b"secledger.spool.v1\n"
SUFFIX = ".dlv"
TEMP_PREFIX = ".tmp-"
CORRUPT = "corrupt"
FAILED = "failed"
# Deliveries a drain found ignored, kept for a while: the delivery that makes their MR
# a security MR may still be in another replica's spool (``keep_ignored``).
IGNORED = "ignored"
LOCK_FILE = ".drain.lock"
# Free space below which /readyz calls the spool unwritable: room for a few deliveries.
MIN_FREE_BYTES = 1 << 20
_META_KEYS = ("received_at", "source", "event", "instance", "dedup_key", "headers")


class SpoolUnavailable(StoreUnavailable):
    """The spool directory cannot be written, so nothing can be acknowledged."""


class CorruptEntry(SecledgerError):
    """A spool file is not a complete delivery written by this module."""


class DrainBusy(SecledgerError):
    """Another process is draining this spool right now."""


@dataclass(frozen=True)
class SpooledDelivery:
    """What a spool file holds: everything needed to record the delivery later."""

    received_at: datetime
    source: str
    event: str
    instance: str
    dedup_key: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class SpoolStatus:
    """Depth, age and size of the spool, plus files set aside."""

    directory: Path
    depth: int
    bytes: int
    oldest: datetime | None
    corrupt: int
    failed: int
    # Whether a delivery could be written now: the spool's protection is lost while it
    # cannot, which otherwise shows only once the database is down (as 503s).
    writable: bool = True
    # Why the directory cannot be used as it is (missing, not a directory, unreadable).
    problem: str | None = None
    # Deliveries a drain found ignored, kept in ignored/ for the hold.
    ignored: int = 0

    def to_json(self) -> dict[str, Any]:
        """For /readyz and ``spool status --format json``."""
        return {
            "directory": str(self.directory),
            "depth": self.depth,
            "bytes": self.bytes,
            "oldest": isoformat(self.oldest),
            "corrupt": self.corrupt,
            "failed": self.failed,
            "ignored": self.ignored,
            "writable": self.writable,
            "problem": self.problem,
        }


def encode(delivery: Delivery) -> bytes:
    """The bytes of one spool file: magic line, JSON metadata line, raw body."""
    meta = {
        "received_at": delivery.received_at.isoformat(),
        "source": delivery.source,
        "event": delivery.event,
        "instance": delivery.instance,
        "dedup_key": delivery.dedup_key,
        "headers": delivery.headers,
        "body_length": len(delivery.body),
        "body_sha256": hashlib.sha256(delivery.body).hexdigest(),
    }
    return MAGIC + orjson.dumps(meta) + b"\n" + delivery.body


def decode(data: bytes) -> SpooledDelivery:
    """Parse a spool file, or raise CorruptEntry saying what is wrong."""
    if not data.startswith(MAGIC):
        raise CorruptEntry("does not start with the spool format line")
    meta_line, newline, body = data[len(MAGIC) :].partition(b"\n")
    if not newline:
        raise CorruptEntry("metadata line is incomplete")
    try:
        meta = orjson.loads(meta_line)
    except orjson.JSONDecodeError as exc:
        raise CorruptEntry(f"metadata is not JSON: {exc}") from None
    if not isinstance(meta, dict) or any(key not in meta for key in _META_KEYS):
        raise CorruptEntry("metadata lacks a required field")
    if meta.get("body_length") != len(body):
        raise CorruptEntry(f"body is {len(body)} bytes, metadata says {meta.get('body_length')}")
    if meta.get("body_sha256") != hashlib.sha256(body).hexdigest():
        raise CorruptEntry("body checksum does not match")
    try:
        received_at = datetime.fromisoformat(meta["received_at"])
    except (TypeError, ValueError):
        raise CorruptEntry("received_at is not an ISO 8601 time") from None
    if received_at.tzinfo is None:
        raise CorruptEntry("received_at has no time zone")
    return SpooledDelivery(
        received_at=received_at,
        source=str(meta["source"]),
        event=str(meta["event"]),
        instance=str(meta["instance"]),
        dedup_key=str(meta["dedup_key"]),
        headers={str(k): str(v) for k, v in dict(meta["headers"]).items()},
        body=body,
    )


def fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """One spool directory. Only one process (``serve``) writes to it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._last = 0
        self.depth = 0
        self._seen: int | None = None  # the directory's mtime when ``refresh`` last looked

    @classmethod
    def open(cls, directory: Path, *, writer: bool = True) -> Spool:
        """Create the directory if needed, count; the writer also removes interrupted writes."""
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            for leftover in directory.glob(TEMP_PREFIX + "*") if writer else ():
                # A temporary file is a write that never finished; it was never acknowledged.
                # Only the writer may remove them: another process's write may be under way.
                leftover.unlink(missing_ok=True)
        except OSError as exc:
            raise SpoolUnavailable(f"cannot use spool directory {directory}: {exc}") from exc
        spool = cls(directory)
        names = spool.entries()
        spool.depth = len(names)
        if names:
            spool._last = int(names[-1].name.split("-", 1)[0])
        return spool

    def entries(self) -> list[Path]:
        """Spooled deliveries, oldest first."""
        try:
            return sorted(p for p in self.directory.iterdir() if _is_entry(p))
        except (FileNotFoundError, NotADirectoryError):
            return []  # the directory is gone: nothing in it can be drained
        except OSError as exc:
            # Too many open files, an I/O error, a stale mount: raised as the spool's own
            # failure, which every caller on the writer's path is ready for (a bare
            # OSError from here once ended the writer thread for good).
            raise SpoolUnavailable(
                f"cannot list the spool {self.directory}: {exc.strerror}"
            ) from exc

    def write(self, deliveries: Sequence[Delivery]) -> list[Path]:
        """Durably add ``deliveries`` in order; raises SpoolUnavailable if it cannot.

        All or nothing, as far as the disk allows: when one cannot be written, those
        this call already wrote are removed again, so that the 503 every one of them is
        then answered means that none is kept.
        """
        with self._lock:
            paths: list[Path] = []
            try:
                for delivery in deliveries:
                    paths.append(self._write_one(delivery))
                fsync_dir(self.directory)
            except OSError as exc:
                self._take_back(paths)
                raise SpoolUnavailable(f"cannot write to the spool: {exc.strerror}") from exc
            self.depth += len(paths)
            return paths

    def discard(self, paths: Sequence[Path]) -> None:
        """Remove files just written whose deliveries are answered as not kept after all."""
        with self._lock:
            self._take_back(paths)

    def _take_back(self, paths: Sequence[Path]) -> None:
        # Each on its own: one that cannot be removed must not keep the others. What
        # stays is drained like any file; GitLab's resend, which the refusal asks for,
        # is then answered ``duplicate``. Nothing is lost or doubled.
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            fsync_dir(self.directory)
        # Unlisted, the depth stays as it was: these files were not counted in it yet.
        with contextlib.suppress(SpoolUnavailable):
            self.depth = len(self.entries())

    def _write_one(self, delivery: Delivery) -> Path:
        # Names sort in arrival order: a nanosecond clock that never goes backwards here,
        # plus the pid so that names from two processes can never collide.
        self._last = max(self._last + 1, time.time_ns())
        name = f"{self._last:020d}-{os.getpid()}{SUFFIX}"
        temp = self.directory / f"{TEMP_PREFIX}{name}"
        try:
            _write_synced(temp, encode(delivery))
            temp.rename(self.directory / name)
        except OSError:
            temp.unlink(missing_ok=True)
            raise
        return self.directory / name

    def read(self, path: Path) -> SpooledDelivery:
        """The delivery in ``path``; CorruptEntry if it is not a complete spool file."""
        return decode(path.read_bytes())

    def remove(self, paths: Sequence[Path]) -> None:
        """Forget deliveries whose transaction has committed."""
        for path in paths:
            path.unlink(missing_ok=True)
        fsync_dir(self.directory)
        self.recount()

    def keep_ignored(self, paths: Sequence[Path]) -> None:
        """Move files a drain found ignored to ``ignored/``, each stamped with the time
        it was moved (its modification time), where they are judged again
        (``ignoredspool``)."""
        target_dir = self.directory / IGNORED
        target_dir.mkdir(exist_ok=True, mode=0o700)
        for path in paths:
            try:
                # Stamped first: a crash before the move leaves it in the queue, drained again.
                os.utime(path)
                path.rename(target_dir / path.name)
            except FileNotFoundError:
                continue  # drained meanwhile by another process
        fsync_dir(target_dir)
        fsync_dir(self.directory)
        self.recount()

    def ignored_paths(self) -> list[Path]:
        """The files of ``ignored/``, in name order (arrival order)."""
        try:
            return sorted(p for p in (self.directory / IGNORED).iterdir() if _is_entry(p))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def requeue_ignored(self, paths: Sequence[Path]) -> None:
        """Put files of ``ignored/`` back in the queue, where their names keep their place."""
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.rename(self.directory / path.name)
        fsync_dir(self.directory)
        self.recount()

    def has_ignored(self) -> bool:
        """Whether ``ignored/`` holds anything (without listing it all)."""
        try:
            with os.scandir(self.directory / IGNORED) as found:
                return any(_is_entry(Path(entry.path)) for entry in found)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def forget_ignored(self, path: Path) -> None:
        """Delete a file of ``ignored/``."""
        path.unlink(missing_ok=True)

    def ignored_count(self) -> int:
        """Files in ``ignored/``."""
        return _count(self.directory / IGNORED)

    def set_aside(self, path: Path, folder: str, reason: str) -> Path:
        """Move a file that cannot be recorded to ``folder`` with a note saying why."""
        target_dir = self.directory / folder
        target_dir.mkdir(exist_ok=True, mode=0o700)
        target = target_dir / path.name
        (target_dir / f"{path.name}.reason").write_text(reason + "\n")
        path.rename(target)
        fsync_dir(target_dir)
        fsync_dir(self.directory)
        with contextlib.suppress(SpoolUnavailable):  # set aside all the same
            self.recount()
        return target

    def refresh(self) -> int:
        """``recount`` when the directory changed since the last look: a file an operator
        moved back from failed/ (docs/operations.md) was neither drained nor counted by
        the gauge until the next delivery, which went ahead of it."""
        try:
            stamp = self.directory.stat().st_mtime_ns
        except OSError:
            return self.depth
        if stamp == self._seen:
            return self.depth
        self._seen = stamp
        return self.recount()

    def recount(self) -> int:
        """Re-read the depth from the directory (another process may have drained)."""
        # Under the lock: a write from another thread between the listing and the
        # assignment would otherwise be lost from the count, and its file left undrained.
        with self._lock:
            self.depth = len(self.entries())
            return self.depth

    def status(self) -> SpoolStatus:
        """Depth, total bytes, oldest receipt time, and files set aside; a directory that
        cannot be used is reported (``problem``), not raised: monitoring reads this."""
        problem = self._problem()
        if problem is not None:
            return SpoolStatus(self.directory, 0, 0, None, 0, 0, writable=False, problem=problem)
        try:
            names = self.entries()
        except SpoolUnavailable as exc:
            why = f"cannot be listed: {getattr(exc.__cause__, 'strerror', None) or exc}"
            return SpoolStatus(self.directory, 0, 0, None, 0, 0, writable=False, problem=why)
        size = sum(_size(p) for p in names)
        oldest = None
        for path in names[:1]:
            try:
                oldest = self.read(path).received_at
            except (OSError, CorruptEntry):
                oldest = None
        return SpoolStatus(
            directory=self.directory,
            depth=len(names),
            bytes=size,
            oldest=oldest,
            corrupt=_count(self.directory / CORRUPT),
            failed=_count(self.directory / FAILED),
            writable=self.writable(),
            ignored=_count(self.directory / IGNORED),
        )

    def _problem(self) -> str | None:
        try:
            mode = self.directory.stat().st_mode
        except FileNotFoundError:
            return "does not exist (serve creates it when it starts)"
        except OSError as exc:  # a parent this user may not enter (Path.exists raises too)
            return f"cannot be reached: {exc.strerror}"
        if not stat.S_ISDIR(mode):
            return "is not a directory"
        try:
            next(self.directory.iterdir(), None)
        except OSError as exc:
            return f"cannot be listed: {exc.strerror}"
        return None

    def writable(self) -> bool:
        """Whether a delivery could be spooled now: a directory it may write in, on a
        file system with room for one (a full disk answered 503 to every delivery while
        the permission alone said writable)."""
        if not (self.directory.is_dir() and os.access(self.directory, os.W_OK | os.X_OK)):
            return False
        try:
            return shutil.disk_usage(self.directory).free >= MIN_FREE_BYTES
        except OSError:
            return False

    @contextmanager
    def draining(self) -> Iterator[None]:
        """Hold the drain lock, so two processes never drain at once; DrainBusy if held."""
        try:
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            # Draining deletes each file it recorded: it needs to write here anyway.
            raise SpoolUnavailable(f"cannot drain {self.directory}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DrainBusy(f"another process is draining {self.directory}") from None
            yield
        finally:
            os.close(fd)


def _is_entry(path: Path) -> bool:
    # By name alone (no stat per file): temporary files start with a dot, and the
    # corrupt/ and failed/ folders do not end with the suffix.
    return path.name.endswith(SUFFIX) and not path.name.startswith(".")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _count(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.name.endswith(SUFFIX))
