"""Progress bars for long commands: on stderr, and only when stderr is a terminal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)


class Tracker(Protocol):
    """Progress reporting: a task with an optional total, advanced by a callback."""

    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        """Start a task; the callback advances it."""


class Silent:
    """A tracker that reports nothing."""

    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        """A no-op callback."""
        return lambda _count: None


class RichTracker:
    """Named bars on one Progress display."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        """Add a bar; the callback advances it (thread-safe, verify calls it from a thread)."""
        task_id = self._progress.add_task(description, total=total)
        return lambda count: self._progress.advance(task_id, count)


def stderr_progress() -> Progress:
    """A progress display that stays silent when stderr is a pipe or a file."""
    console = Console(stderr=True)
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
