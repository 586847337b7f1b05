"""The read API, its OpenAPI schema, the dashboard's queries and the Prometheus metrics."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from structlog.testing import capture_logs

from builders import dumps, label_change, mr_event
from conftest import post
from dashboard_fixtures import bearer, demo_bodies, log_in, reader_client, reader_settings
from secledger.dashboard.charts import duration
from secledger.dashboard.queries import Filters, ledger_page, summary
from secledger.dashboard.trail import describe, instance_from_path
from secledger.intake import Ignored, parse_delivery
from secledger.policy import LabelPolicy
from secledger.service import feed
from secledger.store import db
from secledger.times import utcnow
from secledger.web import create_app


@pytest.fixture
def reader(database_url, tmp_path) -> Iterator[TestClient]:
    """A dashboard-enabled receiver holding the demo history."""
    yield from reader_client(database_url, tmp_path)


INSTANCE = "https://gitlab.example.com"
READ_PATHS = {
    "/api/ledger",
    "/api/ledger/{instance}/{project_id}/{mr_iid}",
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
}


def schema_of(client: TestClient) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_openapi_lists_every_read_route_and_no_page(reader) -> None:
    paths = set(schema_of(reader)["paths"])
    assert paths >= READ_PATHS | {"/healthz", "/readyz", "/metrics"}
    assert not {p for p in paths if p in {"/", "/login", "/logout"} or p.startswith("/mr/")}
    # FastAPI's viewers load JavaScript from a CDN: not served.
    assert reader.get("/docs").status_code == 404
    assert reader.get("/redoc").status_code == 404


def test_openapi_says_every_read_route_needs_a_token_or_session(reader) -> None:
    schema = schema_of(reader)
    schemes = schema["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert schemes["APIKeyCookie"]["in"] == "cookie"
    for path in READ_PATHS:
        operation = schema["paths"][path]["get"]
        assert {"HTTPBearer": []} in operation["security"], path
        assert {"APIKeyCookie": []} in operation["security"], path
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_openapi_describes_the_response_bodies(reader) -> None:
    schema = schema_of(reader)
    models = schema["components"]["schemas"]
    listing = schema["paths"]["/api/ledger"]["get"]["responses"]["200"]["content"]
    assert listing["application/json"]["schema"]["$ref"].endswith("/LedgerList")
    assert set(models["LedgerList"]["required"]) == {
        "items",
        "total",
        "limit",
        "offset",
        "next_offset",
    }
    row = models["LedgerRow"]["properties"]
    assert row["approvers"]["type"] == "array"
    assert row["decided_at"]["anyOf"][0]["format"] == "date-time"
    trail = models["MRTrail"]["properties"]
    assert trail["timeline"]["items"]["$ref"].endswith("/TimelineEvent")
    assert trail["chain"]["items"]["$ref"].endswith("/ChainCheck")
    for name in ("DecisionTimesRow", "ReviewerRow", "OpenRow", "FindingsRow", "Finding", "Summary"):
        assert name in models
    assert trail["findings"]["items"]["$ref"].endswith("/Finding")
    reviewers = schema["paths"]["/api/reports/reviewers"]["get"]
    assert reviewers["responses"]["200"]["content"]["application/json"]["schema"]["items"][
        "$ref"
    ].endswith("/ReviewerRow")
    assert {p["name"] for p in reviewers["parameters"]} >= {
        "since",
        "until",
        "project",
        "tier",
        "reviewer",
        "period",
    }
    params = {p["name"] for p in schema["paths"]["/api/ledger"]["get"]["parameters"]}
    assert params >= {"since", "until", "project", "tier", "reviewer", "state", "limit", "offset"}


def test_ledger_is_paginated_newest_first(reader) -> None:
    first = reader.get("/api/ledger?limit=2", headers=bearer()).json()
    assert (first["total"], first["limit"], first["offset"], first["next_offset"]) == (5, 2, 0, 2)
    assert [r["mr_iid"] for r in first["items"]] == [16, 14]
    last = reader.get("/api/ledger?limit=2&offset=4", headers=bearer()).json()
    assert [r["mr_iid"] for r in last["items"]] == [11]
    assert last["next_offset"] is None


def test_every_read_route_takes_a_tier_whatever_its_case_as_the_cli_does(reader) -> None:
    def rows(path: str, tier: str) -> list[dict]:
        joiner = "&" if "?" in path else "?"
        found = reader.get(f"{path}{joiner}tier={tier}", headers=bearer()).json()
        # An overdue MR's breach not recorded yet is detected "now", at each call.
        return [{k: v for k, v in row.items() if k != "detected_at"} for row in found]

    for path in ("/api/reports/tiers", "/api/reports/open", "/api/findings?all=true"):
        lower = rows(path, "critical")
        assert lower, path
        assert rows(path, "CRITICAL") == lower, path
    log_in(reader)
    assert "acme/payments!16" in reader.get("/?tier=Critical").text
    assert "acme/payments!16" not in reader.get("/?tier=low").text


def test_an_inverted_period_is_a_422_as_the_cli_refuses_it(reader) -> None:
    for path in (
        "/api/reports/tiers?since=2026-11-09&until=2026-11-09",
        "/api/findings?since=2026-11-10&until=2026-11-01",
        "/api/ledger?since=2026-11-10&until=2026-11-09",
    ):
        response = reader.get(path, headers=bearer())
        assert response.status_code == 422, path
        assert "since must" in response.json()["detail"], path
    one_day = reader.get("/api/ledger?since=2026-11-05&until=2026-11-05", headers=bearer())
    assert one_day.status_code == 200


def test_ledger_filters(reader) -> None:
    def iids(query: str) -> list[int]:
        body = reader.get(f"/api/ledger?{query}", headers=bearer()).json()
        return sorted(r["mr_iid"] for r in body["items"])

    assert iids("tier=critical") == iids("tier=Critical") == [12, 16]
    assert iids("reviewer=carol") == [12]
    assert iids("reviewer=%40carol") == [12]  # @carol, as GitLab writes a user
    # GitLab usernames differ by more than case; the reports match them so too.
    assert iids("reviewer=CaRoL") == iids("reviewer=%40Carol") == [12]
    assert iids("state=opened") == [16]
    assert iids("since=2026-11-05&until=2026-11-09") == [13, 14]
    assert iids("project=acme/payments") == iids("project=ACME/Payments") == [11, 12, 13, 14, 16]
    assert iids("project=14") == [11, 12, 13, 14, 16]  # by id, as the report routes take it
    # A project the ledger holds nothing of is a typo or an old path: an empty list
    # would read as "no security change there".
    unknown = reader.get("/api/ledger?project=other/thing", headers=bearer())
    assert unknown.status_code == 422
    assert "holds no merge request of project 'other/thing'" in unknown.json()["detail"]
    assert reader.get("/api/ledger?since=yesterday", headers=bearer()).status_code == 422
    assert reader.get("/api/ledger?limit=501", headers=bearer()).status_code == 422


@pytest.mark.parametrize(
    "instance_part",
    [
        quote(INSTANCE, safe=""),  # the documented form: one percent-encoded segment
        INSTANCE,  # unencoded slashes still match: the route takes a path
        "https:/gitlab.example.com",  # a proxy that merged the double slash
    ],
)
def test_one_merge_request_by_instance_url(reader, instance_part) -> None:
    response = reader.get(f"/api/ledger/{instance_part}/14/12", headers=bearer())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["row"]["instance"] == INSTANCE
    assert [e["what"] for e in body["timeline"]] == [
        "labelled sec/critical",
        "approved",
        "revoked approval",
        "approved",
        "merged",
    ]
    assert [e["actor"] for e in body["timeline"]] == ["erin", "carol", "carol", "bob", "dave"]
    assert all(c["ok"] for c in body["chain"])
    assert [c["seq"] for c in body["chain"]] == [e["seq"] for e in body["timeline"]]


def test_the_timeline_tells_an_approval_reset_from_a_revocation() -> None:
    assert describe("unapproved", "unapproved", {}) == "revoked approval"
    assert describe("approvals_reset", None, {}) == "pushed; GitLab reset the approvals"
    assert describe("code_owner_approvals_reset", None, {}) == (
        "pushed; GitLab reset Code Owners' approvals"
    )


def test_unknown_merge_request_is_404(reader) -> None:
    response = reader.get(f"/api/ledger/{quote(INSTANCE, safe='')}/14/999", headers=bearer())
    assert response.status_code == 404


def test_instance_from_path_restores_a_merged_double_slash() -> None:
    assert instance_from_path("https:/gitlab.example.com") == INSTANCE
    assert instance_from_path(INSTANCE) == INSTANCE
    assert instance_from_path("http:/10.0.0.1:8080") == "http://10.0.0.1:8080"


def test_dashboard_figures_of_the_core_ledger(reader) -> None:
    get = lambda path: reader.get(f"/api/reports/{path}", headers=bearer()).json()  # noqa: E731
    assert get("summary") == {
        "total": 5,
        "open": 1,
        "merged": 3,
        "closed": 1,
        "median_seconds": (10500.0 + 18310.0) / 2,  # !12 2h55m, !11 5h05m10s
    }
    volume = get("volume?bucket=month")
    assert sum(p["count"] for p in volume) == 5
    assert {p["bucket"] for p in volume} == {"2026-11-01"}


def test_the_summary_median_leaves_out_open_mrs(engine) -> None:
    """An open MR has no final decision: its approval (or a reopen) is not one."""

    def fed(body: dict) -> None:
        outcome = feed(
            engine,
            LabelPolicy(),
            {"x-gitlab-event": "Merge Request Hook"},
            dumps(body),
            max_body_bytes=1_000_000,
            source="replay",
        )
        assert outcome.status == "recorded", outcome

    created = "2026-11-02 09:00:00 UTC"
    fed(mr_event("open", iid=1, created_at=created, updated_at=created))
    fed(
        mr_event(
            "approved", iid=1, actor="bob", created_at=created, updated_at="2026-11-02 10:00:00 UTC"
        )
    )
    fed(mr_event("open", iid=2, created_at=created, updated_at=created))
    fed(
        mr_event(
            "merge", iid=2, actor="carol", created_at=created, updated_at="2026-11-02 13:00:00 UTC"
        )
    )
    with engine.connect() as conn:
        got = summary(conn, Filters())
    assert (got.open, got.merged, got.median_seconds) == (1, 1, 4 * 3600.0)
    # Labelled three hours after its merge: no time to decide, not a negative one.
    late = "2026-11-02 15:00:00 UTC"
    labelled = label_change([], ["sec::high"], late)
    fed(
        mr_event(
            "update", iid=3, state="merged", created_at=created, updated_at=late, changes=labelled
        )
    )
    fed(
        mr_event(
            "merge",
            iid=3,
            actor="carol",
            labels=[],
            created_at=created,
            updated_at="2026-11-02 12:00:00 UTC",
        )
    )
    with engine.connect() as conn:
        got = summary(conn, Filters())
        seconds = conn.execute(
            text("SELECT time_to_decision_seconds FROM security_review_ledger WHERE mr_iid = 3")
        ).scalar_one()
    assert seconds == -3 * 3600.0
    assert (got.merged, got.median_seconds) == (2, 4 * 3600.0)
    assert duration(seconds) == "-3h 0m"


def samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_change_as_deliveries_arrive(client) -> None:
    before = samples(client)
    assert before[("secledger_chain_head_seq", ())] == 0
    assert before[("secledger_spool_depth", ())] == 0
    post(client, mr_event("open", iid=1, labels=["sec::high"]))
    post(client, mr_event("open", iid=2, labels=["sec::critical"]))
    post(client, mr_event("open", iid=3, labels=["docs"]))
    post(client, mr_event("open", iid=4), token="wrong")
    post(client, mr_event("merge", iid=1, labels=["sec::high"]))
    after = samples(client)
    recorded = (("event", "Merge Request Hook"), ("outcome", "recorded"))
    assert after[("secledger_deliveries_total", recorded)] == 3
    ignored = (("event", "Merge Request Hook"), ("outcome", "ignored"))
    assert after[("secledger_deliveries_total", ignored)] == 1
    rejected = (("event", "Merge Request Hook"), ("outcome", "rejected"))
    assert after[("secledger_deliveries_total", rejected)] == 1
    assert after[("secledger_delivery_processing_seconds_count", ())] == 5
    assert after[("secledger_chain_head_seq", ())] == 3
    assert after[("secledger_open_security_mrs", (("tier", "critical"),))] == 1
    assert ("secledger_open_security_mrs", (("tier", "high"),)) not in after  # merged


def test_a_locked_mr_counts_as_open_in_the_summary_and_the_gauge(client, engine) -> None:
    """The reports count anything not merged or closed as open; the summary's and the
    gauge's `state = 'opened'` left a locked MR in the total and in no state."""
    post(client, mr_event("open", iid=5, labels=["sec::high"]))
    locked = mr_event("update", iid=5, labels=["sec::high"], updated_at="2025-08-06 09:00:00 UTC")
    locked["object_attributes"]["state"] = "locked"
    assert post(client, locked).json()["status"] == "recorded"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM security_review_ledger")).scalar() == "locked"
        got = summary(conn, Filters())
    assert (got.total, got.open, got.merged, got.closed) == (1, 1, 0, 0)
    assert samples(client)[("secledger_open_security_mrs", (("tier", "high"),))] == 1
    with engine.connect() as conn:  # what /api/ledger?state=opened lists
        assert ledger_page(conn, Filters(), limit=10, offset=0, state="opened").total == 1


def test_a_ledger_state_the_api_does_not_know_is_refused(database_url, tmp_path) -> None:
    """``state=open`` or ``Merged`` listed nothing, with a 200."""
    for reader in reader_client(database_url, tmp_path):
        for state in ("open", "Merged", "locked"):
            answer = reader.get(f"/api/ledger?state={state}", headers=bearer())
            assert answer.status_code == 422, (state, answer.text)
        assert reader.get("/api/ledger?state=merged", headers=bearer()).status_code == 200


def test_the_open_gauge_reads_the_open_mr_index(engine) -> None:
    """Migration 0025 indexes the open MRs by the reports' rule, which the gauge counts by."""
    from secledger import metrics  # noqa: PLC0415 - the query the gauge runs

    with engine.begin() as conn:
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = conn.execute(text("EXPLAIN " + str(metrics._OPEN_BY_TIER))).scalars().all()
    assert any("security_review_ledger_open" in line for line in plan), plan


def test_spool_gauge_reads_the_spool(client) -> None:
    runtime = client.app.api.state.runtime
    assert samples(client)[("secledger_spool_depth", ())] == 0
    delivery = parse_delivery(
        {"x-gitlab-event": "Merge Request Hook"},
        dumps(mr_event("approved", actor="bob")),
        secrets=(),
        max_body_bytes=10**6,
        received_at=utcnow(),
        require_token=False,
    )
    assert not isinstance(delivery, Ignored)
    runtime.spool.write([delivery, dataclasses.replace(delivery, dedup_key="sha256:other")])
    found = samples(client)
    assert found[("secledger_spool_depth", ())] == 2


def test_unknown_event_headers_share_one_label(client) -> None:
    post(client, mr_event("open"), event="Made Up Hook 1")
    post(client, mr_event("open"), event="Made Up Hook 2")
    found = samples(client)
    events = {dict(labels).get("event") for name, labels in found if "deliveries" in name}
    assert events == {"other"}


def test_metrics_need_the_token_when_configured(database_url, tmp_path) -> None:

    settings = reader_settings(database_url, tmp_path / "data", metrics_require_auth=True)
    with TestClient(create_app(settings, db.Database(database_url, embedded=False))) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer()).status_code == 200


def test_demo_history_replays_into_the_dashboard_fixture(reader) -> None:
    assert len(demo_bodies()) == 17
    assert reader.get("/healthz").json() == {"status": "ok"}


def test_grafana_sample_uses_only_metrics_secledger_exposes(client) -> None:
    board = json.loads((Path(__file__).parents[1] / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"secledger_\w+", expr)}
    exposed = set(re.findall(r"secledger_\w+", client.get("/metrics").text))
    assert used
    assert used <= exposed


HOSTILE_QUERIES = [
    "/api/ledger?offset=99999999999999999999",
    "/api/ledger?until=9999-12-31",
    "/api/ledger?tier=%00",
    "/api/ledger?project=a%00b",
    "/api/reports/summary?until=9999-12-31",
    "/api/reports/volume?reviewer=%00",
    "/api/reports/projects?project=%00",
    "/api/reports/open?reviewer=%00",
    "/api/reports/tiers?tier=%00",
    "/api/findings?project=%00",
    "/api/ledger?state=%00",
    "/api/findings?rule=%00",
    "/api/findings?rule=no-such-rule",
    "/api/findings?rule=",
    "/api/ledger/https%3A%2F%2Fgitlab.example.com/99999999999999999999/1",
    "/api/ledger/https%3A%2F%2Fgitlab.example.com/14/-1",
    "/api/ledger/%00/14/11",
]


@pytest.mark.parametrize("path", HOSTILE_QUERIES)
def test_hostile_query_values_are_a_client_error_or_an_answer_never_a_5xx(reader, path) -> None:
    """NUL (which PostgreSQL text cannot hold), ids past bigint and the last date
    once reached the database or date arithmetic and answered 500."""
    response = reader.get(path, headers=bearer())
    assert response.status_code in {200, 404, 422}, response.text


def test_hostile_page_values_are_never_a_5xx(reader) -> None:
    log_in(reader)
    for path in (
        "/?until=9999-12-31",
        "/?project=%00&tier=%00&reviewer=%00",
        "/mr/https%3A%2F%2Fgitlab.example.com/99999999999999999999/1",
        "/mr/%00/14/11",
    ):
        response = reader.get(path)
        assert response.status_code in {200, 404, 422}, (path, response.text[:300])


def test_an_empty_field_means_no_filter_on_every_route(database_url, tmp_path) -> None:
    """``since=`` was a 422 on the ledger, summary and volume routes and no filter on
    the report routes; ``all=`` a 422 on findings."""
    for reader in reader_client(database_url, tmp_path):
        for path in (
            "/api/ledger?since=&until=&state=",
            "/api/reports/summary?since=",
            "/api/reports/volume?bucket=",
            "/api/reports/reviewers?since=&period=",
            "/api/findings?all=",
        ):
            answer = reader.get(path, headers=bearer())
            assert answer.status_code == 200, (path, answer.text)
        full = reader.get("/api/ledger", headers=bearer()).json()["total"]
        assert reader.get("/api/ledger?since=", headers=bearer()).json()["total"] == full


def test_a_scrape_does_not_wait_for_a_database_that_does_not_answer(engine, database_url) -> None:
    """Held until TCP gave up, /metrics lost the spool and delivery series too, when
    they were wanted most. Here a lock holds the query: the scrape gives up on the
    database's series in time, and a later one has them again."""
    from secledger.metrics import LedgerCollector  # noqa: PLC0415 - what /metrics reads

    collector = LedgerCollector(engine, ("high",), timeout=0.3)
    with psycopg.connect(database_url) as blocker, capture_logs() as logs:
        blocker.execute("LOCK TABLE security_review_ledger IN ACCESS EXCLUSIVE MODE")
        assert list(collector.collect()) == []
        assert list(collector.collect()) == []  # waits on the same query, no new one
        readers = [t for t in threading.enumerate() if t.name == "secledger-metrics"]
        assert len(readers) == 1, readers
    assert [e["error"] for e in logs if e["event"] == "metrics_database_unavailable"] == [
        "timeout",
        "timeout",
    ]
    patient = LedgerCollector(engine, ("high",), timeout=30)  # the lock is gone
    names = {family.name for family in patient.collect()}
    assert names == {
        "secledger_open_security_mrs",
        "secledger_sla_breaches",
        "secledger_chain_head_seq",
    }
