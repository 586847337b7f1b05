"""A request's headers as a read-only ``str`` mapping over ASGI's raw byte pairs.

Intake reads a handful of headers by name; decoding every header of every request into
a new dict cost the receiver more than any other step before the JSON parse (fresh
bytes to hash, strings to allocate and free). Here the pairs go into a dict in one C
call, and only the values asked for are decoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar, overload

_T = TypeVar("_T")

# Names intake asks for, encoded once.
_ENCODED: dict[str, bytes] = {}


def _key(name: str) -> bytes:
    key = _ENCODED.get(name)
    if key is None:
        key = name.encode("latin-1", "replace")
        if len(_ENCODED) < 256:  # names come from code, but stay bounded anyway
            _ENCODED[name] = key
    return key


class RequestHeaders(Mapping[str, str]):
    """Header names are lower-case (ASGI lower-cases them); of repeated names, the last wins."""

    __slots__ = ("_raw",)

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        self._raw: dict[bytes, bytes] = dict(pairs)

    @overload
    def get(self, name: str, /) -> str | None: ...

    @overload
    def get(self, name: str, default: str, /) -> str: ...

    @overload
    def get(self, name: str, default: _T, /) -> str | _T: ...

    def get(self, name: str, default: object = None, /) -> object:
        """The decoded value of ``name``, or ``default``."""
        value = self._raw.get(_key(name))
        return default if value is None else value.decode("latin-1")

    def raw(self, name: str) -> bytes | None:
        """The value of ``name`` as sent, undecoded."""
        return self._raw.get(_key(name))

    def pick(self, names: tuple[str, ...], limit: int) -> dict[str, str]:
        """Those of ``names`` present, each value cut to ``limit`` characters, in one pass."""
        raw = self._raw
        picked: dict[str, str] = {}
        for name in names:
            value = raw.get(_key(name))
            if value is not None:
                picked[name] = value.decode("latin-1")[:limit]
        return picked

    def __getitem__(self, name: str) -> str:
        value = self._raw.get(_key(name))
        if value is None:
            raise KeyError(name)
        return value.decode("latin-1")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (_key(name)) in self._raw

    def __iter__(self) -> Iterator[str]:
        return (name.decode("latin-1") for name in self._raw)

    def __len__(self) -> int:
        return len(self._raw)
