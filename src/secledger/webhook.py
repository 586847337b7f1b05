"""``POST /webhooks/gitlab`` as a bare ASGI handler: the hot path, kept free of framework cost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import structlog

from secledger.admission import Admission
from secledger.errors import BodyTimeout, IntakeError, StoreUnavailable
from secledger.extract import extract_facts, is_security_event, mr_key
from secledger.intake import Ignored, authenticate, check_size, parse_delivery, precheck
from secledger.replay import ReplayGuard
from secledger.runtime import Runtime
from secledger.senders import sources_from_settings
from secledger.service import IGNORED, Outcome
from secledger.times import isoformat, utcnow

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PATH = "/webhooks/gitlab"
log = structlog.get_logger("secledger.webhook")


class ClientDisconnected(Exception):
    """The sender went away before the body was complete."""


async def respond(
    send: Send, status: int, body: dict[str, Any], extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """Send a JSON response."""
    data = orjson.dumps(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers.extend(extra)
    if status == 405:
        headers.append((b"allow", b"POST"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def header_map(scope: Scope) -> dict[str, str]:
    """Request headers with lower-case names (ASGI already lower-cases them)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read the body, refusing as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
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


def rejection(exc: IntakeError) -> dict[str, Any]:
    """Body of a 4xx answer."""
    return {"status": "rejected", "error": exc.code, "message": str(exc)}


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
        self.admission = Admission(
            settings.max_concurrent_deliveries,
            settings.max_inflight_body_bytes,
            settings.concurrency_wait_seconds,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        if scope["method"] != "POST":
            await respond(
                send,
                405,
                {"status": "rejected", "error": "method_not_allowed", "message": "use POST"},
            )
            return
        status, body, outcome_name, extra = await self._respond_to(scope, receive, started)
        self.runtime.metrics.delivery(
            _event_header(scope), outcome_name, time.perf_counter() - started
        )
        if status:
            await respond(send, status, body, extra)

    async def _respond_to(
        self, scope: Scope, receive: Receive, started: float
    ) -> tuple[int, dict[str, Any], str, tuple[tuple[bytes, bytes], ...]]:
        """Status, body, metric outcome and extra headers; status 0: the sender went away."""
        try:
            status, outcome, body = await self._handle(scope, receive)
        except IntakeError as exc:
            log.info("delivery_rejected", status=exc.status_code, error=exc.code)
            retry = ((b"retry-after", b"5"),) if exc.status_code == 503 else ()
            return exc.status_code, rejection(exc), "rejected", retry
        except ClientDisconnected:
            log.info("delivery_abandoned")
            return 0, {}, "abandoned", ()
        except StoreUnavailable as exc:
            log.warning("delivery_unavailable", error=str(exc))
            return 503, {"status": "unavailable", "message": str(exc)}, "unavailable", ()
        except Exception as exc:  # a bug must not leak a traceback to the sender
            log.exception("delivery_failed", error=type(exc).__name__)
            return 500, {"status": "error", "message": "internal error"}, "error", ()
        log.info(
            "delivery",
            outcome=outcome.status,
            seq=outcome.seq,
            ms=round((time.perf_counter() - started) * 1000, 2),
            **_row_ids(outcome),
        )
        return status, body, outcome.status, ()

    async def _body(self, receive: Receive) -> bytes:
        try:
            async with asyncio.timeout(self.body_timeout):
                return await read_body(receive, self.limit)
        except TimeoutError:
            raise BodyTimeout(f"the body was not received within {self.body_timeout:g} s") from None

    async def _handle(self, scope: Scope, receive: Receive) -> tuple[int, Outcome, dict[str, Any]]:
        headers = header_map(scope)
        # Refuse what needs no body first, so an unauthenticated sender costs nothing.
        precheck(headers, self.sources, now=utcnow())
        declared = headers.get("content-length", "")
        size = self.limit  # a body of unknown length may be as large as allowed
        if declared.isdigit():
            size = int(declared)
            check_size(size, self.limit)
        await self.admission.enter(size)
        try:
            return await self._process(headers, await self._body(receive))
        finally:
            self.admission.leave(size)

    async def _process(
        self, headers: dict[str, str], body: bytes
    ) -> tuple[int, Outcome, dict[str, Any]]:
        received_at = utcnow()
        verified = authenticate(headers, body, self.sources, now=received_at)
        if verified.webhook_id is not None and verified.timestamp is not None:
            self.guard.check(
                verified.source, verified.webhook_id, verified.timestamp, now=received_at
            )
        delivery = parse_delivery(
            headers,
            body,
            secrets=(),
            max_body_bytes=self.limit,
            received_at=received_at,
            require_token=False,
            verified=verified,
        )
        if isinstance(delivery, Ignored):
            return _answer(200, Outcome("ignored", reason=delivery.reason))
        recorder = self.runtime.recorder
        # Most deliveries are for MRs that never carried a security label: decide that from
        # the labels and the in-memory key set before the full extraction (times, users).
        # While the spool holds deliveries, a spooled one may be what makes this MR a
        # security MR; only the drain, reading the database, can tell, so it decides.
        policy = self.runtime.policy
        if (
            not recorder.spool_depth
            and mr_key(delivery) not in self.runtime.known
            and not is_security_event(delivery, policy)
        ):
            return _answer(200, IGNORED)
        facts = extract_facts(delivery, policy)
        # The decoded JSON (hundreds of objects) is not needed past this point: dropped
        # now, it dies young instead of being promoted and re-scanned by the collector
        # while the delivery waits for its batch to commit.
        delivery = delivery.without_payload()
        outcome = await recorder.submit(delivery, facts)
        if outcome.status == "recorded":
            self.runtime.known.add(facts.key)
        if outcome.status == "spooled":
            extra = {"received_at": isoformat(received_at), "spool_depth": recorder.spool_depth}
            return 202, outcome, outcome.to_json() | extra
        return _answer(200, outcome)


def _answer(status: int, outcome: Outcome) -> tuple[int, Outcome, dict[str, Any]]:
    return status, outcome, outcome.to_json()


def _event_header(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-gitlab-event":
            return str(value.decode("latin-1"))
    return None


def _row_ids(outcome: Outcome) -> dict[str, Any]:
    row = outcome.row or {}
    return {k: row[k] for k in ("instance", "project_id", "mr_iid", "decision") if k in row}
