"""Rendering rows for the terminal and for files: table (rich), JSON, CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

FORMATS = ("table", "json", "csv")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def render(
    rows: Iterable[dict[str, Any]],
    fmt: str,
    columns: Sequence[str],
    *,
    title: str | None = None,
    console: Console | None = None,
) -> str | None:
    """Render ``rows``; returns text for json/csv, prints a table itself."""
    items = list(rows)
    if fmt == "json":
        return orjson.dumps(items, option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for item in items:
            writer.writerow({c: _cell(item.get(c)) for c in columns})
        return buffer.getvalue()
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for item in items:
        table.add_row(*(_cell(item.get(c)) for c in columns))
    (console or Console()).print(table)
    return None
