"""Listing merge requests from a fake GitLab that changes while the pages are read."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

import fakegitlab
from apihelpers import POLICY, ledger_rows
from apistory import Story
from fakegitlab import FakeGitLab, Seen
from secledger.backfill import Backfill, Period
from secledger.errors import GitLabAPIError
from secledger.gitlab_api import GitLabAPI, Scope

pytest_plugins = ("gitlabfixtures",)
SINCE = datetime(2025, 8, 1, tzinfo=UTC)
PROJECT = Scope("projects", "14")


def publish(fake: FakeGitLab, count: int, *, same_time: bool = False) -> None:
    """MRs 1..count with sec::high, created a minute apart (or all at once), oldest first."""
    for iid in range(1, count + 1):
        minute = 0 if same_time else iid
        Story(iid=iid, created=f"2025-08-05 19:{minute:02d}:00 UTC").publish(fake)


def once_after_first_page(fake: FakeGitLab, change: Callable[[], None]) -> None:
    """Change GitLab once, right after it answered the first page of an MR listing."""

    def after(seen: Seen) -> None:
        if seen.path.endswith("/merge_requests") and seen.query.get("labels") == "sec::high":
            fake.after = None
            change()

    fake.after = after


def unlabel(fake: FakeGitLab, iid: int) -> None:
    """Someone removes the security label of an MR (its updated_at moves on)."""
    mr = fake.projects[14].mrs[iid]
    mr["labels"], mr["updated_at"] = ["frontend"], "2025-08-06T09:00:00.000Z"


def listed(api: GitLabAPI, label: str | None = "sec::high") -> list[int]:
    return [int(mr["iid"]) for mr in api.merge_requests(PROJECT, label, SINCE, None)]


@pytest.mark.parametrize(
    "leave",
    [
        pytest.param(lambda fake: unlabel(fake, 1), id="label-removed"),
        pytest.param(lambda fake: fake.projects[14].mrs.pop(1), id="deleted"),
    ],
)
def test_an_mr_leaving_the_list_between_two_pages_shifts_none_out_of_sight(
    api, fake, leave
) -> None:
    """Read by offset, the list shifted one place back when an MR already read left it
    (label removed, MR deleted) before the next page was asked for: the first MR of that
    page was never seen. Each page now starts after the last MR read, not at an offset."""
    publish(fake, 5)  # pages of two: [1, 2] [3, 4] [5]
    once_after_first_page(fake, lambda: leave(fake))
    assert listed(api) == [1, 2, 3, 4, 5]


def test_a_backfill_records_the_mr_an_offset_page_skipped(engine, api, fake) -> None:
    """End to end: the MR behind the one unlabelled mid-listing is recorded too."""
    publish(fake, 5)
    once_after_first_page(fake, lambda: unlabel(fake, 2))
    result = Backfill(engine, api, POLICY, [PROJECT], Period(SINCE)).run()
    assert result.found == 5
    assert [row["mr_iid"] for row in ledger_rows(engine)] == [1, 2, 3, 4, 5]


def test_mrs_created_in_the_same_millisecond_are_each_listed_once(api, fake) -> None:
    """More MRs share a creation time than a page holds: the pages of that one time are
    read by offset (GitLab breaks the tie by id), each MR once, and the listing ends."""
    publish(fake, 5, same_time=True)
    iids = listed(api)
    assert sorted(iids) == [1, 2, 3, 4, 5]
    assert len(iids) == 5
    asked = [
        (s.query.get("created_after"), s.query.get("page"))
        for s in fake.seen
        if s.path.endswith("/merge_requests")
    ]
    instant = "2025-08-05T19:00:00Z"
    assert asked == [(None, None), (instant, None), (instant, "2"), (instant, "3")]


def test_a_listing_not_in_creation_order_is_an_error(api, fake, monkeypatch) -> None:
    """Paging from the last MR read is sound only in creation order: an answer in any
    other (a GitLab or a proxy that drops order_by) is refused, not trusted."""
    publish(fake, 5)
    monkeypatch.setattr(
        fakegitlab, "_ordered", lambda mrs, _query: sorted(mrs, key=lambda m: -m["id"])
    )
    with pytest.raises(GitLabAPIError, match="creation order"):
        listed(api)


def test_a_server_that_ignores_page_is_an_error_not_an_endless_listing(
    api, fake, monkeypatch
) -> None:
    """The MRs of one instant, more than a page of them, are read by offset. A GitLab or
    a proxy that honours created_after but ignores page answered the same page again,
    and the listing asked for the page after it without end: a page read by offset that
    brings no MR not read already is refused."""
    publish(fake, 5, same_time=True)
    pages: list[str | None] = []
    serve_page = fakegitlab._page

    def ignoring_page(fake_: FakeGitLab, path: str, query: dict[str, str], items: list):
        pages.append(query.get("page"))
        if len(pages) > 20:  # end the listing, so that the test fails rather than hangs
            items = []
        return serve_page(fake_, path, {k: v for k, v in query.items() if k != "page"}, items)

    monkeypatch.setattr(fakegitlab, "_page", ignoring_page)
    with pytest.raises(GitLabAPIError, match="ignore"):
        listed(api)
    assert pages == [None, None, "2"]
