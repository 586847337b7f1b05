"""The dashboard, the read API and their access control, mounted on the FastAPI app."""

from __future__ import annotations

from urllib.parse import quote

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy.exc import DBAPIError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from secledger.config import Settings
from secledger.dashboard import api, pages
from secledger.dashboard.access import Dashboard, LoginRequired
from secledger.dashboard.assets import plotly_js_path
from secledger.dashboard.auth import Authenticator, session_secret
from secledger.dashboard.csrf import CsrfTokens
from secledger.dashboard.throttle import LoginThrottle
from secledger.listener import is_connection_error, is_unreachable
from secledger.tierpolicy import CompliancePolicy

log = structlog.get_logger("secledger.dashboard")
DATABASE_UNREACHABLE = "the database cannot be reached; try again shortly"

# Everything is served by secledger itself, so the policy can forbid any other origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Pure ASGI middleware: strict headers, and no caching of anything but static files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(_HEADERS)
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def install(app: FastAPI, settings: Settings) -> None:
    """Mount pages and read API on ``app``; fails early if users or plotly.js are unusable."""
    plotly_js_path()
    policy = CompliancePolicy.from_settings(settings)
    auth = Authenticator(settings)
    csrf = CsrfTokens(session_secret(settings), settings.session_max_age_seconds)
    throttle = LoginThrottle.from_settings(settings)
    app.state.dashboard = Dashboard(settings, auth, policy, throttle, csrf)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(LoginRequired)
    async def to_login(_request: Request, exc: LoginRequired) -> RedirectResponse:
        return RedirectResponse(f"/login?next={quote(exc.next_path, safe='')}", status_code=303)

    @app.exception_handler(DBAPIError)
    async def database_unreachable(request: Request, exc: DBAPIError) -> Response:
        # A bare 500, without the security headers, and a traceback in the log for every
        # request, was the answer while the database was down.
        # A query cancelled by statement_timeout, a deadlock, a full disk: the server
        # answered, and a 500 says so; only a connection that failed or ended is a 503.
        if not (is_connection_error(exc) and is_unreachable(exc.orig or exc)):
            raise exc
        log.warning(
            "dashboard_database_unreachable",
            path=request.url.path,
            error=type(exc.orig).__name__,
        )
        retry = {"Retry-After": "5"}
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": DATABASE_UNREACHABLE}, 503, headers=retry)
        page = pages.render(request, "refused.html", 503, message=DATABASE_UNREACHABLE)
        page.headers.update(retry)
        return page
