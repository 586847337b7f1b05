"""Structured logging: one JSON line per event on stderr."""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import orjson
import structlog

from secledger.throttle import Throttle
from secledger.times import isoformat, utcnow

# Keys that must never reach a log line, whatever a caller binds by mistake.
_SECRET_KEYS = frozenset({"token", "x-gitlab-token", "password", "secret", "body", "payload"})


def _drop_secrets(
    _logger: object, _name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    for key in _SECRET_KEYS & event_dict.keys():
        event_dict[key] = "[redacted]"
    return event_dict


# What the log thread may have queued while its file does not take lines (a log shipper
# that stalled, a pipe nobody reads): past this, lines are dropped and counted, rather
# than memory growing until the process is killed.
MAX_QUEUED_BYTES = 64 << 20


def _dropped_line(count: int) -> bytes:
    record = {
        "event": "log_lines_dropped",
        "lines": count,
        "level": "error",
        "hint": "stderr did not take the log's lines (a stalled log shipper or pipe)",
        "timestamp": isoformat(utcnow()),
    }
    return orjson.dumps(record) + b"\n"


class LineWriter:
    """A file-like sink whose ``write`` only queues: a thread of its own does the I/O.

    A ``write`` system call gives up the interpreter lock; taking it back from a busy
    writer thread cost the event loop up to a switch interval (5 ms) per log line,
    which stalled every request in flight. Lines reach the file within milliseconds,
    in order, and all of them at exit; a killed process may lose the last few.
    """

    def __init__(self, file: BinaryIO, limit: int = MAX_QUEUED_BYTES) -> None:
        self._file = file
        self._limit = limit
        self._lines: deque[bytes] = deque()
        self._count = threading.Lock()  # the queue's size and what it dropped
        self._queued = 0
        self._dropped = 0
        self._wake = threading.Event()
        self._io = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="secledger-log", daemon=True)
        self._thread.start()
        atexit.register(self.drain)

    def write(self, data: bytes) -> int:
        """Queue ``data`` for the file; dropped (and counted) while the queue is full."""
        with self._count:
            if self._queued + len(data) > self._limit:
                self._dropped += data.count(b"\n") or 1
                return len(data)
            self._queued += len(data)
            self._lines.append(data)
        if not self._wake.is_set():
            self._wake.set()
        return len(data)

    def flush(self) -> None:
        """Nothing to do here: the thread flushes after each batch of lines."""

    def drain(self) -> None:
        """Write what is queued, now (also at exit)."""
        with self._io:
            with self._count:
                chunks = list(self._lines)
                self._lines.clear()
                dropped, self._dropped = self._dropped, 0
            size = sum(map(len, chunks))
            if dropped:
                chunks.append(_dropped_line(dropped))
            if chunks:
                try:
                    self._file.write(b"".join(chunks))
                    self._file.flush()
                except (OSError, ValueError):  # stderr closed or gone: nowhere to log
                    pass
            # Counted until written: lines in a write that blocks are in memory too.
            with self._count:
                self._queued -= size

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self.drain()


_writer: LineWriter | None = None


def flush() -> None:
    """Write out the queued lines now: before a last message printed to stderr directly,
    which would otherwise come before log lines logged ahead of it."""
    if _writer is not None:
        _writer.drain()


def _line_writer(file: BinaryIO) -> LineWriter:
    global _writer  # noqa: PLW0603 - one writer thread per process, made on first use
    if _writer is None:
        _writer = LineWriter(file)
    return _writer


@dataclass(frozen=True)
class _Direct:
    """What ``info_lines`` needs to render lines itself: set by ``configure`` for JSON."""

    processors: list[structlog.typing.Processor]
    stamper: structlog.processors.TimeStamper
    renderer: structlog.processors.JSONRenderer
    writer: LineWriter
    enabled: bool  # info lines pass the configured level


_direct: _Direct | None = None


def info_lines(logger: Any, event: str, records: Sequence[dict[str, Any]]) -> None:
    """``logger.info(event, **record)`` for each record, as one write.

    The writer thread logs a line for every delivery of a batch at once. Each line goes
    through the configured processors as ``logger.info`` would send it, with one
    timestamp for the batch (the lines are written at the same instant), no bound-logger
    machinery per line and one queue append for all: about half the cost. When structlog
    is configured otherwise (the console renderer, or tests capturing the log), each
    record goes through ``logger.info``.
    """
    direct = _direct
    current = structlog.get_config()["processors"]
    if direct is None or current is not direct.processors or current[-1] is not direct.renderer:
        for record in records:
            logger.info(event, **record)
        return
    if not direct.enabled or not records:
        return
    stamp = direct.stamper(None, "info", {})["timestamp"]
    lines: list[bytes] = []
    for record in records:
        line: Any = {**record, "event": event}
        for processor in current:
            if processor is direct.stamper:
                line["timestamp"] = stamp
            else:
                line = processor(None, "info", line)
        lines.append(cast(bytes, line))
    lines.append(b"")
    direct.writer.write(b"\n".join(lines))


class _Libraries(logging.Handler):
    """Records of the libraries' own loggers (uvicorn, psycopg, SQLAlchemy) as our lines.

    Without it Python's last-resort handler printed their warnings as bare text, some
    spanning lines (libpq's messages), in a log that promises one JSON object a line.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().strip()
            # uvicorn warns of every malformed request, which anyone can send.
            if not LIBRARIES.note(time.monotonic(), (("logger", record.name), ("line", message))):
                return
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                fields["exception"] = "".join(traceback.format_exception(*record.exc_info))
            log = structlog.get_logger("secledger.libraries")
            log.log(record.levelno, message, **fields)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


# The libraries' lines: the first 20 alike per minute, then a count.
LIBRARIES = Throttle("library_lines_suppressed")


def _forward_libraries() -> None:
    root = logging.getLogger()
    if not any(isinstance(handler, _Libraries) for handler in root.handlers):
        root.addHandler(_Libraries())
    root.setLevel(logging.WARNING)  # their info lines would drown ours


def configure(level: str = "info", *, json: bool = True) -> None:
    """Configure structlog once, at an entry point."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    global _direct  # noqa: PLW0603 - what configure set up, for info_lines
    renderer: structlog.typing.Processor = structlog.dev.ConsoleRenderer(colors=False)
    factory: Callable[..., Any] = structlog.PrintLoggerFactory(file=sys.stderr)
    binary = getattr(sys.stderr, "buffer", None)
    writer: LineWriter | None = None
    direct: structlog.processors.JSONRenderer | None = None
    if json and binary is not None:
        # orjson renders bytes about five times faster than the stdlib encoder: this line
        # is written once per delivery, on the hot path.
        renderer = direct = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        writer = _line_writer(binary)
        # BytesLogger only calls write() and flush(), which is all LineWriter has.
        factory = structlog.BytesLoggerFactory(file=cast(BinaryIO, writer))
    elif json:
        renderer = structlog.processors.JSONRenderer()
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        stamper,
        _drop_secrets,
        renderer,
    ]
    if json:
        # ``log.exception`` passes exc_info, which the JSON renderer prints as ``true``:
        # the line said that something failed, never what. The console renderer formats
        # it itself.
        processors.insert(-1, structlog.processors.format_exc_info)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    if json:
        _forward_libraries()
    _direct = None
    if writer is not None and direct is not None:
        kept = structlog.get_config()["processors"]  # the list structlog holds
        _direct = _Direct(kept, stamper, direct, writer, numeric <= logging.INFO)
