"""Structured logging: one JSON line per event on stderr."""

from __future__ import annotations

import logging
import sys

import structlog

# Keys that must never reach a log line, whatever a caller binds by mistake.
_SECRET_KEYS = frozenset({"token", "x-gitlab-token", "password", "secret", "body", "payload"})


def _drop_secrets(
    _logger: object, _name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    for key in _SECRET_KEYS & event_dict.keys():
        event_dict[key] = "[redacted]"
    return event_dict


def configure(level: str = "info", *, json: bool = True) -> None:
    """Configure structlog once, at an entry point."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
