"""Files of an evidence pack: streamed JSON arrays and CSV tables, and the SHA-256 manifest.

Writers take one row at a time so a population of any size passes through in constant
memory. Every file written is registered with the :class:`PackDir`, which writes
``MANIFEST.sha256`` in the format ``sha256sum -c`` reads.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from secledger.output import spreadsheet_text
from secledger.times import isoformat

MANIFEST = "MANIFEST.sha256"
_CHUNK = 1 << 20
# UTC datetimes end in "Z" as in CSV; the pack reads the database in UTC (evidence.py).
_JSON = orjson.OPT_UTC_Z
_NUMBERS = frozenset({int, float, bool})


def json_value(value: Any) -> Any:
    """JSON-ready: datetimes as ISO 8601 UTC, bytes as hex, tuples as lists."""
    if isinstance(value, datetime):
        return isoformat(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    if isinstance(value, tuple):
        return list(value)
    return value


def csv_cell(value: Any) -> Any:
    """One CSV cell: lists space-separated, nested objects as compact JSON, None empty."""
    # Fast path: the csv module writes these itself (None as an empty cell).
    if value is None or type(value) in _NUMBERS:
        return value
    if type(value) is str:
        return spreadsheet_text(value)
    value = json_value(value)
    if isinstance(value, list):
        return spreadsheet_text(" ".join(str(item) for item in value))
    if isinstance(value, dict):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return spreadsheet_text(str(value))


class JsonArray:
    """A JSON array written one element per line, so it streams and still parses."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._first = True
        handle.write(b"[")

    def add(self, item: dict[str, Any]) -> None:
        """Append one element."""
        self._handle.write(b"\n" if self._first else b",\n")
        self._handle.write(orjson.dumps(item, default=json_value, option=_JSON))
        self._first = False

    def close(self) -> None:
        """End the array."""
        self._handle.write(b"]\n" if self._first else b"\n]\n")


class CsvTable:
    """A CSV file with a header row; values go through :func:`csv_cell`."""

    def __init__(self, handle: IO[str], columns: Sequence[str]) -> None:
        self._columns = tuple(columns)
        self._writer = csv.writer(handle, lineterminator="\n")
        # Python 3.11 quotes a cell holding a line terminator's characters only: with
        # "\n", a title holding a bare "\r" went out unquoted and a reader split its row
        # in two (the sample re-drawn from population.csv then differed). Such a row is
        # written with every cell quoted, which any CSV reader reads the same.
        self._quoted = csv.writer(handle, lineterminator="\n", quoting=csv.QUOTE_ALL)
        self._writer.writerow(self._columns)

    def add(self, row: Mapping[str, Any]) -> None:
        """Append one row (extra keys are ignored)."""
        self._write([csv_cell(row.get(column)) for column in self._columns])

    def add_values(self, values: Iterable[Any]) -> None:
        """Append one row given as values in column order."""
        self._write([csv_cell(value) for value in values])

    def _write(self, cells: list[Any]) -> None:
        carriage = any(isinstance(cell, str) and "\r" in cell for cell in cells)
        (self._quoted if carriage else self._writer).writerow(cells)


class PackDir:
    """The output directory; remembers every file written for the manifest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: list[str] = []

    def path(self, name: str) -> Path:
        """Register ``name`` (relative, ``/``-separated) and return its path, parents made."""
        if name not in self.files:
            self.files.append(name)
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small file at once."""
        self.path(name).write_bytes(data)

    def write_json(self, name: str, data: Any) -> None:
        """Write one JSON document, indented for reading."""
        option = _JSON | orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        self.write_bytes(name, orjson.dumps(data, default=json_value, option=option) + b"\n")

    @contextmanager
    def json_array(self, name: str) -> Iterator[JsonArray]:
        """Stream a JSON array into ``name``."""
        with self.path(name).open("wb") as handle:
            array = JsonArray(handle)
            yield array
            array.close()

    @contextmanager
    def csv_table(self, name: str, columns: Sequence[str]) -> Iterator[CsvTable]:
        """Stream a CSV table into ``name``."""
        with self.path(name).open("w", encoding="utf-8", newline="") as handle:
            yield CsvTable(handle, columns)

    def write_csv(self, name: str, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
        """Write a small CSV table at once."""
        with self.csv_table(name, columns) as table:
            for row in rows:
                table.add(row)

    def write_manifest(self, progress: Callable[[int], None] | None = None) -> int:
        """Hash every registered file into ``MANIFEST.sha256``; the number of files listed."""
        lines = []
        for name in sorted(self.files):
            lines.append(f"{file_sha256(self.root / name)}  {name}\n")
            if progress is not None:
                progress(1)
        (self.root / MANIFEST).write_text("".join(lines), encoding="utf-8")
        return len(lines)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
