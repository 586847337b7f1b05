"""The HTTP edge: the webhook handler plus FastAPI for everything else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text

from secledger import __version__, enrich, integrity, sink, webhook
from secledger.config import Settings
from secledger.runtime import Runtime
from secledger.store import db, migrate


def create_api(
    runtime_ref: dict[str, Runtime], settings: Settings, database: db.Database
) -> FastAPI:
    """FastAPI routes: health, readiness and (later) the read API."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime.open(settings, database)
        runtime_ref["runtime"] = runtime
        enricher = enrich.start_background(settings, runtime.engine)  # label times, off-path
        sender = sink.start_worker(settings, runtime.engine, db.libpq_url(database.url))
        checkpointing = integrity.schedule(settings, runtime.engine)
        try:
            yield
        finally:
            await integrity.stop(checkpointing)
            if sender is not None:
                sender.close()
            if enricher is not None:
                enricher.close()
            runtime.close()

    api = FastAPI(title="secledger", version=__version__, lifespan=lifespan)

    @api.get("/healthz", summary="The process is alive")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="The database is reachable and migrated; spool depth")
    def readyz() -> JSONResponse:
        runtime = runtime_ref.get("runtime")
        checks: dict[str, Any] = {"database": False, "migrations": False}
        if runtime is not None:
            try:
                with runtime.engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                    checks["database"] = True
                    checks["migrations"] = migrate.is_current(conn)
            except Exception as exc:  # noqa: BLE001 - readiness reports, it does not raise
                checks["error"] = type(exc).__name__
            # Deliveries waiting for the database: acknowledged, not yet in the ledger.
            try:
                checks["spool"] = runtime.spool.status().to_json()
            except OSError as exc:
                checks["spool"] = {"error": exc.strerror or type(exc).__name__}
        ready = checks["database"] and checks["migrations"]
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    return api


def create_app(settings: Settings, database: db.Database) -> Any:
    """The ASGI application ``secledger serve`` runs."""
    runtime_ref: dict[str, Runtime] = {}
    api = create_api(runtime_ref, settings, database)
    handler: list[webhook.WebhookHandler] = []

    async def app(scope: webhook.Scope, receive: webhook.Receive, send: webhook.Send) -> None:
        if scope["type"] == "http" and scope["path"] == webhook.PATH:
            if not handler:
                handler.append(webhook.WebhookHandler(runtime_ref["runtime"]))
            await handler[0](scope, receive, send)
            return
        await api(scope, receive, send)

    app.api = api  # type: ignore[attr-defined]
    return app
