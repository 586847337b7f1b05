"""Label-time enrichment's order of work, against a fake GitLab and a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from pydantic import SecretStr
from structlog.testing import capture_logs

from apihelpers import POLICY, ledger_rows, replay
from apistory import Story
from receiver import unused_port
from secledger import enrich as enrich_module
from secledger.enrich import enrich
from secledger.gitlab_api import GitLabAPI

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


@pytest.mark.parametrize("failure", ["token refused", "unreachable"])
def test_a_failure_every_request_meets_ends_the_pass_at_once(
    engine, fake, api_settings, failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With GitLab down, each MR waited out the client's retries and timeouts before the
    next was tried: a pass over 500 MRs took more than a day. A refused token (401) or
    no answer ends the pass at the first MR; the others are asked on the next one."""
    stories = [Story(iid=iid, opened_with_label=False) for iid in (1, 2, 3)]
    for story in stories:
        story.publish(fake)
    # The deliveries name the instance the client is for: the fake, or a closed port.
    url = fake.url if failure == "token refused" else f"http://127.0.0.1:{unused_port()}"
    replay(engine, url, [body for story in stories for body in story.webhooks()])
    if failure == "token refused":
        settings = api_settings.model_copy(update={"gitlab_token": SecretStr("glpat-wrong")})
    else:
        settings = api_settings.model_copy(update={"gitlab_url": url, "gitlab_max_retries": 0})
    api = GitLabAPI.from_settings(settings)
    asked = len(fake.seen)
    # A logger cached by an earlier test (reconcile's) would write past capture_logs.
    monkeypatch.setattr(enrich_module, "log", structlog.get_logger("test.enrich"))
    with capture_logs() as logs:
        result = enrich(engine, api, POLICY, limit=10)
    assert result.outcomes == {"api_error": 1}
    events = [line["event"] for line in logs]
    assert events.count("enrich_failed") == 1
    assert "enrich_stopped" in events
    if failure == "token refused":
        assert len(fake.seen) - asked == 1


def test_an_mr_that_fails_otherwise_does_not_stop_the_pass(
    engine, fake, api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only GitLab's errors were caught: anything else (a label event GitLab dated oddly,
    a database error) ended the pass at that MR, which, never noted, came first again
    in every later pass, and the others were never reached."""
    stories = [Story(iid=iid, opened_with_label=False) for iid in (1, 2)]
    for story in stories:
        story.publish(fake)
    replay(engine, fake.url, [body for story in stories for body in story.webhooks()])
    real = enrich_module.enrich_one

    def odd_first(engine_: Any, api_: Any, policy: Any, key: Any, **kwargs: Any) -> str:
        if key.mr_iid == 1:
            raise ValueError("a label event dated oddly")
        return real(engine_, api_, policy, key, **kwargs)

    monkeypatch.setattr(enrich_module, "enrich_one", odd_first)
    assert enrich(engine, api, POLICY, limit=10).outcomes == {"failed": 1, "recorded": 1}
    # Noted: not asked again (every cron run would fail on it), unless --recheck.
    assert enrich(engine, api, POLICY, limit=10).outcomes == {}
    assert enrich(engine, api, POLICY, limit=10, recheck=True).outcomes == {"failed": 1}


def test_a_database_error_on_one_mr_is_asked_again_next_pass(
    engine, fake, api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadlock or a failover passes: noted `failed` for good, the MR stayed on the
    created_at fallback, and later runs said nothing."""
    from sqlalchemy.exc import OperationalError  # noqa: PLC0415

    story = Story(iid=1, opened_with_label=False)
    story.publish(fake)
    replay(engine, fake.url, story.webhooks())

    def deadlocked(*args: Any, **kwargs: Any) -> str:
        raise OperationalError("UPDATE ...", {}, Exception("deadlock detected"))

    monkeypatch.setattr(enrich_module, "enrich_one", deadlocked)
    assert enrich(engine, api, POLICY, limit=10).outcomes == {"failed": 1}
    monkeypatch.undo()
    assert enrich(engine, api, POLICY, limit=10).outcomes == {"recorded": 1}
