"""The hash chain over the delivery log: the canonical bytes of a row, defined once.

``hash = SHA-256(prev_hash || canonical(row))`` with a 32-byte zero ``prev_hash`` for
the first row. ``canonical`` is a versioned header followed by one length-prefixed
field per column, in a fixed order; the payload is the exact bytes received. See
docs/integrity.md for how to recompute it with psql and sha256sum alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import RowMapping

from secledger import digest
from secledger.quickinit import quick

GENESIS = bytes(32)
FORMAT = b"secledger.log.v1\n"
FIELDS = ("seq", "received_at", "source", "event", "instance", "dedup_key", "headers")


@quick
@dataclass(frozen=True)
class LogRow:
    """One delivery-log row as it is hashed."""

    seq: int
    received_at: datetime
    source: str
    event: str
    instance: str
    dedup_key: str
    headers: str
    payload: bytes

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | RowMapping) -> LogRow:
        """The hashed columns of a ``delivery_log`` row read from the database."""
        return cls(
            seq=row["seq"],
            received_at=row["received_at"],
            source=row["source"],
            event=row["event"],
            instance=row["instance"],
            dedup_key=row["dedup_key"],
            headers=row["headers"],
            payload=bytes(row["payload"]),
        )


def time_text(value: datetime) -> str:
    """Microsecond UTC spelling used in the canonical bytes (PostgreSQL keeps microseconds)."""
    # The same characters as strftime("%Y-%m-%dT%H:%M:%S.%fZ") for years 1000-9999.
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_PAYLOAD = b"payload"
_NAMES = tuple(name.encode() for name in FIELDS)


def _field(name: bytes, value: bytes) -> bytes:
    return b"%s %d\n%s\n" % (name, len(value), value)


def canonical(row: LogRow) -> bytes:
    """The bytes that are hashed for ``row``."""
    return b"".join(_canonical_parts(row))


def _canonical_parts(row: LogRow) -> list[bytes]:
    # The payload is passed on as it is, not copied into a field: it is most of the bytes.
    values = (
        str(row.seq),
        time_text(row.received_at),
        row.source,
        row.event,
        row.instance,
        row.dedup_key,
        row.headers,
    )
    parts = [FORMAT]
    parts.extend(
        _field(name, value.encode("utf-8", "surrogatepass"))
        for name, value in zip(_NAMES, values, strict=True)
    )
    parts.extend((b"%s %d\n" % (_PAYLOAD, len(row.payload)), row.payload, b"\n"))
    return parts


def link(prev_hash: bytes, row: LogRow) -> bytes:
    """The hash of ``row`` chained onto ``prev_hash``."""
    return digest.sha256(prev_hash, *_canonical_parts(row))
