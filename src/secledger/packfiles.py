"""Files of an evidence pack: streamed JSON arrays and CSV tables, and the SHA-256 manifest.

Writers take one row at a time so a population of any size passes through in constant
memory. Every file written is registered with the :class:`PackDir`, which writes
``MANIFEST.sha256`` in the format ``sha256sum -c`` reads.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from secledger.errors import SecledgerError
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
    if isinstance(value, dict):  # a finding's evidence holds label names, anyone's text
        return spreadsheet_text(orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode())
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
    """The output directory; remembers every file written for the manifest.

    Files and folders below the root are made without following symbolic links: a link
    planted in an export directory others can write to (a shared drive, ``/tmp``) would
    otherwise redirect a write to any file the person running the export can change.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: list[str] = []

    def create(self, name: str, mode: str = "wb", **options: Any) -> IO[Any]:
        """Register ``name`` (relative, ``/``-separated) and open it as a new file, parents
        made; whatever was at its place before is removed first (a link itself, not what
        it points to)."""
        if name not in self.files:
            self.files.append(name)
        descriptor = _new_file(self.root, name)
        return open(descriptor, mode, **options)  # noqa: PTH123 - a descriptor, not a path

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small file at once."""
        with self.create(name) as handle:
            handle.write(data)

    def write_json(self, name: str, data: Any) -> None:
        """Write one JSON document, indented for reading."""
        option = _JSON | orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        self.write_bytes(name, orjson.dumps(data, default=json_value, option=option) + b"\n")

    @contextmanager
    def json_array(self, name: str) -> Iterator[JsonArray]:
        """Stream a JSON array into ``name``."""
        with self.create(name) as handle:
            array = JsonArray(handle)
            yield array
            array.close()

    @contextmanager
    def csv_table(self, name: str, columns: Sequence[str]) -> Iterator[CsvTable]:
        """Stream a CSV table into ``name``."""
        with self.create(name, "w", encoding="utf-8", newline="") as handle:
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
        with open(_new_file(self.root, MANIFEST), "w", encoding="utf-8") as handle:
            handle.write("".join(lines))
        return len(lines)


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _folder(parent: int, name: str) -> int:
    """A descriptor of folder ``name`` in ``parent``, made if missing; a symbolic link
    there is replaced by a folder, never followed."""
    with suppress(FileExistsError):
        os.mkdir(name, dir_fd=parent)
    try:
        return os.open(name, _DIRECTORY, dir_fd=parent)
    except OSError as exc:
        # A link is ELOOP, or ENOTDIR as O_DIRECTORY is checked first; a file stays.
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if not stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            raise
    os.unlink(name, dir_fd=parent)
    os.mkdir(name, dir_fd=parent)
    return os.open(name, _DIRECTORY, dir_fd=parent)


def _new_file(root: Path, name: str) -> int:
    """A descriptor of the new file ``name`` below ``root``, open for writing; no symbolic
    link below ``root`` is followed (each folder is opened relative to its parent)."""
    *folders, base = name.split("/")
    root.mkdir(parents=True, exist_ok=True)  # the root, as named, may be a link: chosen
    current = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for folder in folders:
            below = _folder(current, folder)
            os.close(current)
            current = below
        with suppress(FileNotFoundError):
            os.unlink(base, dir_fd=current)
        return os.open(base, _NEW, 0o666, dir_fd=current)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SecledgerError(
                f"{root / name}: a file or symbolic link is in the way below {root}:"
                " remove it, or choose a new directory"
            ) from None
        raise
    finally:
        os.close(current)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
