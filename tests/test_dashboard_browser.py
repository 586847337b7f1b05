"""The dashboard in a real headless Chromium against a real `secledger serve` and PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright

from conftest import SECRET
from dashboard_fixtures import PASSWORD, READ_TOKEN, USER, USER_HASH, demo_bodies

CHROMIUM = os.environ.get("SECLEDGER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
INSTANCE = "https://gitlab.example.com"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(base: str, server: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"secledger serve exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("secledger serve did not become ready in 60 s")


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A real `secledger serve` process on a free loopback port, with the demo history."""
    port = free_port()
    env = {
        **os.environ,
        "SECLEDGER_DATABASE_URL": database_url,
        "SECLEDGER_DATA_DIR": str(tmp_path / "data"),
        "SECLEDGER_WEBHOOK_SECRETS": SECRET,
        "SECLEDGER_USERS": f"{USER}:{USER_HASH}",
        "SECLEDGER_READ_TOKEN": READ_TOKEN,
        "SECLEDGER_LOG_LEVEL": "warning",
    }
    env.pop("SECLEDGER_CONFIG", None)
    command = [str(Path(sys.executable).parent / "secledger"), "serve", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server, time.monotonic() + 60)
        headers = {"X-Gitlab-Event": "Merge Request Hook", "X-Gitlab-Token": SECRET}
        for body in demo_bodies():
            answer = httpx.post(f"{base}/webhooks/gitlab", json=body, headers=headers, timeout=10)
            assert answer.status_code == 200
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def chart_points(page: Page, chart: str, selector: str) -> int:
    page.wait_for_selector(f"#{chart}[data-rendered=true]", timeout=20_000)
    return page.locator(f"#{chart} {selector}").count()


def announce(capsys: pytest.CaptureFixture[str], what: str, path: Path) -> None:
    with capsys.disabled():  # the path belongs in the test run's output, even on success
        print(f"\n{what}: {path}")


def save(page: Page, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    announce(capsys, "screenshot", path)
    return path


def test_dashboard_logs_in_draws_charts_filters_and_opens_a_timeline(served: str, capsys) -> None:
    """Log in, see charts drawn from the ledger, filter by tier, open an MR's trail."""
    requested: list[str] = []
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.on("request", lambda request: requested.append(request.url))
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on(
                "console",
                lambda msg: problems.append(msg.text) if msg.type == "error" else None,
            )

            page.goto(f"{served}/")
            assert "/login" in page.url, "the dashboard must not show without a login"
            page.fill("input[name=username]", USER)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{served}/")

            assert page.inner_text("#total-mrs") == "5"
            # Demo history: reviews start in two weeks across four tiers -> 5 stacked bars,
            # over three weekly buckets (the quiet week between them is drawn empty).
            chart_points(page, "volume-chart", ".barlayer .point")
            drawn = page.evaluate(
                "() => document.getElementById('volume-chart').data.map("
                "t => [t.x.length, t.y.filter(y => y > 0).length])"
            )
            assert sum(bars for _, bars in drawn) == 5, drawn
            assert {buckets for buckets, _ in drawn} == {3}, drawn
            assert page.locator("#volume-chart .legend .traces").count() == 4
            # Four tiers have a decision: one box each.
            assert chart_points(page, "ttd-chart", ".boxlayer path.box") == 4
            # The configured SLA of each tier with a box: a black bar per tier.
            assert chart_points(page, "ttd-chart", ".scatterlayer .point") == 4
            assert "critical 24 h" in page.inner_text("#sla-policy")
            assert chart_points(page, "reviewer-chart", ".barlayer .point") >= 2
            assert "bob" in page.inner_text("#reviewers")
            adherence = page.locator("#reviewers td.adherence").all_inner_texts()
            assert adherence and all(a.endswith("%") for a in adherence)
            findings = page.inner_text("#finding-list")
            assert "author-approved" in findings and "merged-by-author" in findings
            assert "acme/payments!14" in findings
            assert "overdue" in page.inner_text("#open-mrs")  # !16: critical, 24 h SLA
            save(page, "dashboard.png", capsys)

            page.select_option("select[name=tier]", "critical")
            page.click(".filters button[type=submit]")
            page.wait_for_url("**tier=critical**")
            assert page.inner_text("#total-mrs") == "2"
            assert chart_points(page, "volume-chart", ".barlayer .trace") == 1
            assert "tier critical" in page.inner_text("#scope")

            page.click("#open-mrs a:has-text('!16')")
            page.wait_for_selector("#timeline")
            timeline = page.inner_text("#timeline")
            assert "labelled sec::critical; removed sec::high" in timeline
            assert page.inner_text("#chain-summary") == "all 2 log rows verified"

            page.goto(f"{served}/mr/{quote(INSTANCE, safe='')}/14/12")
            rows = page.locator("#timeline tbody tr")
            assert rows.count() == 5
            whats = [rows.nth(i).locator("td").nth(2).inner_text() for i in range(5)]
            assert whats == [
                "labelled sec/critical",
                "approved",
                "revoked approval",
                "approved",
                "merged",
            ]
            assert "carol" in rows.nth(2).inner_text()
            save(page, "mr-timeline.png", capsys)

            page.goto(f"{served}/")
            page.click("#finding-list a:has-text('!14')")
            page.wait_for_url("**/14/14")
            mr_findings = page.inner_text("#findings")
            assert "author-approved" in mr_findings and "merged-by-author" in mr_findings
            # Each finding links the log rows that prove it to their timeline row.
            proof = page.locator("#findings a[href^='#seq-']").first
            assert page.locator(proof.get_attribute("href") or "#none").count() == 1
            save(page, "mr-findings.png", capsys)

            page.goto(f"{served}/?tier=critical")
            page.wait_for_selector("#ttd-chart[data-rendered=true]")
            page.emulate_media(media="print")
            assert page.locator("form.who").is_hidden()
            assert page.locator("form.filters").is_hidden()
            # Printing starts with beforeprint: the charts are redrawn to fit the columns.
            page.evaluate("window.dispatchEvent(new Event('beforeprint'))")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.chart')].every("
                "c => c.querySelector('svg.main-svg').getBoundingClientRect().width"
                " <= c.getBoundingClientRect().width + 1)"
            )
            pdf = ARTIFACTS / "dashboard-print.pdf"
            page.pdf(path=str(pdf), format="A4", landscape=True, print_background=True)
            announce(capsys, "printed", pdf)
        finally:
            browser.close()
    assert problems == []
    foreign = [url for url in requested if not url.startswith(served)]
    assert foreign == [], "the dashboard must load nothing from outside secledger"


def test_a_reviewer_name_with_markup_is_shown_as_text_not_a_link(served: str) -> None:
    """plotly reads <a href>, <b> and <br> in chart labels as markup: a username sent as
    an anchor became a link to another site in the reviewer chart."""
    body = next(b for b in demo_bodies() if b["object_attributes"]["action"] == "approved")
    evil = '<a href="https://evil.example/">eve</a>'
    body["user"]["username"] = evil
    body["user"]["id"] = 9_999
    headers = {"X-Gitlab-Event": "Merge Request Hook", "X-Gitlab-Token": SECRET}
    answer = httpx.post(f"{served}/webhooks/gitlab", json=body, headers=headers, timeout=10)
    assert answer.json()["status"] == "recorded"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served}/login")
            page.fill("input[name=username]", USER)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{served}/")
            page.wait_for_selector("#reviewer-chart .ytick text", state="attached")
            # (the reviewers table links the escaped name to its own filter: no harm)
            assert page.locator("#reviewer-chart a").count() == 0
            labels = page.locator("#reviewer-chart .ytick text").all_text_contents()
            assert evil in labels
        finally:
            browser.close()
