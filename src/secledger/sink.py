"""The optional HTTP sink: POST each outbox row to a URL, in seq order, at least once.

In one transaction that holds the sink lock: read the oldest undelivered rows, POST them
one by one in seq order, record each 2xx (``outbox_delivered``) and stop at the first
failure (``outbox_failures``), then commit. A crash or a lost database between a 2xx and
the commit sends that row again later, with the same ``Idempotency-Key``: the receiver
deduplicates on it. A row that keeps failing is retried with exponential backoff and
is never skipped, so rows after it wait: nothing is lost and nothing overtakes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal

import structlog
from pydantic import SecretStr
from sqlalchemy import Engine

from secledger import __version__
from secledger.config import Settings
from secledger.errors import ConfigError, first_line
from secledger.listener import Listener, is_connection_error
from secledger.sinkhttp import Poster
from secledger.store import outbox

log = structlog.get_logger("secledger.sink")

# Notifications wake the background sender at once; this is only the safety net.
POLL_SECONDS = 5.0
RECONNECT_SECONDS = 2.0
MAX_RECONNECT_SECONDS = 60.0
# The least the background sender waits after a pass gave up on a row.
MIN_PASS_PAUSE_SECONDS = 1.0
# Rows posted per transaction: one commit for their markers. A crash before that commit
# sends them again (the receiver deduplicates on Idempotency-Key).
SEND_BATCH = 100
# A POST as a whole (connecting, sending, the answer's head) may take this many times
# SECLEDGER_SINK_TIMEOUT_SECONDS, each step once.
POST_DEADLINE_TIMEOUTS = 3


@dataclass(frozen=True)
class SinkConfig:
    """Where and how to POST; built from the ``SECLEDGER_SINK_*`` settings."""

    url: str
    token_header: str
    token: SecretStr | None
    timeout: float
    max_attempts: int
    backoff: float
    backoff_max: float

    @classmethod
    def from_settings(cls, settings: Settings) -> SinkConfig:
        """The configured sink; a ConfigError when there is none."""
        if settings.sink_url is None:
            raise ConfigError("no HTTP sink configured: set SECLEDGER_SINK_URL")
        return cls(
            url=settings.sink_url,
            token_header=settings.sink_token_header,
            token=settings.sink_token,
            timeout=settings.sink_timeout_seconds,
            max_attempts=settings.sink_max_attempts,
            backoff=settings.sink_backoff_seconds,
            backoff_max=settings.sink_backoff_max_seconds,
        )

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure of one row."""
        return float(min(self.backoff * 2 ** (failures - 1), self.backoff_max))


@dataclass(frozen=True)
class _Step:
    kind: Literal["done", "busy", "failed"]
    delivered: int = 0
    seq: int | None = None
    error: str | None = None


@dataclass
class DrainResult:
    """What one drain pass did."""

    delivered: int = 0
    busy: bool = False
    stuck_seq: int | None = None
    error: str | None = None


class Sender:
    """Delivers pending outbox rows; usable once (``sink drain``) or in a loop (``serve``)."""

    def __init__(
        self, engine: Engine, config: SinkConfig, stop: threading.Event | None = None
    ) -> None:
        self._engine = engine
        self._config = config
        self._stop = stop or threading.Event()
        self._poster = Poster(config.timeout)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._poster.close()

    def drain(self) -> DrainResult:
        """Deliver rows in order until none is pending, one keeps failing, or stop."""
        result = DrainResult()
        failures, failing = 0, None  # consecutive failed attempts of row ``failing``
        while not self._stop.is_set():
            step = self._batch()
            result.delivered += step.delivered
            if step.kind == "busy":
                result.busy = True
                break
            if step.kind == "done":
                if step.delivered == 0:
                    break
                continue
            # Attempts count per row: one that went through after failing does not make
            # the next row's first failure its second.
            if step.seq != failing:
                failures, failing = 0, step.seq
            failures += 1
            log.warning("sink_failed", seq=step.seq, error=step.error, attempt=failures)
            if failures >= self._config.max_attempts:
                result.stuck_seq, result.error = step.seq, step.error
                break
            self._stop.wait(self._config.delay(failures))
        return result

    def _batch(self) -> _Step:
        """POST up to SEND_BATCH rows in order, one commit for all their markers."""
        delivered = 0
        with self._engine.begin() as conn:
            if not outbox.try_lock(conn):
                return _Step("busy")
            for item in outbox.next_pending(conn, SEND_BATCH):
                if self._stop.is_set():
                    break
                status, error = self._post(item)
                if error is None and status is not None:
                    outbox.mark_delivered(conn, item.seq, status)
                    delivered += 1
                    continue
                outbox.mark_failed(conn, item.seq, status, error or "unknown")
                return _Step("failed", delivered, item.seq, error)
        return _Step("done", delivered)

    def _post(self, item: outbox.Pending) -> tuple[int | None, str | None]:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": item.idempotency_key,
            "X-Secledger-Seq": str(item.seq),
            "User-Agent": f"secledger/{__version__}",
        }
        if self._config.token is not None:
            headers[self._config.token_header] = self._config.token.get_secret_value()
        deadline = POST_DEADLINE_TIMEOUTS * self._config.timeout
        try:
            # The status is the answer: its body is not read, so a receiver that trickles
            # one byte at a time cannot hold the sender (and its transaction) open; nor
            # can one that trickles its head, past the deadline (sinkhttp.py).
            body = item.body.encode("utf-8")
            status = self._poster.post(self._config.url, body, headers, deadline)
        except Exception as exc:  # noqa: BLE001 - every failure is the row's, and recorded
            return None, self._poster.failure(exc)
        if 200 <= status < 300:
            return status, None
        return status, f"HTTP {status}"


class SinkWorker:
    """The background sender of ``serve``: drains on every ledger notification."""

    def __init__(self, engine: Engine, config: SinkConfig, conninfo: str) -> None:
        self._config = config
        self._conninfo = conninfo
        self._stop = threading.Event()
        self._sender = Sender(engine, config, self._stop)
        self._thread = threading.Thread(target=self._run, name="secledger-sink", daemon=True)

    def start(self) -> None:
        """Start the sender thread."""
        self._thread.start()

    def stopping(self) -> None:
        """Take no more rows (``close`` then waits for the one in flight)."""
        self._stop.set()

    def close(self) -> None:
        """Stop after the row in flight (bounded by its POST's deadline)."""
        self._stop.set()
        self._thread.join(timeout=POST_DEADLINE_TIMEOUTS * self._config.timeout + 5)
        if not self._thread.is_alive():  # its connections are its own while it posts
            self._sender.close()

    def _run(self) -> None:
        pause = RECONNECT_SECONDS
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._follow()
            except Exception as exc:  # noqa: BLE001 - the sender must outlive any one failure
                # No traceback: SQL errors can carry bound parameters (ledger rows).
                log.error(  # noqa: TRY400
                    "sink_error",
                    error=type(exc).__name__,
                    detail=first_line(exc),
                    connection=is_connection_error(exc),
                    retry_seconds=pause,
                )
                self._stop.wait(pause)
                # A failure that comes back at once (a missing grant, a server that ends
                # the sender's transaction) is not retried every 2 s for days.
                quick = time.monotonic() - started < MAX_RECONNECT_SECONDS + pause
                pause = min(pause * 2, MAX_RECONNECT_SECONDS) if quick else RECONNECT_SECONDS

    def _follow(self) -> None:
        with Listener(self._conninfo) as listener:
            while not self._stop.is_set():
                result = self._sender.drain()
                if result.stuck_seq is not None:
                    # Not woken by new recordings: an outage must not be hammered (with a
                    # cap of 0, the pass that gave up was followed at once by the next).
                    listener.pause(
                        max(self._config.backoff_max, MIN_PASS_PAUSE_SECONDS), self._stop
                    )
                else:
                    listener.wait(POLL_SECONDS, self._stop)


def start_worker(settings: Settings, engine: Engine, conninfo: str) -> SinkWorker | None:
    """Start the background sender when a sink is configured (the ``serve`` lifespan hook)."""
    if not settings.sink_enabled:
        return None
    worker = SinkWorker(engine, SinkConfig.from_settings(settings), conninfo)
    worker.start()
    return worker
