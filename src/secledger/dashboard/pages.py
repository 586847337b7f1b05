"""Server-rendered pages: login, the dashboard, one merge request's trail, static files."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import datetime
from importlib import resources
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, quote

import structlog
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from secledger import filtermatch, findings, reports
from secledger.dashboard import assets, charts, queries, trail
from secledger.dashboard.access import (
    MAX_FORM_READS,
    MAX_PASSWORD_CHECKS,
    Dashboard,
    StoredId,
    dashboard,
    engine,
    page_reader,
    parse_filters,
    safe_next,
)
from secledger.dashboard.auth import Principal, cookie_name
from secledger.dashboard.csrf import FIELD as CSRF_FIELD
from secledger.dashboard.csrf import REFUSED as CSRF_REFUSED
from secledger.extract import MRKey
from secledger.store import sessions
from secledger.store.db import reading
from secledger.throttle import Throttle
from secledger.times import utcnow

log = structlog.get_logger("secledger.dashboard")
templates = Jinja2Templates(directory=str(resources.files("secledger.dashboard") / "templates"))
router = APIRouter(include_in_schema=False)
Reader = Annotated[Principal, Depends(page_reader)]
State = Annotated[Dashboard, Depends(dashboard)]
MAX_FORM_BYTES = 8192
Outcome = Literal["ok", "failed", "limited"]


def mr_path(instance: str, project_id: int, mr_iid: int) -> str:
    """The dashboard URL of one merge request (the instance URL as one encoded segment)."""
    return f"/mr/{quote(instance, safe='')}/{project_id}/{mr_iid}"


def evidence_text(evidence: dict[str, Any]) -> str:
    """A finding's evidence on one line: ``key: value; ...`` (lists comma-separated)."""
    parts = []
    for key, value in evidence.items():
        if value is None:
            continue
        shown = (", ".join(map(str, value)) or "none") if isinstance(value, list) else str(value)
        parts.append(f"{key.replace('_', ' ')}: {shown}")
    return "; ".join(parts)


def hours_left(hours: float | None) -> str:
    """``5h 10m left``, ``2d 3h overdue``; an em dash when the clock has stopped."""
    if hours is None:
        return "—"
    text = charts.duration(abs(hours) * 3600)
    return f"{text} left" if hours >= 0 else f"{text} overdue"


templates.env.globals["mr_path"] = mr_path
templates.env.filters["duration"] = charts.duration
templates.env.filters["evidence"] = evidence_text
templates.env.filters["hours_left"] = hours_left


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A template with the common context, including the CSRF field for its forms."""
    csrf = dashboard(request).csrf
    secure = _secure(request)
    nonce, fresh = csrf.nonce(request, secure=secure)
    context.setdefault("principal", None)
    context["plotly_src"] = f"/static/vendor/plotly-{assets.plotly_version()}.min.js"
    context["csrf_field"] = CSRF_FIELD
    context["csrf_token"] = csrf.token(nonce, dashboard(request).auth.session_of(request))
    response = templates.TemplateResponse(request, name, context, status_code=status)
    if fresh:
        csrf.set_cookie(response, nonce, secure=secure)
    return response


def _secure(request: Request) -> bool:
    return dashboard(request).auth.secure(request)


async def _form(request: Request) -> dict[str, str]:
    """The form's fields; 413 past MAX_FORM_BYTES, read no further, and 408 when the body
    is not in within ``SECLEDGER_BODY_TIMEOUT_SECONDS`` (these routes are open to anyone,
    before any login: a few hundred bodies left unfinished held every request slot, and
    GitLab's deliveries were refused 503 while they lasted)."""
    state = dashboard(request)
    if state.form_reads >= MAX_FORM_READS:
        # Cut off at the timeout, slow forms sent one after another would still hold
        # the server's request slots: only these many at once.
        raise HTTPException(429, "too many forms are being sent at once; try again shortly")
    chunks: list[bytes] = []
    size = 0
    limit = state.settings.body_timeout_seconds
    state.form_reads += 1
    try:
        async with asyncio.timeout(limit):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_FORM_BYTES:
                    raise HTTPException(413, f"a form is at most {MAX_FORM_BYTES} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPException(408, f"the form was not received within {limit:g} s") from None
    finally:
        state.form_reads -= 1
    text = b"".join(chunks).decode(errors="replace")
    return {k: v[0] for k, v in parse_qs(text).items()}


def _refused(request: Request, form: dict[str, str]) -> bool:
    """True (and logged) when a POST lacks a valid CSRF token."""
    csrf = dashboard(request).csrf
    session = dashboard(request).auth.session_of(request)
    if csrf.valid(request, form.get(CSRF_FIELD), secure=_secure(request), session=session):
        return False
    client = request.client.host if request.client else "unknown"
    # Anyone can post a form without its token: the first few of a minute are logged.
    if CSRF_REFUSALS.note(time.monotonic(), (("path", request.url.path),)):
        log.warning("csrf_refused", path=request.url.path, client=client)
    return True


CSRF_REFUSALS = Throttle("csrf_refused_suppressed")
BUSY_LOGINS = Throttle("login_busy_suppressed")
BUSY = "Too many logins at once. Try again in a moment."
PASSWORD_CHECK_WAIT_SECONDS = 2.0


@router.get("/login")
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    """The login form."""
    return render(request, "login.html", next=safe_next(next), error=None)


def _attempt(state: Dashboard, database: Engine, name: str, password: str, client: str) -> Outcome:
    """``ok``, ``failed`` or ``limited``: one password check, counted in the database."""
    reservation = state.throttle.reserve(database, name, client)
    if not reservation.allowed:
        log.warning(
            "login_rate_limited",
            user=state.auth.logged_name(name),
            client=client,
            user_failures=reservation.user_failures,
            client_failures=reservation.client_failures,
        )
        return "limited"
    ok = state.auth.check_password(name, password)
    state.throttle.settle(database, reservation, succeeded=ok)
    if not ok:
        log.warning("login_failed", user=state.auth.logged_name(name), client=client)
    return "ok" if ok else "failed"


@router.post("/login")
async def login(request: Request, state: State) -> Response:
    """Check the password; rate-limited per user name and per client address."""
    form = await _form(request)
    name = form.get("username", "").strip()
    target = safe_next(form.get("next"))
    if _refused(request, form):
        return render(request, "login.html", 403, next=target, error=CSRF_REFUSED)
    client = request.client.host if request.client else "unknown"
    password = form.get("password", "")
    # Each check takes 32 MiB and a tenth of a CPU second (scrypt): the per-name and
    # per-address limits do not bound how many run at once from many addresses. A login
    # waits a moment for a free slot before it is turned away.
    try:
        await asyncio.wait_for(state.password_checks.acquire(), PASSWORD_CHECK_WAIT_SECONDS)
    except TimeoutError:
        if BUSY_LOGINS.note(time.monotonic(), ()):
            log.warning("login_busy", client=client, limit=MAX_PASSWORD_CHECKS)
        return render(request, "login.html", 429, next=target, error=BUSY)
    try:
        outcome = await run_in_threadpool(_attempt, state, engine(request), name, password, client)
    finally:
        state.password_checks.release()
    if outcome == "limited":
        error = "Too many failed logins. Wait a few minutes and try again."
        return render(request, "login.html", 429, next=target, error=error)
    if outcome == "failed":
        error = "Wrong user name or password."
        return render(request, "login.html", 401, next=target, error=error)
    log.info("login", user=name, client=client)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        cookie_name(secure=_secure(request)),
        state.auth.session_cookie(name),
        max_age=state.auth.max_age,
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )
    # Each session starts with a nonce of its own (rotation at login, as OWASP advises).
    state.csrf.set_cookie(response, state.csrf.new_nonce(), secure=_secure(request))
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """Forget the session cookie."""
    form = await _form(request)
    if _refused(request, form):
        return render(request, "refused.html", 403, message=CSRF_REFUSED)
    state = dashboard(request)
    response: Response = RedirectResponse("/login", status_code=303)
    principal = state.auth.identify(request, allow_token=False)
    if principal is not None and principal.session and principal.expires:
        ending = (principal.session, principal.expires)
        try:
            await run_in_threadpool(_end_session, engine(request), *ending)
        except SQLAlchemyError as exc:
            # The cookie is still deleted below, but a copy of it would stay valid:
            # the user must know, rather than believe the session is over.
            log.warning("logout_not_recorded", user=principal.name, error=type(exc).__name__)
            response = render(request, "refused.html", 503, message=LOGOUT_NOT_RECORDED)
        else:
            log.info("logout", user=principal.name)
    secure = _secure(request)
    # A __Host- cookie is only replaced by one set as it was: Secure, Path=/.
    response.delete_cookie(cookie_name(secure=secure), path="/", secure=secure, httponly=True)
    state.csrf.delete_cookie(response, secure=_secure(request))
    return response


LOGOUT_NOT_RECORDED = (
    "You are logged out in this browser, but the database could not be reached to end"
    " the session on the server: a copy of its cookie stays valid until it expires."
    " Log in and out again once the database answers."
)


def _end_session(database: Engine, session: str, expires: datetime) -> None:
    with database.begin() as conn:
        sessions.end(conn, session, expires, utcnow())


OPEN_SHOWN = 100
FINDINGS_SHOWN = 50


def _panels(conn: Connection, state: Dashboard, filters: queries.Filters, bucket: str) -> Any:
    chosen: queries.Bucket = "week"
    for known in queries.BUCKETS:
        chosen = known if bucket == known else chosen
    # The compliance panels are the reports `secledger report` prints, with its filters,
    # as of now: overdue MRs show as breached whether or not serve recorded it yet.
    scope = filters.for_reports(utcnow(), state.policy)
    volume = queries.volume(conn, filters, chosen)
    ttd = reports.decision_times(conn, scope)
    people = reports.reviewers(conn, scope)
    listed = findings.list_findings(
        conn,
        scope.policy,
        scope.now,
        since=scope.since,
        until=scope.until,
        project=scope.project,
        tier=scope.tier,
        reviewer=scope.reviewer,
        limit=FINDINGS_SHOWN,
    )
    return {
        "summary": queries.summary(conn, filters),
        "reviewers": people,
        "open_mrs": reports.open_mrs(conn, scope, limit=OPEN_SHOWN),
        "open_shown": OPEN_SHOWN,
        "finding_counts": reports.findings(conn, scope),
        "findings": listed,
        "findings_shown": FINDINGS_SHOWN,
        "policy": state.policy,
        "options": state.options(conn),
        "charts": charts.dashboard_charts(volume, ttd, people, state.policy, chosen),
        "bucket": chosen,
    }


_SCOPE = ("since", "until", "project", "tier", "reviewer")


@router.get("/")
def home(request: Request, principal: Reader, state: State) -> HTMLResponse:
    """The dashboard."""
    params = dict(request.query_params)
    filters, errors = parse_filters(state, params)
    with reading(engine(request)) as conn:
        if filters.project is not None:
            try:
                filtermatch.check_project(conn, filters.project)
            except filtermatch.BadProject as exc:
                # Said, as a URL naming no project is: the panels show every project.
                errors.append(str(exc))
                filters = replace(filters, project=None)
        panels = _panels(conn, state, filters, params.get("bucket", "week"))
    # What the panels were filtered by: a value refused above is not, and naming it there
    # would label every project's figures as the mistyped one's.
    scope = {k: params[k] for k in _SCOPE if params.get(k) and getattr(filters, k) is not None}
    return render(
        request,
        "dashboard.html",
        principal=principal,
        params=params,
        scope=scope,
        errors=errors,
        **panels,
    )


@router.get("/mr/{instance:path}/{project_id}/{mr_iid}")
def mr_page(
    request: Request,
    instance: str,
    project_id: StoredId,
    mr_iid: StoredId,
    *,
    principal: Reader,
    state: State,
) -> HTMLResponse:
    """One merge request: ledger row, timeline of events, chain status of its log rows."""
    key = MRKey(trail.instance_from_path(instance), project_id, mr_iid)
    with reading(engine(request)) as conn:
        row = trail.row(conn, key)
        if row is None:
            return render(request, "missing.html", 404, principal=principal, key=key)
        events = trail.timeline(conn, key)
        chain = {c.seq: c for c in trail.chain_status(conn, [e.seq for e in events])}
        # Resolved ones too: the MR page is the audit trail.
        found = findings.list_findings(conn, state.policy, utcnow(), mr=key, include_resolved=True)
    return render(
        request,
        "mr.html",
        principal=principal,
        row=row,
        events=events,
        chain=chain,
        chain_ok=all(c.ok for c in chain.values()),
        findings=found,
        logged={e.seq for e in events},
    )


def _asset_response(request: Request, asset: assets.Asset, cache: str) -> Response:
    headers = {"etag": asset.etag, "cache-control": cache, "vary": "accept-encoding"}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["content-encoding"] = "gzip"
        return Response(asset.gzipped, media_type=asset.media_type, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/static/vendor/plotly-{version}.min.js")
def plotly_js(request: Request, version: str) -> Response:
    """plotly.js from the installed plotly wheel; the URL names its version."""
    if version != assets.plotly_version():
        return Response(status_code=404)
    return _asset_response(request, assets.plotly_asset(), "public, max-age=31536000, immutable")


@router.get("/static/{name}")
def own_static(request: Request, name: str) -> Response:
    """The dashboard's stylesheet and script."""
    asset = assets.own_asset(name)
    if asset is None:
        return Response(status_code=404)
    return _asset_response(request, asset, "public, max-age=300")
