"""Every dashboard form POST carries a CSRF token; one without a valid token gets 403."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from fastapi.testclient import TestClient
from sqlalchemy import text
from structlog.testing import capture_logs

from dashboard_fixtures import PASSWORD, USER, form_token, log_in, post_login, reader_settings
from secledger.dashboard import auth, csrf, pages
from secledger.dashboard.auth import COOKIE
from secledger.store import db
from secledger.throttle import Throttle
from secledger.web import create_app

REFUSED = "did not come from secledger"


@pytest.fixture
def browser(database_url, tmp_path) -> Iterator[TestClient]:
    """A dashboard without history: only its forms matter here."""
    app = create_app(
        reader_settings(database_url, tmp_path / "data"), db.Database(database_url, embedded=False)
    )
    with TestClient(app) as client:
        yield client


def login_fields(token: str | None) -> dict[str, str]:
    fields = {"username": USER, "password": PASSWORD, "next": "/"}
    return fields if token is None else {**fields, "csrf_token": token}


def test_the_login_form_carries_a_token_for_its_cookie(browser) -> None:
    token = form_token(browser)
    assert browser.cookies.get(csrf.COOKIE)
    page = browser.get("/login")
    assert 'name="csrf_token"' in page.text
    assert "set-cookie" not in page.headers  # the nonce is kept while the cookie lives
    answer = browser.post("/login", data=login_fields(token), follow_redirects=False)
    assert answer.status_code == 303
    assert browser.cookies.get(COOKIE)


def test_refused_forms_are_logged_twenty_a_minute_then_counted(browser, monkeypatch) -> None:
    """Anyone can post a form without its token: 300 such posts were 300 lines."""
    monkeypatch.setattr(pages, "log", structlog.get_logger("secledger.dashboard"))
    monkeypatch.setattr(pages, "CSRF_REFUSALS", Throttle("csrf_refused_suppressed"))
    with capture_logs() as logged:
        for _ in range(30):
            answer = browser.post("/login", data=login_fields(None), follow_redirects=False)
            assert answer.status_code == 403
        pages.CSRF_REFUSALS.flush(time.monotonic())
    events = [line["event"] for line in logged]
    assert events.count("csrf_refused") == 20
    (summary,) = [line for line in logged if line["event"] == "csrf_refused_suppressed"]
    assert (summary["count"], summary["path"]) == (10, "/login")


def test_a_login_without_a_token_is_refused_and_not_counted(browser, engine, monkeypatch) -> None:
    # A logger of its own: one cached by an earlier test would bypass capture_logs.
    monkeypatch.setattr(pages, "log", structlog.get_logger("secledger.dashboard"))
    form_token(browser)  # the cookie alone, as a cross-site form would send it
    with capture_logs() as logged:
        answer = browser.post("/login", data=login_fields(None), follow_redirects=False)
    assert answer.status_code == 403
    assert REFUSED in answer.text
    assert COOKIE not in answer.cookies
    assert 'name="csrf_token"' in answer.text  # a fresh form to try again with
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM login_attempts")).scalar_one() == 0
    assert [line["event"] for line in logged] == ["csrf_refused"]
    assert PASSWORD not in repr(logged)


@pytest.mark.parametrize("case", ["no cookie", "other browser", "tampered", "expired"])
def test_a_login_with_a_token_that_does_not_hold_is_refused(
    browser, database_url, tmp_path, monkeypatch, case
) -> None:
    token = form_token(browser)
    if case == "no cookie":
        browser.cookies.clear()
    elif case == "other browser":
        settings = reader_settings(database_url, tmp_path / "data")
        with TestClient(create_app(settings, db.Database(database_url, embedded=False))) as other:
            token = form_token(other)  # valid, signed, but for the other browser's cookie
    elif case == "tampered":
        token = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    else:
        later = time.time() + 8 * 3600 + 5  # past SECLEDGER_SESSION_MAX_AGE_SECONDS
        monkeypatch.setattr(time, "time", lambda: later)
    answer = browser.post("/login", data=login_fields(token), follow_redirects=False)
    assert answer.status_code == 403
    assert REFUSED in answer.text
    assert COOKIE not in answer.cookies


def test_logout_without_a_token_is_refused_and_keeps_the_session(browser) -> None:
    log_in(browser)
    refused = browser.post("/logout", follow_redirects=False)
    assert refused.status_code == 403
    assert REFUSED in refused.text
    assert browser.get("/api/whoami").status_code == 200


def test_logout_with_the_pages_token_ends_the_session(browser) -> None:
    log_in(browser)
    token = form_token(browser, "/")
    answer = browser.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert answer.status_code == 303
    assert browser.get("/api/whoami").status_code == 401


def test_logging_in_starts_a_new_nonce(browser) -> None:
    """A token from before the login is not valid after it."""
    before = form_token(browser)
    nonce = browser.cookies.get(csrf.COOKIE)
    answer = browser.post("/login", data=login_fields(before), follow_redirects=False)
    assert answer.status_code == 303
    assert browser.cookies.get(csrf.COOKIE) not in {None, nonce}
    stale = browser.post("/logout", data={"csrf_token": before}, follow_redirects=False)
    assert stale.status_code == 403


def test_a_planted_nonce_and_its_token_do_not_pass_for_a_logged_in_visitor(
    browser, database_url, tmp_path
) -> None:
    """Someone who can set cookies for the host (a sibling subdomain) plants the nonce of
    a token they fetched themselves: the nonce matches, but the token was issued for no
    session, and the visitor's form names theirs."""
    log_in(browser)
    own = form_token(browser, "/")
    settings = reader_settings(database_url, tmp_path / "data")
    with TestClient(create_app(settings, db.Database(database_url, embedded=False))) as attacker:
        planted = form_token(attacker)
        nonce = attacker.cookies.get(csrf.COOKIE)
    mine = browser.cookies.get(csrf.COOKIE)
    browser.cookies.delete(csrf.COOKIE)
    browser.cookies.set(csrf.COOKIE, nonce)
    refused = browser.post("/logout", data={"csrf_token": planted}, follow_redirects=False)
    assert refused.status_code == 403
    assert browser.get("/api/whoami").status_code == 200
    browser.cookies.delete(csrf.COOKIE)
    browser.cookies.set(csrf.COOKIE, mine)
    answer = browser.post("/logout", data={"csrf_token": own}, follow_redirects=False)
    assert answer.status_code == 303


def clears(response: Any, name: str) -> bool:
    """Whether ``response`` tells the browser to forget cookie ``name``."""
    return any(
        value.startswith(f"{name}=;") or f'{name}=""' in value
        for value in response.headers.get_list("set-cookie")
    )


def test_over_https_the_nonce_cookie_is_one_only_this_host_can_set(database_url, tmp_path) -> None:
    settings = reader_settings(database_url, tmp_path / "data")
    app = create_app(settings, db.Database(database_url, embedded=False))
    with TestClient(app, base_url="https://testserver") as secure:
        page = secure.get("/login")
        set_cookie = page.headers["set-cookie"]
        assert set_cookie.startswith(f"{csrf.SECURE_COOKIE}=")
        assert "; Secure" in set_cookie
        assert "; Path=/" in set_cookie
        assert "Domain" not in set_cookie
        token = form_token(secure)
        # The same nonce under the plain name, as a sibling host could set it, is no cookie.
        nonce = secure.cookies.get(csrf.SECURE_COOKIE)
        secure.cookies.delete(csrf.SECURE_COOKIE)
        secure.cookies.set(csrf.COOKIE, nonce)
        refused = secure.post("/login", data=login_fields(token), follow_redirects=False)
        assert refused.status_code == 403
        secure.cookies.delete(csrf.COOKIE)
        log_in(secure)
        token = form_token(secure, "/")
        answer = secure.post("/logout", data={"csrf_token": token}, follow_redirects=False)
        assert answer.status_code == 303
        assert clears(answer, csrf.SECURE_COOKIE)


def test_over_https_the_session_cookie_is_one_only_this_host_can_set(database_url, tmp_path):
    """A sibling subdomain could plant a plain ``secledger_session`` (its own session) in
    a visitor's browser and so log them in as itself: over HTTPS only the ``__Host-``
    cookie, which no other host can set, is a session."""
    settings = reader_settings(database_url, tmp_path / "data")
    app = create_app(settings, db.Database(database_url, embedded=False))
    with TestClient(app, base_url="https://testserver") as secure:
        answer = post_login(secure, USER, PASSWORD)
        assert answer.status_code == 303
        session = next(
            value
            for value in answer.headers.get_list("set-cookie")
            if value.startswith(f"{auth.SECURE_COOKIE}=")
        )
        assert "; Secure" in session
        assert "; Path=/" in session
        assert "Domain" not in session
        assert secure.get("/api/whoami").status_code == 200
        value = secure.cookies.get(auth.SECURE_COOKIE)
        secure.cookies.delete(auth.SECURE_COOKIE)
        secure.cookies.set(auth.COOKIE, value)  # as a sibling host could set it
        assert secure.get("/api/whoami").status_code == 401
        secure.cookies.delete(auth.COOKIE)
        secure.cookies.set(auth.SECURE_COOKIE, value)
        token = form_token(secure, "/")
        out = secure.post("/logout", data={"csrf_token": token}, follow_redirects=False)
        assert out.status_code == 303
        assert clears(out, auth.SECURE_COOKIE)


def form_scope(path: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    """The ASGI scope of a form POST to ``path`` from a client on 127.0.0.1."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/x-www-form-urlencoded"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "root_path": "",
    }


def test_a_login_form_past_its_size_is_refused_without_reading_the_rest(browser) -> None:
    """The login route is open to anyone: a huge body is not buffered to be cut later."""
    read = 0
    answers: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"a" * 16384, "more_body": read < 1000}

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    asyncio.run(browser.app(form_scope("/login"), receive, send))  # type: ignore[arg-type]
    assert answers[0]["status"] == 413
    assert read <= 2  # 16 MiB offered; one chunk past the limit was enough


@pytest.mark.parametrize("path", ["/login", "/logout"])
def test_a_form_whose_body_stalls_is_cut_off_at_the_body_timeout(
    database_url, tmp_path, path: str
) -> None:
    """These routes are open to anyone: 512 bodies left unfinished held every request
    slot, and GitLab's deliveries were refused 503 as long as they lasted."""
    settings = reader_settings(database_url, tmp_path / "data", body_timeout_seconds=0.5)
    app = create_app(settings, db.Database(database_url, embedded=False))
    answers: list[dict[str, Any]] = []
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"username=a", "more_body": True}
        await asyncio.sleep(30)  # the rest never comes
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    scope = form_scope(path, (b"content-length", b"8000"))

    async def run() -> float:
        started = time.monotonic()
        await asyncio.wait_for(app(scope, receive, send), 10)  # type: ignore[arg-type]
        return time.monotonic() - started

    with TestClient(app):  # the app's start-up: its dashboard state
        took = asyncio.run(run())
    assert answers[0]["status"] == 408
    assert took < 5


def test_password_checks_at_once_are_capped_across_clients(browser, monkeypatch) -> None:
    """Each check takes 32 MiB and a tenth of a CPU second; the per-name and per-address
    limits let many addresses run forty at once. Past the cap a login waits a moment,
    then is 429 with no check made; once a slot is free, the login goes through."""
    # A logger of its own: one cached by an earlier test would bypass capture_logs.
    monkeypatch.setattr(pages, "log", structlog.get_logger("secledger.dashboard"))
    monkeypatch.setattr(pages, "BUSY_LOGINS", Throttle("login_busy_suppressed"))
    state = browser.app.api.state.dashboard  # type: ignore[attr-defined]
    free = state.password_checks
    state.password_checks = asyncio.Semaphore(0)  # every slot taken
    with capture_logs() as logs:
        busy = post_login(browser, USER, PASSWORD)
    assert busy.status_code == 429
    assert "Too many logins at once" in busy.text
    assert [line["event"] for line in logs] == ["login_busy"]
    state.password_checks = free
    assert post_login(browser, USER, PASSWORD).status_code == 303


def test_forms_read_at_once_before_a_login_are_capped(browser) -> None:
    """Cut off at the timeout, slow forms sent one after another still held the server's
    512 request slots; past the cap a form is refused before its body is read."""
    state = browser.app.api.state.dashboard  # type: ignore[attr-defined]
    token = form_token(browser)
    state.form_reads = pages.MAX_FORM_READS
    refused = browser.post("/login", data=login_fields(token), follow_redirects=False)
    assert refused.status_code == 429
    assert "too many forms are being sent at once" in refused.text
    state.form_reads = 0
    assert (
        browser.post("/login", data=login_fields(token), follow_redirects=False).status_code == 303
    )
    assert state.form_reads == 0  # every read gives its place back
