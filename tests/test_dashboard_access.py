"""Access control: nothing in the ledger is readable without a principal."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
import structlog
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import event, text
from structlog.testing import capture_logs

from builders import mr_event
from conftest import post
from dashboard_fixtures import (
    PASSWORD,
    USER,
    USER_HASH,
    bearer,
    demo_bodies,
    form_token,
    log_in,
    post_login,
    reader_client,
    reader_settings,
)
from faultkit import database_down
from secledger.config import Settings
from secledger.dashboard import assets, pages
from secledger.dashboard.auth import (
    COOKIE,
    Authenticator,
    hash_password,
    read_users_file,
    session_secret,
    verify_password,
)
from secledger.errors import ConfigError
from secledger.store import db
from secledger.web import create_app


@pytest.fixture
def reader(database_url, tmp_path) -> Iterator[TestClient]:
    """A dashboard-enabled receiver holding the demo history."""
    yield from reader_client(database_url, tmp_path)


ENCODED_MR = "/api/ledger/https%3A%2F%2Fgitlab.example.com/14/12"


READ_PATHS = [
    "/api/ledger",
    ENCODED_MR,
    "/api/reports/summary",
    "/api/reports/volume",
    "/api/reports/reviewers",
    "/api/reports/tiers",
    "/api/reports/projects",
    "/api/reports/periods",
    "/api/reports/open",
    "/api/reports/findings",
    "/api/reports/decision-times",
    "/api/findings",
    "/api/whoami",
]


def test_static_files_are_the_packages_own_and_any_other_name_is_a_404(reader) -> None:
    """Each name asked for was a file system lookup and a cache entry for good: a name
    too long for the file system was a 500 with a traceback, and new names grew memory."""
    css = reader.get("/static/dashboard.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    for name in ("a" * 300 + ".css", "..%2Fpyproject.toml", "nothing.js", "dashboard.css.map"):
        assert reader.get(f"/static/{name}").status_code == 404, name
    assert assets.own_asset("b" * 300 + ".css") is None


def test_read_api_refuses_requests_without_credentials(reader) -> None:
    for path in READ_PATHS:
        response = reader.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "approvers" not in response.text


def test_read_api_refuses_a_wrong_token(reader) -> None:
    response = reader.get("/api/ledger", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401


def test_read_api_accepts_the_read_token(reader) -> None:
    response = reader.get("/api/whoami", headers=bearer())
    assert response.json() == {"name": "read-token", "method": "token"}


def test_pages_redirect_to_login_without_a_session(reader) -> None:
    for path in ("/", "/mr/https%3A%2F%2Fgitlab.example.com/14/12"):
        response = reader.get(path, follow_redirects=False)
        assert response.status_code == 303
        assert response.headers["location"] == "/login?next=" + quote(path, safe="")
        assert "acme/payments" not in response.text


def test_read_token_does_not_open_the_dashboard_pages(reader) -> None:
    response = reader.get("/", headers=bearer(), follow_redirects=False)
    assert response.status_code == 303


def test_login_sets_a_signed_http_only_cookie_and_opens_the_dashboard(reader) -> None:
    log_in(reader)
    cookie = reader.cookies.get(COOKIE)
    assert cookie and USER not in cookie.split(".")[-1]
    page = reader.get("/")
    assert page.status_code == 200
    assert "acme/payments!16" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert reader.get("/api/whoami").json() == {"name": USER, "method": "session"}
    assert "security MRs</div>" in page.text
    # One MR is one "security MR", not "1 security MRs".
    tiers = reader.get("/api/reports/tiers").json()
    single = next(row["tier"] for row in tiers if row["mrs"] == 1)
    one = reader.get("/", params={"tier": single}).text
    assert '<strong id="total-mrs">1</strong> security MR</div>' in one


def test_a_tampered_cookie_is_refused(reader) -> None:
    log_in(reader)
    value = reader.cookies.get(COOKIE)
    reader.cookies.set(COOKIE, value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
    assert reader.get("/api/whoami").status_code == 401


def test_logout_forgets_the_session(reader) -> None:
    log_in(reader)
    reader.post("/logout", data={"csrf_token": form_token(reader, "/")}, follow_redirects=False)
    assert reader.get("/", follow_redirects=False).status_code == 303


def _log_out(client: TestClient):
    token = form_token(client, "/")
    return client.post("/logout", data={"csrf_token": token}, follow_redirects=False)


def test_a_copied_cookie_is_refused_after_logging_out(reader) -> None:
    log_in(reader)
    copied = reader.cookies.get(COOKIE)
    assert _log_out(reader).headers["location"] == "/login"
    reader.cookies.set(COOKIE, copied)
    assert reader.get("/api/whoami").status_code == 401
    assert reader.get("/", follow_redirects=False).status_code == 303


def test_logging_out_ends_only_that_session(reader) -> None:
    log_in(reader)
    first = reader.cookies.get(COOKIE)
    reader.cookies.clear()
    log_in(reader)
    second = reader.cookies.get(COOKIE)
    assert first != second
    _log_out(reader)
    reader.cookies.set(COOKIE, second)
    assert reader.get("/api/whoami").status_code == 401
    reader.cookies.set(COOKIE, first)
    assert reader.get("/api/whoami").json() == {"name": USER, "method": "session"}


def test_a_session_cookie_without_an_id_is_refused(reader, database_url, tmp_path) -> None:
    # The form of cookies signed before sessions could be ended on the server.
    auth = Authenticator(reader_settings(database_url, tmp_path / "data"))
    reader.cookies.set(COOKIE, auth.session_cookie(USER))
    assert reader.get("/api/whoami").status_code == 200  # the same key as the receiver's
    reader.cookies.set(COOKIE, auth._signer.dumps({"u": USER, "p": auth._stamp(USER)}))
    assert reader.get("/api/whoami").status_code == 401


def test_logging_out_without_the_database_says_the_session_is_not_ended(
    reader, database_url
) -> None:
    log_in(reader)
    token = form_token(reader, "/")
    engine = db.create(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE ended_sessions RENAME TO ended_sessions_away")
        response = reader.post("/logout", data={"csrf_token": token}, follow_redirects=False)
        assert response.status_code == 503
        assert "a copy of its cookie stays valid" in response.text
        assert COOKIE + '=""' in response.headers["set-cookie"]
    finally:
        engine.dispose()


def test_login_redirects_only_to_local_paths(reader) -> None:
    response = post_login(reader, USER, PASSWORD, "//evil.example/")
    assert response.headers["location"] == "/"


def test_failed_logins_are_logged_without_the_password_and_then_rate_limited(
    reader, monkeypatch
) -> None:
    # A logger of its own: one cached by an earlier test would bypass capture_logs.
    monkeypatch.setattr(pages, "log", structlog.get_logger("secledger.dashboard"))
    with capture_logs() as logged:
        for _ in range(5):
            wrong = post_login(reader, USER, "guess-123456")
            assert wrong.status_code == 401
        blocked = post_login(reader, USER, PASSWORD)
    assert blocked.status_code == 429
    assert COOKIE not in blocked.cookies
    # Only the login lines: the writer thread logs a delivery after answering it, so the
    # line of the fixture's last delivery can come once the capture has begun.
    logins = [line for line in logged if line["event"].startswith("login")]
    assert [line["event"] for line in logins] == ["login_failed"] * 5 + ["login_rate_limited"]
    assert logins[-1]["user_failures"] == 5
    assert "guess-123456" not in repr(logged)
    assert PASSWORD not in repr(logged)


def test_a_name_that_is_no_user_is_not_logged(reader, monkeypatch) -> None:
    # Often a password typed into the user field: it must not reach the log.
    monkeypatch.setattr(pages, "log", structlog.get_logger("secledger.dashboard"))
    typed = "Tr0ub4dor&3-typed-in-the-wrong-field"
    with capture_logs() as logged:
        for _ in range(6):
            post_login(reader, typed, "anything-123456")
        post_login(reader, USER, "guess-123456")
    # Only the login lines, as above: a delivery's line may come meanwhile.
    logins = [line for line in logged if line["event"].startswith("login")]
    # The address is limited by then too; a real user's name is still logged.
    assert [line["event"] for line in logins] == ["login_failed"] * 5 + ["login_rate_limited"] * 2
    assert typed not in repr(logged)
    assert [line["user"] for line in logins] == [None] * 6 + [USER]


def test_unknown_users_fail_like_wrong_passwords(reader) -> None:
    response = post_login(reader, "mallory", "x" * 12)
    assert response.status_code == 401
    assert "Wrong user name or password" in response.text


def test_webhook_keeps_its_own_secret_and_needs_no_login(reader) -> None:
    response = post(reader, demo_bodies()[0])
    assert response.status_code == 200
    assert response.json()["status"] == "duplicate"


def test_trusted_proxy_header_is_off_by_default(reader) -> None:
    response = reader.get("/api/whoami", headers={"X-Forwarded-User": "mallory"})
    assert response.status_code == 401


def test_trusted_proxy_header_works_only_from_a_trusted_address(database_url, tmp_path) -> None:
    settings = reader_settings(
        database_url,
        tmp_path / "data",
        trusted_user_header="X-Forwarded-User",
        trusted_proxies=["10.9.9.9/32"],
    )
    app = create_app(settings, db.Database(database_url, embedded=False))
    with TestClient(app, client=("127.0.0.1", 50000)) as untrusted:
        answer = untrusted.get("/api/whoami", headers={"X-Forwarded-User": "carol"})
        assert answer.status_code == 401
    settings = settings.model_copy(update={"trusted_proxies": ["127.0.0.1/32"]})
    app = create_app(settings, db.Database(database_url, embedded=False))
    with TestClient(app, client=("127.0.0.1", 50000)) as proxied:
        answer = proxied.get("/api/whoami", headers={"X-Forwarded-User": "carol"})
        assert answer.json() == {"name": "carol", "method": "proxy"}
        # A proxy also names the user's own address: the proxy is still the one trusted.
        forwarded = {"X-Forwarded-User": "carol", "X-Forwarded-For": "198.51.100.7"}
        answer = proxied.get("/api/whoami", headers=forwarded)
        assert answer.json() == {"name": "carol", "method": "proxy"}
    # And an address a client names for itself does not make it a trusted proxy.
    settings = settings.model_copy(update={"trusted_proxies": ["198.51.100.0/24"]})
    app = create_app(settings, db.Database(database_url, embedded=False))
    with TestClient(app, client=("127.0.0.1", 50000)) as spoofing:
        forwarded = {"X-Forwarded-User": "carol", "X-Forwarded-For": "198.51.100.7"}
        assert spoofing.get("/api/whoami", headers=forwarded).status_code == 401


def test_a_new_password_ends_the_sessions_opened_with_the_old_one(
    reader, database_url, tmp_path
) -> None:
    """A copied cookie was good for its whole max age after the password was changed
    (``secledger user add`` and a restart); a restart alone keeps it."""
    log_in(reader)
    cookie = reader.cookies.get(COOKIE)
    for password, status in (("the same password", 200), ("a new password!", 401)):
        hashed = USER_HASH if status == 200 else hash_password(password, n=2**10)
        settings = reader_settings(database_url, tmp_path / "data").model_copy(
            update={"users": {USER: hashed}}
        )
        app = create_app(settings, db.Database(database_url, embedded=False))
        with TestClient(app) as restarted:
            restarted.cookies.set(COOKIE, cookie)
            assert restarted.get("/api/whoami").status_code == status, password


def test_password_hashes_verify_and_are_salted() -> None:
    first, second = (
        hash_password("a long passphrase", n=2**10),
        hash_password("a long passphrase", n=2**10),
    )
    assert first != second
    assert first.startswith("scrypt$1024$8$1$")
    assert verify_password("a long passphrase", first)
    assert not verify_password("a long passphrase!", first)
    assert verify_password(PASSWORD, USER_HASH)


def test_a_malformed_configured_hash_stops_start_up(database_url, tmp_path) -> None:
    settings = reader_settings(database_url, tmp_path / "data")
    settings = settings.model_copy(update={"users": {"eve": "plaintext-password"}})
    with pytest.raises(ConfigError, match="not scrypt"):
        create_app(settings, db.Database(database_url, embedded=False))


def test_users_file_is_read_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# users\n\n{USER}:{USER_HASH}\n")
    assert read_users_file(path) == {USER: USER_HASH}


def test_session_key_is_generated_once_into_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = session_secret(settings)
    path = tmp_path / "data" / "session-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert session_secret(settings) == first
    assert len(first) >= 48
    configured = settings.model_copy(update={"session_secret": SecretStr("from-settings")})
    assert session_secret(configured) == b"from-settings"


def test_an_mr_url_off_its_gitlab_is_shown_but_not_linked(reader) -> None:
    """object_attributes.url is the sender's word: a javascript: URL stays text."""
    body = mr_event("open", iid=77)
    body["object_attributes"]["url"] = "javascript:alert(document.cookie)"
    assert post(reader, body).json()["status"] == "recorded"
    log_in(reader)
    page = reader.get("/mr/https%3A%2F%2Fgitlab.example.com/14/77")
    assert page.status_code == 200
    assert "javascript:alert(document.cookie)" in page.text
    assert 'href="javascript:' not in page.text
    good = reader.get("/mr/https%3A%2F%2Fgitlab.example.com/14/12")
    assert 'href="https://gitlab.example.com/' in good.text


def test_with_the_database_down_pages_and_the_api_answer_503(
    reader, server_url, database_url
) -> None:
    """Not a bare 500 without the security headers, and a traceback per request."""
    log_in(reader)
    with database_down(server_url, database_url), capture_logs() as logs:
        api = reader.get("/api/ledger", headers=bearer())
        page = reader.get("/")
    assert api.status_code == 503, api.text
    assert api.json() == {"detail": "the database cannot be reached; try again shortly"}
    assert api.headers["retry-after"] == "5"
    assert page.status_code == 503
    assert "the database cannot be reached" in page.text
    for answer in (api, page):
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert {e["event"] for e in logs} >= {"dashboard_database_unreachable"}
    assert reader.get("/api/ledger", headers=bearer()).status_code == 200  # back again


def test_the_filter_form_keeps_a_filter_its_menus_do_not_list(reader) -> None:
    """A project by id, a tier in capitals, a reviewer who only merged (the Reviewers
    table links them): shown as chosen, so that Apply keeps them."""
    log_in(reader)
    page = reader.get("/?project=14&tier=CRITICAL&reviewer=@Carol").text
    for name, value in (("project", "14"), ("tier", "CRITICAL"), ("reviewer", "@Carol")):
        menu = page.split(f'<select name="{name}">', 1)[1].split("</select>", 1)[0]
        assert f'<option value="{value}" selected>' in menu, menu


def test_a_period_that_ends_before_it_starts_is_said(reader) -> None:
    log_in(reader)
    page = reader.get("/?since=2026-02-01&until=2026-01-01").text
    assert "since must not be after until" in page


def test_the_api_refuses_a_project_on_two_instances_as_the_cli_does(reader) -> None:
    """`/api/reports/KIND` answers what `secledger report KIND` prints: the CLI refused
    project 14 once two instances had one, and the API (and the page) counted both
    together."""
    other = json.loads(
        json.dumps(demo_bodies()[0]).replace("https://gitlab.example.com", "https://git.b.test")
    )
    assert post(reader, other).json()["status"] == "recorded"
    routes = ("/api/ledger", "/api/reports/summary", "/api/reports/volume")
    for route in (*routes, "/api/reports/tiers", "/api/findings"):
        refused = reader.get(f"{route}?project=14", headers=bearer())
        assert refused.status_code == 422, route
        assert "is on 2 GitLab instances" in refused.text
        taken = reader.get(f"{route}?project=https://git.b.test/acme/payments", headers=bearer())
        assert taken.status_code == 200, taken.text
    [tiers] = reader.get(
        "/api/reports/tiers?project=https://git.b.test/acme/payments", headers=bearer()
    ).json()
    assert tiers["mrs"] == 1
    log_in(reader)
    page = reader.get("/?project=14")
    assert page.status_code == 200
    assert "is on 2 GitLab instances" in page.text
    one = reader.get("/?project=https://git.b.test/acme/payments")
    assert "GitLab instances" not in one.text


def test_a_project_url_that_names_no_project_is_said_and_refused(reader) -> None:
    log_in(reader)
    answer = reader.get("/?project=https://gitlab.example.com/")
    assert answer.status_code == 200
    assert "is not a project&#39;s URL" in answer.text
    for route in ("/api/ledger", "/api/reports/tiers", "/api/findings"):
        refused = reader.get(f"{route}?project=https://gitlab.example.com/", headers=bearer())
        assert refused.status_code == 422, route
        assert "is not a project's URL" in refused.text


def test_a_project_the_ledger_holds_nothing_of_is_said_not_shown_as_the_scope(reader) -> None:
    """The panels then show every project: the scope line named the mistyped one above
    the whole ledger's figures."""
    log_in(reader)
    page = reader.get("/?project=acme/paymnets&tier=critical").text
    assert "holds no merge request of project &#39;acme/paymnets&#39;" in page
    scope = page.split('id="scope">', 1)[1].split("</p>", 1)[0]
    assert "tier critical" in scope
    assert "paymnets" not in scope
    for route in ("/api/ledger", "/api/reports/tiers", "/api/findings"):
        refused = reader.get(f"{route}?project=acme/paymnets", headers=bearer())
        assert refused.status_code == 422, route


def test_a_query_the_server_cancels_is_no_outage(database_url, tmp_path) -> None:
    """A statement_timeout (the server answered) is not "the database cannot be
    reached": a 503 with Retry-After said so, while /readyz said ready."""
    settings = reader_settings(database_url, tmp_path / "data")
    app = create_app(settings, db.Database(database_url, embedded=False))

    def impatient(connection, _record) -> None:
        connection.autocommit = True
        connection.execute("SET statement_timeout = 50")
        connection.autocommit = False

    with TestClient(app, raise_server_exceptions=False) as client:
        engine = app.api.state.runtime.engine
        event.listen(engine, "connect", impatient)
        engine.dispose()  # every connection from now on gives up after 50 ms
        with psycopg.connect(database_url) as blocker:
            blocker.execute("LOCK TABLE security_review_ledger IN ACCESS EXCLUSIVE MODE")
            answer = client.get("/api/ledger", headers=bearer())
    assert answer.status_code == 500, answer.text


def test_the_volume_chart_fills_the_buckets_the_page_asks_for(reader) -> None:
    """Filled by the bucket chosen on the page: months listed as weeks would show the
    wrong gaps."""
    october = "2025-10-20 09:00:00 UTC"  # months before the demo's reviews
    opened = mr_event("open", iid=99, labels=["sec::low"], created_at=october, updated_at=october)
    assert post(reader, opened).json()["status"] == "recorded"
    log_in(reader)
    page = reader.get("/?bucket=month").text
    data = json.loads(
        page.split('<script type="application/json" id="chart-data">')[1].split("</script>")[0]
    )
    months = data["volume-chart"]["data"][0]["x"]
    first, last = date.fromisoformat(months[0]), date.fromisoformat(months[-1])
    every = []
    while first <= last:
        every.append(first.isoformat())
        first = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    assert months[0] == "2025-10-01" and len(months) > 2
    assert months == every, months


def test_an_mr_labelled_after_its_decision_says_so_on_its_page(reader, engine) -> None:
    """A negative time to decision read "-1d 1h" for -22 h 45 min."""
    log_in(reader)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE security_review_ledger SET time_to_decision_seconds = -81900"
                " WHERE mr_iid = 12"
            )
        )
    page = reader.get("/mr/https%3A%2F%2Fgitlab.example.com/14/12").text
    assert "none: labelled 22h 45m after the decision" in page
