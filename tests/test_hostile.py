"""Hostile strings and shapes: stored safely, returned exactly, never a 5xx."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import orjson
from click.testing import CliRunner
from sqlalchemy import text

from builders import delivery_of, label_change, mr_event
from conftest import SECRET, post
from secledger.cli import main
from secledger.drain import Drainer
from secledger.extract import NUL_REPLACEMENT, TEXT_LIMITS
from secledger.policy import LabelPolicy
from secledger.spool import Spool

HOSTILE = [
    "sec::high",
    "sec/critical \"quoted\" 'single' `back`",
    "sec::low \u202eevil\u202c \u200fRTL\u200e",
    "sec/medium \x01\x07\x1b[31mred\x1b[0m\t\r\n",
    "sec::high; DROP TABLE delivery_log; --",
    "sec/high \\u0000 not a NUL, a backslash",
    "sec::critical 🦀 \U0010fffd",
]


def ledger_json(monkeypatch, database_url: str) -> list[dict]:
    monkeypatch.setenv("SECLEDGER_DATABASE_URL", database_url)
    result = CliRunner().invoke(main, ["ledger", "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_hostile_labels_users_and_titles_round_trip_exactly(
    client, engine, monkeypatch, database_url
) -> None:
    title = 'Fix "auth" \u202e<script>alert(1)</script> \x1b]8;;http://x\x07 [bold]x[/]'
    reviewers = ['o\'brien "x"', "\u200fmallory"]
    body = mr_event("open", labels=HOSTILE, reviewers=reviewers)
    body["object_attributes"]["title"] = title
    response = post(client, body)
    assert response.status_code == 200, response.text
    approval = mr_event(
        "approved",
        labels=HOSTILE,
        actor="bob",
        updated_at="2025-08-06 10:00:00 UTC",
        title=title,
        reviewers=reviewers,
    )
    approval["user"]["username"] = "r\u00f6\u00f6t \"\\'\x7f"
    assert post(client, approval).json()["status"] == "recorded"
    (row,) = ledger_json(monkeypatch, database_url)
    assert row["title"] == title
    assert row["security_labels"] == HOSTILE
    assert row["assigned_reviewers"] == ['o\'brien "x"', "\u200fmallory"]
    assert row["approvers"] == ["r\u00f6\u00f6t \"\\'\x7f"]
    # The table format shows them too, without interpreting markup or escapes.
    table = CliRunner().invoke(main, ["ledger"])
    assert table.exit_code == 0
    assert "\x1b[31m" not in table.output


def test_nul_bytes_are_replaced_in_facts_and_kept_in_the_raw_payload(
    client, engine, monkeypatch, database_url
) -> None:
    body = mr_event("open", labels=["sec::high\x00x"], title="a\x00b")
    raw = orjson.dumps(body)
    assert b"\\u0000" in raw
    response = post(client, raw)
    assert response.status_code == 200, response.text
    (row,) = ledger_json(monkeypatch, database_url)
    assert row["title"] == f"a{NUL_REPLACEMENT}b"
    assert row["security_labels"] == [f"sec::high{NUL_REPLACEMENT}x"]
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT payload FROM delivery_log")).scalar_one()
    assert bytes(stored) == raw


def test_a_100_kb_title_is_cut_to_the_limit_and_marked(
    client, engine, monkeypatch, database_url
) -> None:
    title = "T" * 100_000
    response = post(client, mr_event("open", labels=["sec::high"], title=title))
    assert response.status_code == 200
    (row,) = ledger_json(monkeypatch, database_url)
    assert row["title"] == title[: TEXT_LIMITS["title"]]
    with engine.connect() as conn:
        facts = conn.execute(text("SELECT facts FROM review_events")).scalar_one()
    assert facts["extra"]["truncated"] == ["title"]


def test_a_project_path_too_long_to_index_is_cut_and_recorded(client, engine) -> None:
    body = mr_event("open", labels=["sec::high"])
    # 4 bytes each in UTF-8, and random, so that PostgreSQL cannot compress the index entry.
    chosen = random.Random(54000).choices(range(0x20000, 0x2A6D0), k=1100)  # noqa: S311
    path = "".join(map(chr, chosen))
    body["project"]["path_with_namespace"] = path
    response = post(client, body)
    assert (response.status_code, response.json()["status"]) == (200, "recorded")
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT project_path FROM security_review_ledger")).scalar_one()
        facts = conn.execute(text("SELECT facts FROM review_events")).scalar_one()
    assert stored == path[: TEXT_LIMITS["project_path"]]
    assert facts["extra"]["truncated"] == ["project_path"]


def test_times_nested_a_thousand_deep_are_not_a_500(client, engine, tmp_path) -> None:
    """Comparing created_at with updated_at raised RecursionError on two deep lists: a 500
    with the database up, and a spool file no drain could pass while it was slow."""

    def deep_times(title: str) -> bytes:
        body = mr_event("open", labels=["sec::high"], title=title)
        del body["object_attributes"]["action"]
        body["object_attributes"]["created_at"] = body["object_attributes"]["updated_at"] = "DEEP"
        nested = "[" * 1000 + "1" + "]" * 1000  # under the 1024 levels intake allows
        return json.dumps(body).replace('"DEEP"', nested).encode()

    response = post(client, deep_times("posted"))
    assert (response.status_code, response.json()["status"]) == (200, "recorded")
    spool = Spool.open(tmp_path / "spool")
    now = datetime.now(UTC)
    spooled = [delivery_of(deep_times("spooled"), "deep", now)]
    spooled.append(delivery_of(mr_event("close"), "next", now))
    spool.write(spooled)
    result = Drainer(engine, spool, LabelPolicy()).all()
    assert (result.recorded, result.remaining, result.unavailable) == (2, 0, False)


def test_a_kind_or_id_nested_a_thousand_deep_is_answered_not_a_500(client, engine) -> None:
    """The messages quoted the sender's value with repr, which raised RecursionError on
    an array nested near orjson's 1,024 levels: a 500 and a traceback per request."""
    nested = "[" * 1000 + "1" + "]" * 1000
    kind = ('{"object_kind": ' + nested + "}").encode()
    ignored = post(client, kind)
    assert (ignored.status_code, ignored.json()["reason"]) == (
        200,
        "object_kind an array is not merge_request",
    )
    body = mr_event("open")
    body["object_attributes"]["iid"] = "DEEP"
    deep_iid = json.dumps(body).replace('"DEEP"', nested).encode()
    refused = post(client, deep_iid)
    assert refused.status_code == 400
    assert refused.json()["message"] == "object_attributes.iid must be an integer, got an array"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM delivery_log")).scalar_one() == 0


def test_deeply_nested_json_is_a_precise_400(client, engine) -> None:
    response = post(client, b'{"a":' * 1100 + b"1" + b"}" * 1100)
    assert response.status_code == 400
    assert response.json()["message"] == "JSON is nested deeper than 1024 levels"


def test_ids_beyond_bigint_are_a_400_not_a_database_error(client, engine) -> None:
    body = mr_event("open", labels=["sec::high"])
    body["object_attributes"]["iid"] = 2**64 - 1
    response = post(client, orjson.dumps(body))
    assert response.status_code == 400
    assert "between 0 and" in response.json()["message"]


def test_a_project_url_that_is_not_an_origin_cannot_name_the_instance(client) -> None:
    body = mr_event("open", labels=["sec::high"])
    body["project"]["web_url"] = "http://[broken"
    body["object_attributes"]["url"] = "javascript://x\x00y/"
    response = post(client, body)
    assert response.status_code == 400
    assert response.json()["error"] == "missing_field"


def test_label_change_with_hostile_previous_labels_is_recorded(client) -> None:
    current = ["backend", "sec::high"]
    change = label_change(["\x00" * 10, "\u202e" * 600], current, "2025-08-05 22:00:00 UTC")
    body = mr_event("update", labels=current, changes=change, updated_at="2025-08-05 22:00:00 UTC")
    response = post(client, body)
    assert response.status_code == 200
    assert response.json()["status"] == "recorded"


def test_stored_headers_keep_no_credential(client, engine) -> None:
    body = mr_event("open", labels=["sec::high"])
    response = post(client, body, webhook_signature="v1,c2VjcmV0", webhook_id="m1")
    assert response.json()["status"] == "recorded"
    with engine.connect() as conn:
        headers = json.loads(conn.execute(text("SELECT headers FROM delivery_log")).scalar_one())
    assert "x-gitlab-token" not in headers
    assert "webhook-signature" not in headers
    assert SECRET not in json.dumps(headers)
    assert headers["webhook-id"] == "m1"


def test_a_creation_time_at_the_end_of_time_is_recorded_not_a_503(client) -> None:
    """A forged created_at of 9999-12-31 once overflowed the SLA deadline (503 forever)."""
    body = mr_event("open", labels=["sec::high"], created_at="9999-12-31T23:59:59Z")
    response = post(client, body)
    assert response.status_code == 200, response.text
    row = response.json()["ledger"]
    assert response.json()["status"] == "recorded"
    assert row["labeled_at"] is not None
    assert not row["labeled_at"].startswith("9999")
