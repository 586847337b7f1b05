"""Walk the delivery log in sequence order and prove every link of the hash chain.

The walk streams (a server-side cursor, constant memory) inside one REPEATABLE READ
snapshot, so rows committed meanwhile neither appear half-way nor break the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, text

from secledger import checkpoint as signing
from secledger.checkpoint import Checkpoint
from secledger.errors import SecledgerError
from secledger.store import checkpoints
from secledger.store.chain import GENESIS, LogRow, link
from secledger.store.db import pin_search_path

BATCH_ROWS = 5000
_ROWS = (
    "SELECT seq, received_at, source, event, instance, dedup_key, headers, payload,"
    " prev_hash, hash, body_sha256 FROM delivery_log ORDER BY seq"
)


class ChainBroken(SecledgerError):
    """The first log row whose sequence number, link or hash is wrong."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"row seq={seq}: {reason}")
        self.seq = seq
        self.reason = reason


@dataclass(frozen=True)
class Expected:
    """A head someone vouched for (a checkpoint): at ``seq`` the hash must be ``hash``."""

    seq: int
    hash: bytes
    label: str
    # False for a stored checkpoint taken at its word (verify given no public key): the
    # app's login may insert into the table, so a mismatch may be the checkpoint's.
    signature_checked: bool = True

    def suspect(self) -> str:
        """What else a mismatch with it may mean, when its signature was not checked."""
        if self.signature_checked:
            return ""
        return (
            ", or this checkpoint was inserted into the table: its signature was not"
            " checked; run verify with --public-key to tell which"
        )


@dataclass
class Summary:
    """What a successful walk saw."""

    rows: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    head_hash: bytes = GENESIS
    seconds: float = 0.0
    matched: list[str] = field(default_factory=list)
    stored: list[tuple[int, Checkpoint]] = field(default_factory=list)
    # The stored checkpoints the walk held the chain to (all of them, without a screen).
    trusted: list[tuple[int, Checkpoint]] = field(default_factory=list)
    # Stored checkpoints whose signature fails under the key: each a label and why.
    forged: list[str] = field(default_factory=list)


Stored = list[tuple[int, Checkpoint]]
# Splits the stored checkpoints into those to trust and the forged ones (labels, why).
Screen = Callable[[Stored], tuple[Stored, list[str]]]


def _sequence_problem(seq: int, expected_seq: int) -> str:
    if seq < expected_seq:
        return f"sequence out of order: expected seq {expected_seq}"
    missing = str(expected_seq) if seq == expected_seq + 1 else f"{expected_seq}..{seq - 1}"
    return f"sequence gap: expected seq {expected_seq}; rows {missing} are missing"


def check_row(values: Any, prev_hash: bytes, expected_seq: int) -> bytes:
    """Raise ChainBroken unless ``values`` (one log row) is the next link; its hash."""
    seq, received_at, source, event, instance, dedup_key, headers = values[:7]
    row = LogRow(seq, received_at, source, event, instance, dedup_key, headers, bytes(values[7]))
    if row.seq != expected_seq:
        raise ChainBroken(row.seq, _sequence_problem(row.seq, expected_seq))
    stored_prev = bytes(values[8])
    if stored_prev != prev_hash:
        raise ChainBroken(
            row.seq,
            "broken link: prev_hash is not the hash of the row before it"
            f" ({stored_prev.hex()[:16]}... != {prev_hash.hex()[:16]}...)",
        )
    digest = link(prev_hash, row)
    if digest != bytes(values[9]):
        raise ChainBroken(
            row.seq,
            "hash mismatch: the row's contents do not hash to its stored hash"
            " (a column or a payload byte was changed)",
        )
    # Outside the chain's hash, but deduplication trusts it: set to another body's hash,
    # it would answer that body, delivered later, "duplicate" and log it nowhere.
    body = values[10] if len(values) > 10 else None
    if body is not None and bytes(body) != hashlib.sha256(row.payload).digest():
        raise ChainBroken(
            row.seq,
            "body_sha256 is not the SHA-256 of the payload: deduplication would take"
            " another body for this row's",
        )
    return digest


def _check_vouched(seq: int, digest: bytes, vouched: Iterable[Expected], summary: Summary) -> None:
    for item in vouched:
        if item.hash != digest:
            raise ChainBroken(
                seq,
                f"differs from {item.label}: the chain's hash here is {digest.hex()},"
                f" the checkpoint signed {item.hash.hex()} (history was rewritten{item.suspect()})",
            )
        summary.matched.append(item.label)


def walk(rows: Iterable[Any], expected: Mapping[int, list[Expected]] | None = None) -> Summary:
    """Check log rows given in seq order; raise ChainBroken at the first bad one."""
    expected = expected or {}
    summary = Summary()
    prev_hash = GENESIS
    next_seq = 1
    for values in _readable(rows):
        prev_hash = check_row(values, prev_hash, next_seq)
        if next_seq in expected:
            _check_vouched(next_seq, prev_hash, expected[next_seq], summary)
        summary.rows += 1
        next_seq += 1
    summary.first_seq = 1 if summary.rows else None
    summary.last_seq, summary.head_hash = next_seq - 1, prev_hash
    _check_coverage(summary, expected)
    return summary


UNREADABLE = "unreadable: "
# The values PostgreSQL keeps and Python's datetime cannot hold.
_UNREADABLE_AT = text(
    "SELECT seq, received_at::text FROM delivery_log WHERE seq >= :seq"
    " AND (NOT isfinite(received_at) OR received_at >= '10000-01-01'"
    " OR received_at < '0001-01-01T00:00:00Z')"
    " ORDER BY seq LIMIT 1"
)


def _unreadable_row(conn: Connection, broken: ChainBroken) -> ChainBroken:
    """``broken`` narrowed from a batch of rows to the row itself, when it can be found."""
    found = conn.execute(_UNREADABLE_AT, {"seq": broken.seq}).first()
    if found is None:
        return broken
    return ChainBroken(int(found[0]), f"{UNREADABLE}received_at is {found[1]!r}")


def _readable(rows: Iterable[Any]) -> Iterator[Any]:
    """``rows`` (from seq 1); a value PostgreSQL holds but the driver cannot read (a
    timestamp of ``infinity``, only ever written around secledger) breaks the chain
    where it is met. Rows come in batches, so that is at or after the seq named."""
    iterator = iter(rows)
    seq = 1
    while True:
        try:
            values = next(iterator)
        except StopIteration:
            return
        except psycopg.DataError as exc:
            reason = f"{UNREADABLE}this row or one of the next {BATCH_ROWS - 1} holds {exc}"
            raise ChainBroken(seq, reason) from exc
        seq += 1
        yield values


def _check_coverage(summary: Summary, expected: Mapping[int, list[Expected]]) -> None:
    """A checkpoint beyond the last row means rows were removed from the tail."""
    beyond = [seq for seq in expected if seq > summary.last_seq]
    if beyond:
        furthest = max(beyond)
        item = expected[furthest][0]
        raise ChainBroken(
            summary.last_seq + 1,
            f"missing: the chain ends at seq {summary.last_seq} but {item.label} covers seq"
            f" {furthest} (rows {summary.last_seq + 1}..{furthest} were removed{item.suspect()})",
        )


def _with_stored(
    vouched: Iterable[Expected], stored: list[tuple[int, Checkpoint]], *, checked: bool
) -> dict[int, list[Expected]]:
    expected: dict[int, list[Expected]] = {}
    for item in vouched:
        expected.setdefault(item.seq, []).append(item)
    for ident, checkpoint in stored:
        label = f"stored checkpoint #{ident} (seq {checkpoint.seq})"
        expected.setdefault(checkpoint.seq, []).append(
            Expected(checkpoint.seq, checkpoint.head_hash, label, signature_checked=checked)
        )
    return expected


def log_rows(engine: Engine) -> int:
    """How many rows the log should hold: its highest sequence number (for progress)."""
    with engine.connect() as conn:
        return int(
            conn.execute(text("SELECT coalesce(max(seq), 0) FROM delivery_log")).scalar_one()
        )


def verify(
    engine: Engine,
    vouched: Iterable[Expected] = (),
    *,
    progress: Callable[[int], None] | None = None,
    screen: Screen | None = None,
) -> Summary:
    """Walk the whole log in one snapshot against ``vouched`` heads and stored checkpoints.

    ``progress``, when given, is called with the size of each batch of rows fetched.
    ``screen``, when given, picks the stored checkpoints to trust (in the same snapshot)
    and names the forged ones (``Summary.forged``); without it every stored one is
    trusted.
    """
    started = time.perf_counter()
    with engine.connect() as plain:
        conn = plain.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            pin_search_path(conn)
            stored = checkpoints.stored(conn)
            trusted, forged = screen(stored) if screen is not None else (stored, [])
            expected = _with_stored(vouched, trusted, checked=screen is not None)
            # psycopg's binary protocol directly: bytea travels as raw bytes, not hex text,
            # which halves what the server sends for a log that is mostly payload.
            raw = conn.connection.driver_connection
            try:
                with raw.cursor(name="secledger_verify", binary=True) as cursor:  # type: ignore[union-attr]
                    cursor.execute(_ROWS)
                    batches = iter(lambda: cursor.fetchmany(BATCH_ROWS), [])
                    if progress is not None:
                        batches = _counted(batches, progress)
                    with _Prefetch(batches) as rows:
                        summary = walk(rows, expected)
            except ChainBroken as exc:
                if not exc.reason.startswith(UNREADABLE):
                    raise
                raise _unreadable_row(conn, exc) from None
    summary.stored, summary.trusted, summary.forged = stored, trusted, forged
    summary.seconds = time.perf_counter() - started
    return summary


def _counted(batches: Iterable[list[Any]], progress: Callable[[int], None]) -> Iterator[Any]:
    for batch in batches:
        progress(len(batch))
        yield batch


_DONE = object()


class _Prefetch:
    """Fetch the next batch in a thread while this one is hashed.

    The server reads and sends a batch while Python hashes the previous one (hashlib
    and the socket wait both release the GIL), which nearly halves the wall time.
    At most two batches are held, so memory stays constant.
    """

    def __init__(self, batches: Iterable[Any]) -> None:
        self._batches = batches
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="secledger-verify", daemon=True)

    def _fill(self) -> None:
        try:
            for batch in self._batches:
                if self._stop.is_set():
                    return
                self._queue.put(batch)
            self._queue.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer and raised there
            self._queue.put(exc)

    def __enter__(self) -> Iterator[Any]:
        self._thread.start()
        return self._rows()

    def _rows(self) -> Iterator[Any]:
        while (batch := self._queue.get()) is not _DONE:
            if isinstance(batch, BaseException):
                raise batch
            yield from batch

    def __exit__(self, *exc: object) -> None:
        # Stop early (a broken row was found): unblock the producer, then wait for it,
        # so the connection is idle before the transaction ends.
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        self._thread.join()


def signed_by(*keys: Ed25519PublicKey | None) -> Screen | None:
    """With public keys, what ``verify`` may trust of the stored checkpoints: those one of
    them signed, once their signatures hold. A bad one is a forgery (the app's login may
    insert into the table) and is named as such, apart from the chain's verdict: taken
    at its word, a seq beyond the tail read as rows removed, and any seq as history
    rewritten, for good (the table is append-only). One made with a key not given cannot
    be checked here, so it is not trusted either (`verify` reports count it). Several
    keys: the checkpoints signed before a key rotation and after it."""
    by_id = {signing.key_id(key): key for key in keys if key is not None}
    if not by_id:
        return None

    def trusted(stored: Stored) -> tuple[Stored, list[str]]:
        kept, forged = [], []
        for ident, checkpoint in stored:
            public = by_id.get(checkpoint.key_id)
            if public is None:
                # key_id is not signed: edited to a key not given, a checkpoint one of
                # these keys signed was left out, with whatever it would have caught.
                if any(signing.signed_by(checkpoint, key) for key in by_id.values()):
                    kept.append((ident, checkpoint))
                continue
            try:
                signing.check_signature(checkpoint, public)
            except signing.BadCheckpoint as exc:
                forged.append(f"stored checkpoint #{ident} (seq {checkpoint.seq}): {exc}")
                continue
            kept.append((ident, checkpoint))
        return kept, forged

    return trusted
