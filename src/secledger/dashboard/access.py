"""What every dashboard and read-API route depends on: state, a principal, filters."""

from __future__ import annotations

import asyncio
import time as time_
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.security import APIKeyCookie, HTTPBearer
from sqlalchemy import Connection, Engine

from secledger import filtermatch
from secledger.config import Settings
from secledger.dashboard.auth import COOKIE, Authenticator, Principal
from secledger.dashboard.csrf import CsrfTokens
from secledger.dashboard.queries import FilterOptions, Filters, filter_options
from secledger.dashboard.throttle import LoginThrottle
from secledger.extract import NUL_REPLACEMENT
from secledger.intake import MAX_ID
from secledger.store import sessions
from secledger.tierpolicy import CompliancePolicy, spelled

# Declared so the OpenAPI schema says how to authenticate; checked by Authenticator.
bearer_scheme = HTTPBearer(auto_error=False, description="SECLEDGER_READ_TOKEN")
cookie_scheme = APIKeyCookie(
    name=COOKIE,
    auto_error=False,
    description="dashboard login (over HTTPS the cookie is __Host-secledger_session)",
)


OPTIONS_TTL_SECONDS = 60.0
# Project ids and MR iids are PostgreSQL bigints; a larger number is a 422, not a 500.
StoredId = Annotated[int, Path(ge=0, le=MAX_ID)]


def storable(value: str | None) -> str | None:
    """A text filter as the ledger stores text: PostgreSQL cannot hold NUL (U+FFFD is kept)."""
    return value.replace("\x00", NUL_REPLACEMENT) if value else None


# scrypt checks at once: 32 MiB and ~0.1 s of CPU each.
MAX_PASSWORD_CHECKS = 4
# Forms read at once before any login: each may take the body timeout, and the server
# takes 512 requests at once in all, which GitLab's deliveries must keep getting.
MAX_FORM_READS = 32


@dataclass
class Dashboard:
    """Built once per application and kept on ``app.state.dashboard``."""

    settings: Settings
    auth: Authenticator
    policy: CompliancePolicy
    throttle: LoginThrottle
    csrf: CsrfTokens
    # Password checks under way at once, across all clients (see pages.login).
    password_checks: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_PASSWORD_CHECKS)
    )
    # Login and logout forms being read at once (see pages._form).
    form_reads: int = 0
    _options: tuple[float, FilterOptions] | None = None

    def options(self, conn: Connection) -> FilterOptions:
        """Filter choices, re-read at most once a minute (they scan the whole ledger)."""
        now = time_.monotonic()
        if self._options is None or now - self._options[0] > OPTIONS_TTL_SECONDS:
            self._options = (now, filter_options(conn))
        return self._options[1]

    @property
    def tiers(self) -> list[str]:
        """Tiers in policy order (highest first), then the unclassified bucket."""
        return [*self.settings.risk_tiers, self.settings.unclassified_tier]

    def tier(self, value: str | None) -> str | None:
        """A tier filter as the settings spell it, as ``secledger report --tier`` takes it;
        a name no tier has is kept (rows may carry a tier configured before)."""
        value = storable(value)
        return None if value is None else spelled(self.tiers, value) or value


class LoginRequired(Exception):
    """A page was asked for without a session; answered with a redirect to /login."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def dashboard(request: Request) -> Dashboard:
    """The dashboard state."""
    state: Dashboard = request.app.state.dashboard
    return state


def engine(request: Request) -> Engine:
    """The running receiver's engine; 503 while it starts or stops."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise HTTPException(503, "the receiver is not running")
    result: Engine = runtime.engine
    return result


def api_reader(
    request: Request,
    state: Annotated[Dashboard, Depends(dashboard)],
    _bearer: Annotated[object, Security(bearer_scheme)],
    _cookie: Annotated[object, Security(cookie_scheme)],
) -> Principal:
    """A principal from the read token, a session or a trusted proxy; else 401."""
    principal = unless_ended(request, state.auth.identify(request, allow_token=True))
    if principal is None:
        raise HTTPException(
            401, "authentication required", headers={"WWW-Authenticate": 'Bearer realm="secledger"'}
        )
    return principal


def page_reader(request: Request, state: Annotated[Dashboard, Depends(dashboard)]) -> Principal:
    """A principal from a session or a trusted proxy; else a redirect to the login page."""
    principal = unless_ended(request, state.auth.identify(request, allow_token=False))
    if principal is None:
        # raw_path keeps the percent-encoded instance URL of /mr/ links intact.
        raw = request.scope.get("raw_path")
        path = raw.decode("latin-1") if raw else request.url.path
        target = path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return principal


def unless_ended(request: Request, principal: Principal | None) -> Principal | None:
    """``principal``, unless it is a cookie session its user ended by logging out."""
    if principal is None or principal.session is None:
        return principal
    with engine(request).connect() as conn:
        return None if sessions.ended(conn, principal.session) else principal


def safe_next(target: str | None) -> str:
    """Only same-site paths may be redirected to after login."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _day(value: str | None, name: str, errors: list[str]) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        errors.append(f"{name} must be a date like 2026-11-01")
        return None


def build_filters(
    since: date | None,
    until: date | None,
    project: str | None = None,
    tier: str | None = None,
    reviewer: str | None = None,
) -> Filters:
    """Filters from calendar days (UTC); ``until`` is inclusive."""
    start = datetime.combine(since, time.min, UTC) if since else None
    # The day after the last representable date does not exist: no upper bound then.
    end = None
    if until is not None and until < date.max:
        end = datetime.combine(until + timedelta(days=1), time.min, UTC)
    return Filters(start, end, storable(project), storable(tier), storable(reviewer))


def parse_filters(state: Dashboard, params: Mapping[str, str]) -> tuple[Filters, list[str]]:
    """Filters from a page's query string, tolerating empty fields; errors to show."""
    errors: list[str] = []
    since = _day(params.get("since"), "since", errors)
    until = _day(params.get("until"), "until", errors)
    if since is not None and until is not None and since > until:
        # Said, or the empty view reads as no activity in the period (the API: 422).
        errors.append("since must not be after until: no day is in this period")
    tier = state.tier(params.get("tier"))
    project = params.get("project")
    if project:
        try:
            filtermatch.project_params(project)
        except filtermatch.BadProject as exc:
            errors.append(str(exc))
            project = None
    filters = build_filters(since, until, project, tier, params.get("reviewer"))
    return filters, errors
