"""SHA-256 and HMAC-SHA256 that keep the interpreter lock.

hashlib gives up the GIL while it hashes any input of 2 KiB or more (and, once it has,
for every later update of that object). In the receiver the event loop and the writer
thread share the lock: the thread that gave it up for a few microseconds of hashing then
waited up to a switch interval (5 ms) to get it back from the other, busy one. Fed in
pieces below that size, hashing never lets go of the lock; the result is the same.
"""

from __future__ import annotations

import hashlib
import hmac

# One byte under hashlib's HASHLIB_GIL_MINSIZE (2048).
_PIECE = 2047


def _feed(hasher: hashlib._Hash | hmac.HMAC, parts: tuple[bytes, ...]) -> None:
    for part in parts:
        if len(part) <= _PIECE:
            hasher.update(part)
            continue
        view = memoryview(part)
        for start in range(0, len(view), _PIECE):
            hasher.update(view[start : start + _PIECE])


def sha256(*parts: bytes) -> bytes:
    """SHA-256 of the concatenation of ``parts``."""
    hasher = hashlib.sha256()
    _feed(hasher, parts)
    return hasher.digest()


def hmac_sha256(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 with ``key`` of the concatenation of ``parts``."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    _feed(mac, parts)
    return mac.digest()
