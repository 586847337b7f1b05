"""The GitLab client's edges: where the token goes, and what a failure says.

The token goes to the configured GitLab origin and nowhere else. A GitLab whose
``external_url`` differs from the URL secledger was given (another host name, or
``http://`` behind a TLS proxy) names that URL in its ``Link`` headers, and a proxy may
answer with a redirect: neither may carry the token away. A failure names the host and
its cause in words, briefly, and one no retry can mend is not retried.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from secledger.config import Settings
from secledger.errors import ConfigError, GitLabAPIError
from secledger.gitlab_api import GitLabAPI, Scope

TOKEN = "glpat-confined-token"
PROJECT = Scope("projects", "14")
Answer = Callable[[str], tuple[int, dict[str, str], Any]]


class Server:
    """An HTTP server that answers with ``answer(path)`` and keeps each request's headers."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.seen: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.seen.append((self.path, dict(self.headers.items())))
                status, headers, body = outer.answer(self.path)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                for name, value in (headers | {"Content-Type": "application/json"}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def tokens(self) -> list[str | None]:
        return [headers.get("PRIVATE-TOKEN") for _, headers in self.seen]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def elsewhere() -> Iterator[Server]:
    """Another origin (another port of the same host), answering an empty page."""
    server = Server(lambda _path: (200, {}, []))
    yield server
    server.close()


def client(url: str, retries: int = 0) -> GitLabAPI:
    return GitLabAPI.from_settings(
        Settings(gitlab_url=url, gitlab_token=SecretStr(TOKEN), gitlab_max_retries=retries)
    )


def test_next_pages_stay_on_the_configured_origin(elsewhere: Server) -> None:
    label = {"id": 1, "name": "sec::high"}

    def answer(path: str) -> tuple[int, dict[str, str], Any]:
        if "page=2" in path:
            return 200, {}, [label | {"id": 2}]
        link = f'<{elsewhere.url}/api/v4/projects/14/labels?page=2&per_page=100>; rel="next"'
        return 200, {"Link": link}, [label]

    gitlab = Server(answer)
    try:
        ids = [item["id"] for item in client(gitlab.url).labels(PROJECT)]
    finally:
        gitlab.close()
    assert ids == [1, 2]  # the second page was read from the configured GitLab
    assert elsewhere.seen == []
    assert gitlab.tokens() == [TOKEN, TOKEN]


def test_a_redirect_to_another_origin_is_refused_and_named(elsewhere: Server) -> None:
    """Followed without the token, it read a private project as missing (404) there, and
    every MR of a GitLab that had moved counted as deleted; with the token, it would have
    handed the token to whoever answers there."""
    moved = elsewhere.url.replace("127.0.0.1", "user:pw@127.0.0.1")
    gitlab = Server(lambda path: (302, {"Location": moved + path}, {}))
    try:
        with pytest.raises(GitLabAPIError) as refused:
            list(client(gitlab.url).labels(PROJECT))
    finally:
        gitlab.close()
    assert gitlab.tokens() == [TOKEN]
    assert elsewhere.seen == []
    assert f"it redirects to {elsewhere.url}: if GitLab moved there" in str(refused.value)
    assert "pw" not in str(refused.value)
    assert refused.value.systemic  # a pass over many MRs stops at it


def test_a_redirect_within_the_origin_keeps_the_token() -> None:
    def answer(path: str) -> tuple[int, dict[str, str], Any]:
        if path.startswith("/moved"):
            return 200, {}, [{"id": 7, "name": "sec::low"}]
        return 301, {"Location": "/moved" + path}, {}

    gitlab = Server(answer)
    try:
        assert [item["id"] for item in client(gitlab.url).labels(PROJECT)] == [7]
    finally:
        gitlab.close()
    assert gitlab.tokens() == [TOKEN, TOKEN]


def test_the_token_never_reaches_an_error_message(elsewhere: Server) -> None:
    gitlab = Server(lambda path: (302, {"Location": elsewhere.url + "/nowhere"}, {}))
    elsewhere.answer = lambda _path: (401, {}, {"message": "401 Unauthorized"})
    try:
        with pytest.raises(GitLabAPIError) as raised:
            list(client(gitlab.url).labels(PROJECT))
    finally:
        gitlab.close()
    assert TOKEN not in str(raised.value)
    assert elsewhere.seen == []  # the redirect away is not followed at all
    # The configured GitLab's own refusal is named by its status, without the token.
    gitlab = Server(lambda _path: (401, {}, {"message": "401 Unauthorized"}))
    try:
        with pytest.raises(GitLabAPIError) as raised:
            list(client(gitlab.url).labels(PROJECT))
    finally:
        gitlab.close()
    assert "401" in str(raised.value)
    assert TOKEN not in str(raised.value)


def self_signed(directory: Path) -> ssl.SSLContext:
    """A server context with a certificate no client trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert, pem = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, pem)
    return context


def test_an_untrusted_certificate_is_named_and_not_retried(tmp_path: Path) -> None:
    gitlab = Server(lambda _path: (200, {}, []), tls=self_signed(tmp_path))
    started = time.monotonic()
    try:
        with pytest.raises(GitLabAPIError) as raised:
            list(client(gitlab.url, retries=10).labels(PROJECT))
    finally:
        gitlab.close()
    # Ten retries back off for 105 s in all; none is made.
    assert time.monotonic() - started < 5
    assert str(raised.value) == (
        f"GitLab API unreachable at {gitlab.url}: its TLS certificate is not trusted"
        " (see REQUESTS_CA_BUNDLE)"
    )


def test_a_refused_connection_names_the_host_and_the_cause() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"
    with pytest.raises(GitLabAPIError) as raised:
        list(client(url).labels(PROJECT))
    assert str(raised.value) == f"GitLab API unreachable at {url}: the connection was refused"


def test_a_proxy_s_html_error_page_is_shown_in_brief() -> None:
    page = "<html><head><title>502 Bad Gateway</title></head><body>" + "x" * 5000
    gitlab = Server(lambda _path: (502, {"Content-Type": "text/html"}, page))
    try:
        with pytest.raises(GitLabAPIError) as raised:
            list(client(gitlab.url).labels(PROJECT))
    finally:
        gitlab.close()
    message = str(raised.value)
    assert message.startswith("GitLab API: /projects/14/labels: 502: 502 Bad Gateway xxx")
    assert message.endswith("...")
    assert "<" not in message
    assert len(message) < 300


def test_only_a_404_counts_as_gone() -> None:
    """GitLab answers 404 for what a token may not see, and for what was deleted; a 403
    is the token's own problem (a missing scope, a blocked user), for the operator."""
    assert GitLabAPIError("x", 404).gone
    assert not GitLabAPIError("x", 403).gone
    assert not GitLabAPIError("x", 401).gone
    assert not GitLabAPIError("x").gone


def test_a_gitlab_url_with_credentials_is_named_as_such_and_not_shown() -> None:
    """It was told to "set SECLEDGER_GITLAB_URL", which was set."""
    with pytest.raises(ConfigError, match="holds credentials") as caught:
        client("https://user:pw-77a@gitlab.example.com")
    assert "pw-77a" not in str(caught.value)
    with pytest.raises(ConfigError, match="set SECLEDGER_GITLAB_URL to the GitLab base URL"):
        client("https://[gitlab.example.com")  # not a traceback from the URL parser


def test_a_token_short_of_a_scope_is_told_what_it_needs() -> None:
    """python-gitlab keeps only GitLab's `error` word: "403: insufficient_scope" said
    neither why nor what to do."""
    body = {
        "error": "insufficient_scope",
        "error_description": "The request requires higher privileges than provided by the"
        " access token.",
        "scope": "api read_api",
    }
    gitlab = Server(lambda _path: (403, {}, body))
    try:
        with pytest.raises(GitLabAPIError) as raised:
            list(client(gitlab.url).labels(PROJECT))
    finally:
        gitlab.close()
    said = str(raised.value)
    assert "403: insufficient_scope (The request requires higher privileges" in said
    assert "needs the read_api scope" in said
    assert raised.value.systemic
    # Another 403 may be one project's (a Guest may not read its MRs): not every
    # request's, so a pass goes on to the next MR.
    gitlab = Server(lambda _path: (403, {}, {"message": "403 Forbidden"}))
    try:
        with pytest.raises(GitLabAPIError) as raised:
            list(client(gitlab.url).labels(PROJECT))
    finally:
        gitlab.close()
    assert "give it Reporter access" in str(raised.value)
    assert not raised.value.systemic
