"""The hash chain over the delivery log: the canonical bytes of a row, defined once.

``hash = SHA-256(prev_hash || canonical(row))`` with a 32-byte zero ``prev_hash`` for
the first row. ``canonical`` is a versioned header followed by one length-prefixed
field per column, in a fixed order; the payload is the exact bytes received. See
docs/integrity.md for how to recompute it with psql and sha256sum alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

GENESIS = bytes(32)
FORMAT = b"secledger.log.v1\n"
FIELDS = ("seq", "received_at", "source", "event", "instance", "dedup_key", "headers")


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


def time_text(value: datetime) -> str:
    """Microsecond UTC spelling used in the canonical bytes (PostgreSQL keeps microseconds)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_PAYLOAD = b"payload"
_NAMES = tuple(name.encode() for name in FIELDS)


def _field(name: bytes, value: bytes) -> bytes:
    return b"%s %d\n%s\n" % (name, len(value), value)


def canonical(row: LogRow) -> bytes:
    """The bytes that are hashed for ``row``."""
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
    parts.append(_field(_PAYLOAD, row.payload))
    return b"".join(parts)


def link(prev_hash: bytes, row: LogRow) -> bytes:
    """The hash of ``row`` chained onto ``prev_hash``."""
    return hashlib.sha256(prev_hash + canonical(row)).digest()
