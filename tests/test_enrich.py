"""Label-time enrichment's order of work, against a fake GitLab and a real PostgreSQL."""

from __future__ import annotations

from apihelpers import POLICY, ledger_rows, replay
from apistory import Story
from secledger.enrich import enrich

pytest_plugins = ("gitlabfixtures",)


def test_an_mr_the_api_keeps_refusing_does_not_hold_up_the_others(engine, api, fake) -> None:
    """MR 1 is gone from GitLab (404 every time) and is the oldest candidate. A pass that
    asks one MR at a time must still get to MR 2."""
    gone = Story(iid=1, opened_with_label=False, created="2025-08-01 10:00:00 UTC")
    gone.approvals = [("bob", "2025-08-01 11:00:00 UTC")]
    gone.decision = ("merge", "carol", "2025-08-01 12:00:00 UTC")
    kept = Story(iid=2, opened_with_label=False)
    kept.publish(fake)
    replay(engine, fake.url, gone.webhooks() + kept.webhooks())
    assert [r["labeled_at_source"] for r in ledger_rows(engine)] == ["created_at_fallback"] * 2

    # Counted as gone (a 404), noted as api_error: asked again on later passes.
    assert enrich(engine, api, POLICY, limit=1).outcomes == {"gone": 1}
    assert enrich(engine, api, POLICY, limit=1).outcomes == {"recorded": 1}
    sources = {r["mr_iid"]: r["labeled_at_source"] for r in ledger_rows(engine)}
    assert sources == {1: "created_at_fallback", 2: "api"}
    # Later passes still ask the refused one again: the API may answer another time.
    assert enrich(engine, api, POLICY, limit=1).outcomes == {"gone": 1}
