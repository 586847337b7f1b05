"""The HTTP edge: the webhook handler plus FastAPI for everything else."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import Engine, text
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from secledger import (
    __version__,
    background,
    dashboard,
    enrich,
    integrity,
    logs,
    overdue,
    recovery,
    replicapolicy,
    sink,
    throttle,
    webhook,
)
from secledger.config import Settings
from secledger.dashboard import pages
from secledger.dashboard.access import api_reader
from secledger.dashboard.auth import PEER, check_access, session_secret
from secledger.errors import ConfigError
from secledger.gitlab_api import GitLabAPI
from secledger.runtime import Runtime
from secledger.spool import Spool, SpoolUnavailable
from secledger.store import db, migrate


@dataclass
class _Beside:
    """What ``serve`` runs beside the receiver, each off the request path."""

    recoverer: recovery.Recoverer | None = None
    enricher: enrich.Enricher | None = None
    sender: sink.SinkWorker | None = None
    checkpointing: asyncio.Task[None] | None = None
    sla_refresh: asyncio.Task[None] | None = None
    summaries: asyncio.Task[None] | None = None
    replica_policy: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings, database: db.Database, runtime: Runtime) -> _Beside:
        """Start each; when one cannot start (a key or token file unreadable, say), stop
        those already started and raise."""
        beside = cls()
        try:
            beside.recoverer = recovery.start(settings, runtime.engine, runtime.metrics.rechecked)
            runtime.recover = (
                beside.recoverer.recover if beside.recoverer else recovery.off(settings)
            )
            beside.enricher = enrich.start_background(settings, runtime.engine)  # label times
            libpq = db.conninfo(database.url)
            beside.sender = sink.start_worker(settings, runtime.engine, libpq)
            beside.checkpointing = integrity.schedule(settings, runtime.engine)
            # Open MRs become overdue without any event: found every few minutes.
            beside.sla_refresh = overdue.schedule(settings, runtime.engine)
            beside.summaries = asyncio.create_task(_tick_summaries())
            watch = replicapolicy.Watch(runtime.policy_digest)
            beside.replica_policy = replicapolicy.schedule(runtime.engine, watch)
        except BaseException:
            await beside.stop()
            raise
        return beside

    @staticmethod
    def check(settings: Settings) -> None:
        """Raise what ``start`` would for a token or key file that cannot be read, starting
        nothing: ``serve`` asks before the database starts, so the error is one line."""
        if recovery.why_off(settings) is None or enrich.would_start(settings):
            GitLabAPI.from_settings(settings)
        integrity.scheduled_key(settings)

    async def stop(self) -> None:
        """Stop each. The threads are all told first, so that their waits for the work
        in hand overlap instead of adding up before the writer drains."""
        for worker in (self.recoverer, self.enricher, self.sender):
            if worker is not None:
                worker.stopping()
        for task in (self.sla_refresh, self.checkpointing, self.replica_policy, self.summaries):
            await background.cancel(task)
        if self.sender is not None:
            self.sender.close()
        if self.enricher is not None:
            self.enricher.close()
        if self.recoverer is not None:
            self.recoverer.close()


# How often the log's per-minute summaries are asked whether their minute is over.
SUMMARY_TICK_SECONDS = 5.0


async def _tick_summaries() -> None:
    """Write each summary line when its interval ends (``throttle.tick_all``): a count
    held until the next line of its kind could wait for hours after a flood stopped."""
    while True:
        await asyncio.sleep(SUMMARY_TICK_SECONDS)
        throttle.tick_all()


def create_api(
    runtime_ref: dict[str, Runtime],
    settings: Settings,
    database: db.Database,
) -> FastAPI:
    """FastAPI routes: health, readiness, metrics, the dashboard and the read API."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime.open(settings, database)
        runtime_ref["runtime"] = runtime
        try:  # a key or token file that cannot be read stops the start, the writer drained
            beside = await _Beside.start(settings, database, runtime)
        except BaseException:
            runtime.close()
            raise
        _app.state.runtime = runtime
        try:
            yield
        finally:
            _app.state.runtime = None
            await beside.stop()
            runtime.close()

    # No /docs or /redoc: FastAPI's viewers load their JavaScript from a CDN, which an
    # air-gapped site cannot reach and the dashboard's CSP forbids. /openapi.json stays.
    api = FastAPI(
        title="secledger", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )

    # On the event loop, not in the thread pool: probes must answer while the pool's
    # threads wait on a database that stopped answering.
    @api.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    probe = _DatabaseProbe()

    @api.get("/readyz", summary="The database is reachable and migrated; spool depth")
    async def readyz() -> JSONResponse:
        runtime = runtime_ref.get("runtime")
        checks: dict[str, Any] = {"database": False, "migrations": False}
        stalled = unwritable = False
        if runtime is not None:
            checks |= await probe.check(runtime.engine)
            # Deliveries waiting for the database: acknowledged, not yet in the ledger.
            try:
                # Open to anyone: counts only, not where the spool lives on the host.
                spool = (await asyncio.to_thread(runtime.spool.status)).to_json()
                spool.pop("directory", None)
                checks["spool"] = spool
                unwritable = not spool["writable"]
            except OSError as exc:
                checks["spool"] = {"error": exc.strerror or type(exc).__name__}
                unwritable = True
            # A database that answers SELECT 1 may still not commit (a stall, a held
            # chain lock): deliveries then go to the spool after spool_after_seconds.
            waiting = runtime.recorder.waiting_seconds
            # Stopped (a failure no guard caught, or serve stopping): nothing is recorded.
            stalled = (0 < settings.spool_after_seconds <= waiting) or not runtime.recorder.alive
            checks["writer"] = {
                "waiting_seconds": round(waiting, 1),
                "stalled": stalled,
                "alive": runtime.recorder.alive,
            }
        ready = checks["database"] and checks["migrations"] and not (stalled or unwritable)
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    # Metrics carry counts, never names; scraping is open unless metrics_require_auth.
    guard = [Depends(api_reader)] if settings.metrics_require_auth else []

    @api.get("/metrics", summary="Prometheus metrics", dependencies=guard)
    def metrics(request: Request) -> Response:
        runtime = getattr(request.app.state, "runtime", None)
        if runtime is None:
            raise HTTPException(503, "the receiver is not running")
        return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    dashboard.install(api, settings)
    return api


# How long /readyz waits for its database query: a balancer's probe gives up after a
# few seconds, and a database that takes longer is not ready.
READY_TIMEOUT_SECONDS = 2.0


class _DatabaseProbe:
    """/readyz's database query, one at a time, answered within a deadline.

    A database that accepts connections and never answers held each probe for as long as
    TCP took to give up, and every probe a thread: one query runs, and the probes that
    come meanwhile wait on it, each no longer than the deadline.
    """

    def __init__(self) -> None:
        self._running: asyncio.Future[dict[str, Any]] | None = None

    async def check(self, engine: Engine) -> dict[str, Any]:
        running = self._running
        # A query of another event loop (a test client's before this one) is not awaited.
        if (
            running is None
            or running.done()
            or running.get_loop() is not asyncio.get_running_loop()
        ):
            running = self._running = _start_query(engine)
        try:
            return await asyncio.wait_for(asyncio.shield(running), READY_TIMEOUT_SECONDS)
        except TimeoutError:
            return {"database": False, "migrations": False, "error": "timeout"}


def _start_query(engine: Engine) -> asyncio.Future[dict[str, Any]]:
    """``_query_ready`` on a daemon thread of its own: the loop's executor would make a
    stop wait for a query the database never answers (closing a loop joins its threads)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[dict[str, Any]] = loop.create_future()

    def run() -> None:
        result = _query_ready(engine)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits now
            loop.call_soon_threadsafe(_settle, future, result)

    threading.Thread(target=run, name="secledger-readyz", daemon=True).start()
    return future


def _settle(future: asyncio.Future[dict[str, Any]], result: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(result)


def _query_ready(engine: Engine) -> dict[str, Any]:
    checks: dict[str, Any] = {"database": False, "migrations": False}
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            checks["database"] = True
            checks["migrations"] = migrate.is_current(conn)
    except Exception as exc:  # noqa: BLE001 - readiness reports, it does not raise
        checks["error"] = type(exc).__name__
    return checks


def check_settings(settings: Settings) -> None:
    """Refuse, before anything starts, a token or key file the receiver could not read,
    and a data or spool directory it could not write (a read-only root file system)."""
    _Beside.check(settings)
    check_access(settings)  # users' hashes and trusted proxies
    session_secret(settings)  # generated into the data directory once, unless configured
    try:
        spool = Spool.open(settings.spool_path, writer=False)
    except SpoolUnavailable as exc:
        raise ConfigError(f"{exc}; set SECLEDGER_SPOOL_DIR to a writable directory") from exc
    except OSError as exc:  # a directory it may not list
        raise ConfigError(f"cannot use spool directory {settings.spool_path}: {exc}") from exc
    if not os.access(spool.directory, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot write in spool directory {spool.directory}: a delivery that arrives"
            " while the database is down could not be kept; set SECLEDGER_SPOOL_DIR"
        )


def create_app(settings: Settings, database: db.Database) -> Any:
    """The ASGI application ``secledger serve`` runs (with uvicorn's ``proxy_headers`` off).

    X-Forwarded-For and -Proto are applied, as uvicorn would (trusting the addresses in
    ``FORWARDED_ALLOW_IPS``, by default loopback), to everything but the webhook: the
    dashboard's login limit counts client addresses; the webhook uses none, and the
    middleware was a measurable share of an ignored delivery's cost.
    """
    runtime_ref: dict[str, Runtime] = {}
    api = create_api(runtime_ref, settings, database)
    trusted = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
    # uvicorn types ASGI apps with its own TypedDicts, Starlette with plain mappings.
    forwarded: Any = ProxyHeadersMiddleware(cast(Any, api), trusted_hosts=trusted)
    handler: list[webhook.WebhookHandler] = []

    async def app(scope: webhook.Scope, receive: webhook.Receive, send: webhook.Send) -> None:
        if scope["type"] == "http" and not handler and "runtime" in runtime_ref:
            # At the first request of any kind (a probe, say): the handler holds what the
            # spool's drain finds ignored, and a drain may run before any delivery comes.
            handler.append(webhook.WebhookHandler(runtime_ref["runtime"]))
        if scope["type"] == "http" and scope["path"] in webhook.PATHS:
            await handler[0](scope, receive, send)
            return
        if scope["type"] == "http":
            # The forwarding middleware replaces the client with X-Forwarded-For's address;
            # proxy login must check who sent the headers (auth.PEER), not whom they name.
            cast(dict[str, Any], scope)[PEER] = scope.get("client")
        await forwarded(scope, receive, send)
        if scope["type"] == "lifespan":
            # Shut down: the counts of the last, partial interval are still logged.
            now = time.perf_counter()
            if handler:
                handler[0].ignored.flush(now)
                handler[0].rejected.flush(now)
            for throttle in (logs.LIBRARIES, pages.CSRF_REFUSALS, pages.BUSY_LOGINS):
                throttle.flush(time.monotonic())

    app.api = api  # type: ignore[attr-defined]
    return app
