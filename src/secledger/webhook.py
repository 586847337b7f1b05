"""``POST /webhooks/gitlab`` as a bare ASGI handler: the hot path, kept free of framework cost."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import structlog

from secledger.errors import IntakeError, StoreUnavailable
from secledger.extract import extract_facts
from secledger.intake import Ignored, check_size, parse_delivery, verify_token
from secledger.runtime import Runtime
from secledger.service import NOT_SECURITY, Outcome
from secledger.times import utcnow

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PATH = "/webhooks/gitlab"
log = structlog.get_logger("secledger.webhook")


class ClientDisconnected(Exception):
    """The sender went away before the body was complete."""


async def respond(send: Send, status: int, body: dict[str, Any]) -> None:
    """Send a JSON response."""
    data = orjson.dumps(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
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
        self.secrets = settings.secret_values()
        self.require_token = bool(self.secrets) or not settings.allow_open_loopback
        self.limit = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        if scope["method"] != "POST":
            await respond(
                send,
                405,
                {"status": "rejected", "error": "method_not_allowed", "message": "use POST"},
            )
            return
        status, body, outcome_name = await self._answer(scope, receive, started)
        self.runtime.metrics.delivery(
            _event_header(scope), outcome_name, time.perf_counter() - started
        )
        if status:
            await respond(send, status, body)

    async def _answer(
        self, scope: Scope, receive: Receive, started: float
    ) -> tuple[int, dict[str, Any], str]:
        """Status, body and metric outcome; status 0 means the sender went away."""
        try:
            status, outcome = await self._handle(scope, receive)
        except IntakeError as exc:
            log.info("delivery_rejected", status=exc.status_code, error=exc.code)
            return exc.status_code, rejection(exc), "rejected"
        except ClientDisconnected:
            log.info("delivery_abandoned")
            return 0, {}, "abandoned"
        except StoreUnavailable as exc:
            log.warning("delivery_unavailable", error=str(exc))
            return 503, {"status": "unavailable", "message": str(exc)}, "unavailable"
        log.info(
            "delivery",
            outcome=outcome.status,
            seq=outcome.seq,
            ms=round((time.perf_counter() - started) * 1000, 2),
            **_row_ids(outcome),
        )
        return status, outcome.to_json(), outcome.status

    async def _handle(self, scope: Scope, receive: Receive) -> tuple[int, Outcome]:
        headers = header_map(scope)
        if self.require_token:
            verify_token(headers, self.secrets)
        declared = headers.get("content-length", "")
        if declared.isdigit():
            check_size(int(declared), self.limit)
        body = await read_body(receive, self.limit)
        received_at = utcnow()
        delivery = parse_delivery(
            headers,
            body,
            secrets=self.secrets,
            max_body_bytes=self.limit,
            received_at=received_at,
            require_token=False,
        )
        if isinstance(delivery, Ignored):
            return 200, Outcome("ignored", reason=delivery.reason)
        facts = extract_facts(delivery, self.runtime.policy)
        if not facts.is_security and facts.key not in self.runtime.known:
            return 200, Outcome("ignored", reason=NOT_SECURITY)
        outcome = await self.runtime.recorder.submit(delivery, facts)
        if outcome.status == "recorded":
            self.runtime.known.add(facts.key)
        return 200, outcome


def _event_header(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-gitlab-event":
            return str(value.decode("latin-1"))
    return None


def _row_ids(outcome: Outcome) -> dict[str, Any]:
    row = outcome.row or {}
    return {k: row[k] for k in ("instance", "project_id", "mr_iid", "decision") if k in row}
