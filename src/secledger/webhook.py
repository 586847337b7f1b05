"""``POST /webhooks/gitlab`` as a bare ASGI handler: the hot path, kept free of framework cost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime
from typing import Any

import orjson
import structlog

from secledger.admission import Admission
from secledger.deadlines import Deadlines
from secledger.errors import BodyTimeout, IntakeError, StoreUnavailable
from secledger.extract import MRKey, event_stamps, is_security_event, mr_key
from secledger.headers import RequestHeaders
from secledger.intake import (
    UNPROVEN,
    Delivery,
    Ignored,
    Verified,
    authenticate,
    check_size,
    decode_mr,
    precheck,
    to_delivery,
)
from secledger.recentignored import DRAINED_HOLD_BYTES, DRAINED_HOLD_SECONDS, RecentlyIgnored
from secledger.recheck import RECOVER_HINT, SHUT_DOWN, Recheck
from secledger.replay import ReplayGuard
from secledger.runtime import Runtime
from secledger.senders import sources_from_settings
from secledger.service import IGNORED, Outcome
from secledger.throttle import Throttle, keep_ticked
from secledger.times import isoformat, utcnow

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PATH = "/webhooks/gitlab"
_LOGGED = frozenset({"recorded", "duplicate"})
# A hook URL entered with a trailing slash: a 404 for each delivery would count as a
# failure, and GitLab disables a hook after four.
PATHS = frozenset({PATH, PATH + "/"})
log = structlog.get_logger("secledger.webhook")


class ClientDisconnected(Exception):
    """The sender went away before the body was complete."""


Extra = tuple[tuple[bytes, bytes], ...]
# Summaries of ignored deliveries: at most one line per interval (see IgnoredLog).
IGNORED_LOG_SECONDS = 60.0
# Requests not yet authenticated get this fraction of the admission limits.
UNVERIFIED_SHARE = 4


def response_start(status: int, data: bytes, extra: Extra = ()) -> Message:
    """The ``http.response.start`` message of a JSON response with body ``data``."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    headers.extend(extra)
    if status == 405:
        headers.append((b"allow", b"POST"))
    return {"type": "http.response.start", "status": status, "headers": headers}


async def respond(send: Send, status: int, data: bytes, extra: Extra = ()) -> None:
    """Send a JSON response whose body is already encoded."""
    await send(response_start(status, data, extra))
    await send({"type": "http.response.body", "body": data})


def header_map(scope: Scope) -> RequestHeaders:
    """Request headers by lower-case name (ASGI already lower-cases them)."""
    return RequestHeaders(scope["headers"])


async def read_body(receive: Receive, limit: int, first: bytes = b"") -> bytes:
    """Read the body (after ``first``, already received), refusing as soon as it passes
    ``limit`` bytes."""
    chunks = [first]
    size = len(first)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        check_size(size, limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def rejection(exc: IntakeError) -> bytes:
    """Body of a 4xx answer."""
    return orjson.dumps({"status": "rejected", "error": exc.code, "message": str(exc)})


class IgnoredLog:
    """One ``deliveries_ignored`` line per interval instead of one line per delivery.

    Nearly all deliveries of a busy GitLab are for merge requests without a security
    label; a line for each was a quarter of the receiver's CPU per ignored delivery and
    buries the lines that matter. ``/metrics`` counts every one; at log level debug
    each still gets its own ``delivery`` line.
    """

    def __init__(self, interval: float = IGNORED_LOG_SECONDS, *, each: bool = False) -> None:
        self.interval = interval
        self.each = each
        self.count = 0
        self.since = time.perf_counter()
        keep_ticked(self)

    def tick(self) -> None:
        """Write the summary if the interval is over (serve ticks every few seconds)."""
        now = time.perf_counter()
        if self.count and now - self.since >= self.interval:
            self.flush(now)

    def note(self, now: float, reason: str | None) -> None:
        """Count one ignored delivery; write the summary when the interval is over."""
        if self.each:
            log.debug("delivery", outcome="ignored", reason=reason)
        self.count += 1
        if now - self.since >= self.interval:
            self.flush(now)

    def flush(self, now: float) -> None:
        """Write the summary of what was counted since the last one, if anything."""
        if self.count:
            log.info("deliveries_ignored", count=self.count, seconds=round(now - self.since, 1))
        self.count = 0
        self.since = now


class RejectedLog(Throttle):
    """A ``delivery_rejected`` line for each of the first rejections of a kind (status,
    error code: a small fixed set) in an interval, then one
    ``deliveries_rejected_suppressed`` line per kind with the count: a sender hammering
    the endpoint with a wrong token must not flood the log (or the disk under it).
    ``/metrics`` counts every rejection."""

    def __init__(self, interval: float = IGNORED_LOG_SECONDS, *, each: int = 20) -> None:
        super().__init__(
            "deliveries_rejected_suppressed",
            interval=interval,
            each=each,
            clock=time.perf_counter,  # the handler's clock
        )

    def refused(self, now: float, status: int, error: str) -> None:
        """Log this rejection, or count it once ``each`` of its kind were logged."""
        if self.note(now, (("status", status), ("error", error))):
            log.info("delivery_rejected", status=status, error=error)


_IGNORED = orjson.dumps(IGNORED.to_json())
_UNAVAILABLE = (("status", 503), ("error", "unavailable"))
_METHOD = orjson.dumps({"status": "rejected", "error": "method_not_allowed", "message": "use POST"})


class WebhookHandler:
    """Verify, decode, extract, record, answer."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        settings = runtime.settings
        has_secrets = bool(settings.webhook_secrets or settings.webhook_signing_secrets)
        self.sources = sources_from_settings(
            settings, open_default=settings.allow_open_loopback and not has_secrets
        )
        self.guard = ReplayGuard(settings.webhook_tolerance_seconds)
        self.limit = settings.max_body_bytes
        self.body_timeout = settings.body_timeout_seconds
        self.deadlines = Deadlines(settings.body_timeout_seconds)
        self.ignored = IgnoredLog(each=settings.log_level.lower() == "debug")
        self.rejected = RejectedLog()
        self.tally = runtime.metrics.tally
        self.admission = Admission(
            settings.max_concurrent_deliveries,
            settings.max_inflight_body_bytes,
            settings.concurrency_wait_seconds,
        )
        # Requests whose signature is still to be checked, with no token that proved them,
        # have proved nothing yet: anyone can send well-formed signature headers. At most
        # a quarter of the places and bytes may be theirs; the rest stay for deliveries
        # a token authenticated before their body was read.
        share = max(1, settings.max_concurrent_deliveries // UNVERIFIED_SHARE)
        self.unverified = Admission(
            share,
            max(self.limit, settings.max_inflight_body_bytes // UNVERIFIED_SHARE),
            settings.concurrency_wait_seconds,
            # Uncapped, their queue filled uvicorn's limit on requests in progress, and
            # every request, a token's too, was answered 503 before it was looked at.
            max_waiting=share,
        )
        self.recent = RecentlyIgnored()
        # Those the spool's drain found ignored (``_hold_drained``): kept longer.
        self.drained = RecentlyIgnored(seconds=DRAINED_HOLD_SECONDS, max_bytes=DRAINED_HOLD_BYTES)
        # MRs with a delivery this receiver handed to the writer and has not yet had
        # answered, by how many: one not yet committed is not in ``known`` yet.
        self.pending: dict[MRKey, int] = {}
        self.recheck = Recheck(runtime, self.recent, self.drained)
        loop = asyncio.get_running_loop()

        def reconsider_soon(keys: list[MRKey]) -> None:  # from any thread
            if self.recheck.watching:  # nothing ignored yet: nothing to look at
                loop.call_soon_threadsafe(self.recheck.reconsider, keys)

        def hold_drained_soon(deliveries: list[Delivery]) -> None:  # the writer's thread
            try:
                loop.call_soon_threadsafe(self._hold_drained, deliveries)
            except RuntimeError:  # the event loop is closed: the receiver has stopped
                log.warning(
                    "ignored_delivery_not_recorded",
                    error=SHUT_DOWN,
                    count=len(deliveries),
                    hint=RECOVER_HINT,
                )

        runtime.known.on_new = reconsider_soon
        runtime.recorder.on_drained_ignored(hold_drained_soon)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        if scope["method"] != "POST":
            await respond(send, 405, _METHOD)
            return
        extra: Extra = ()
        headers = header_map(scope)
        try:
            status, outcome, data = await self._handle(headers, receive)
        except Exception as exc:  # noqa: BLE001 - each kind gets its answer; a bug gets a 500
            ended = time.perf_counter()
            status, data, name, extra = _refusal(exc)
            if isinstance(exc, IntakeError):
                self.rejected.refused(ended, exc.status_code, exc.code)
            elif isinstance(exc, StoreUnavailable) and self.rejected.note(ended, _UNAVAILABLE):
                # An outage with a spool that cannot keep a delivery fails every one of
                # them: as many lines as deliveries would flood the log at the worst time.
                log.warning("delivery_unavailable", error=str(exc))
            elif name == "abandoned" and self.rejected.note(ended, (("error", "abandoned"),)):
                log.info("delivery_abandoned")
        else:
            name = outcome.status
            ended = time.perf_counter()
            if name == "ignored":
                self.ignored.note(ended, outcome.reason)
            # Any other outcome comes from the writer, which logged its ``delivery`` line.
        self.tally.add(headers.get("x-gitlab-event"), name, ended - started)
        if status:  # 0: the sender went away
            # Sent here rather than through respond(): one coroutine less per delivery.
            await send(response_start(status, data, extra))
            await send({"type": "http.response.body", "body": data})

    async def _handle(
        self, headers: RequestHeaders, receive: Receive
    ) -> tuple[int, Outcome, bytes]:
        received_at, arrived = utcnow(), time.monotonic()
        # Refuse what needs no body first, so an unauthenticated sender costs nothing.
        checked = precheck(headers, self.sources, now=received_at)
        verified = checked if isinstance(checked, Verified) else None
        unproven = checked is UNPROVEN
        declared = headers.get("content-length", "")
        size = self.limit  # a body of unknown length may be as large as allowed
        if declared.isdigit():
            size = int(declared)
            check_size(size, self.limit)
        admission = self.admission
        if unproven:
            await self._admit_unproven(size)
        elif not admission.try_enter(size):
            await admission.enter(size)
        try:
            try:
                with self.deadlines.limit():
                    # Nearly always the whole body, already buffered: one message.
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnected
                    body = message.get("body", b"")
                    check_size(len(body), self.limit)
                    if message.get("more_body", False):
                        body = await read_body(receive, self.limit, body)
            except TimeoutError:
                raise BodyTimeout(
                    f"the body was not received within {self.body_timeout:g} s"
                ) from None
            if verified is None:  # a signature over the body is still to be checked
                verified = self._authenticate(headers, body, received_at)
            decoded = decode_mr(headers, body, verified=verified)
            if isinstance(decoded, Ignored):
                return _answer(200, Outcome("ignored", reason=decoded.reason))
            # Most deliveries are for MRs that never carried a security label: decided
            # from the labels and the in-memory key set before any extraction. While the
            # spool holds deliveries, a spooled one may be what makes this MR a security
            # MR; only the drain, reading the database, can tell, so it decides. So does
            # the writer for an MR whose first security delivery it has not committed:
            # answered ``ignored``, a delivery was only held in memory (a stop lost it).
            key = mr_key(decoded)
            recorder = self.runtime.recorder
            if (
                not recorder.spool_depth
                and key not in self.runtime.known
                and key not in self.pending
                and key not in recorder.held_mrs  # behind its delivery in failed/
                and not is_security_event(decoded, self.runtime.policy)
            ):
                stamps = event_stamps(decoded.payload)
                held = (time.monotonic(), key, headers, body, received_at, verified, stamps, None)
                self.recent.hold(held)
                # Learnt by another thread since the test above, which then found nothing
                # held for it: looked at again here (each side sees the other's write).
                if key in self.runtime.known:
                    self.recheck.reconsider([key])
                return 200, IGNORED, _IGNORED
            delivery = to_delivery(
                decoded, headers, body, received_at=received_at, verified=verified
            )
            return await self._record(delivery, key, received_at, arrived)
        finally:
            admission.leave(size)
            if unproven:
                self.unverified.leave(size)

    def _hold_ignored(self, delivery: Delivery, key: MRKey, *, drained: bool = False) -> None:
        """Hold a delivery the writer or the spool's drain found ignored, as the hot path
        holds those it ignores: its MR may be made a security MR by a delivery another
        replica has not committed yet (or still has in its spool)."""
        holder = self.drained if drained else self.recent
        stamps = event_stamps(delivery.payload)
        holder.hold(
            (
                time.monotonic(),
                key,
                delivery.headers,
                delivery.body,
                delivery.received_at,
                None,
                stamps,
                # Without its decoded JSON, two to three times the body's size, which
                # the byte limit does not count: decoded again if it is recorded.
                delivery.without_payload(),
            )
        )
        if key in self.runtime.known:  # learnt meanwhile: nothing held was found then
            self.recheck.reconsider([key])

    def _hold_drained(self, deliveries: list[Delivery]) -> None:
        for kept in deliveries:
            delivery = kept.with_payload()  # held at start-up without it (``Recorder``)
            self._hold_ignored(delivery, mr_key(delivery), drained=True)

    async def _admit_unproven(self, size: int) -> None:
        """A place in the pool of requests nothing has proved yet, then one among all."""
        gate = self.unverified
        if not gate.try_enter(size):
            await gate.enter(size)
        try:
            if not self.admission.try_enter(size):
                await self.admission.enter(size)
        except BaseException:
            gate.leave(size)
            raise

    def _authenticate(self, headers: RequestHeaders, body: bytes, now: datetime) -> Verified:
        verified = authenticate(headers, body, self.sources, now=now)
        if verified.webhook_id is not None and verified.timestamp is not None:
            self.guard.check(verified.source, verified.webhook_id, verified.timestamp, now=now)
        return verified

    async def _record(
        self, delivery: Delivery, key: MRKey, received_at: datetime, arrived: float
    ) -> tuple[int, Outcome, bytes]:
        recorder = self.runtime.recorder
        pending = self.pending
        pending[key] = pending.get(key, 0) + 1
        try:
            outcome = await recorder.submit(delivery, arrived)
            # A duplicate is logged too (an earlier copy, or the same delivery spooled by
            # the late timer and committed by the writer): its MR is a security one, and
            # the next delivery of it, label removed, must not be ignored.
            if outcome.status in _LOGGED:
                self.runtime.known.add(key)
        finally:
            left = pending[key] - 1
            if left:
                pending[key] = left
            else:
                del pending[key]
        if outcome.status == "ignored":
            # The writer, reading the database, found it ignored: held as the hot path
            # holds those it ignores.
            self._hold_ignored(delivery, key)
        elif outcome.status == "spooled":
            extra = {"received_at": isoformat(received_at), "spool_depth": recorder.spool_depth}
            return 202, outcome, orjson.dumps(outcome.to_json() | extra)
        return _answer(200, outcome)


def _refusal(exc: Exception) -> tuple[int, bytes, str, Extra]:
    """Status, body, metric outcome and extra headers for a delivery that was not taken."""
    if isinstance(exc, IntakeError):  # logged by the handler's RejectedLog
        retry = ((b"retry-after", b"5"),) if exc.status_code == 503 else ()
        return exc.status_code, rejection(exc), "rejected", retry
    if isinstance(exc, ClientDisconnected):  # logged by the handler's RejectedLog
        return 0, b"", "abandoned", ()
    if isinstance(exc, StoreUnavailable):  # logged by the handler, kept to 20 a minute
        data = orjson.dumps({"status": "unavailable", "message": str(exc)})
        return 503, data, "unavailable", ()
    # A bug must not leak a traceback to the sender; the log has it.
    log.exception("delivery_failed", error=type(exc).__name__)
    return 500, b'{"status":"error","message":"internal error"}', "error", ()


def _answer(status: int, outcome: Outcome) -> tuple[int, Outcome, bytes]:
    return status, outcome, orjson.dumps(outcome.to_json())
