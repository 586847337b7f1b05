"""Reconciliation: is every security MR GitLab decided in a period in the ledger, and right?

GitLab's population is every MR carrying a security label (listed per label, since the
filter has no wildcard) that was merged or closed in the period. Each is looked up in
the ledger: absent is ``missing``; a different state, decider or decision time is
``different``. An MR the ledger has decided in the period, in a project of the scope,
that GitLab does not list is asked of GitLab by its iid: ``unlabelled`` when GitLab
agrees and the MR carries no security label now (its label was removed since),
``different`` when GitLab does not agree, ``extra`` when GitLab no longer has it or
still has it with a security label (the list missed it).
``--fix`` records the history of missing and different MRs through the backfill path.
The result is stored in ``reconciliations`` (append-only) as evidence that
completeness was checked, and when.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import structlog
from sqlalchemy import Connection, Engine, RowMapping, text

from secledger import payloads as p
from secledger.backfill import (
    LabelEvents,
    MRRef,
    Period,
    Progress,
    fetch_history,
    find_merge_requests,
    mr_gone,
    record_envelopes,
)
from secledger.errors import GitLabAPIError
from secledger.extract import MRKey
from secledger.gitlab_api import GitLabAPI, Scope
from secledger.policy import LabelPolicy
from secledger.projection import MATCH_TOLERANCE
from secledger.service import DEFAULT_RECORDING, Recording
from secledger.store import ledger
from secledger.times import isoformat, parse_optional, utcnow

log = structlog.get_logger("secledger.reconcile")

_STORE = text(
    "INSERT INTO reconciliations (instance, scope, period_start, period_end, gitlab_count,"
    " ledger_count, missing_count, different_count, fixed_count, differences)"
    " VALUES (:instance, :scope, :period_start, :period_end, :gitlab_count, :ledger_count,"
    " :missing_count, :different_count, :fixed_count, CAST(:differences AS jsonb))"
    " RETURNING id, checked_at"
)
_LEDGER_DECIDED = text(
    "SELECT project_id, mr_iid FROM security_review_ledger WHERE instance = :instance"
    " AND project_id = ANY(:projects) AND coalesce(merged_at, closed_at) >= :since"
    " AND coalesce(merged_at, closed_at) < :until"
)
# The GitLab user ids the log gives the ledger's merger and closer: a user renamed since
# is told under their old name there, and the API tells the new one.
_DECIDER_IDS = text(
    "SELECT DISTINCT decision, (facts ->> 'actor_id')::bigint FROM review_events"
    " WHERE instance = :instance AND project_id = :project_id AND mr_iid = :mr_iid"
    " AND (decision = 'merged' AND actor = :merged_by OR decision = 'closed'"
    " AND actor = :closed_by) AND jsonb_typeof(facts -> 'actor_id') = 'number'"
)


@dataclass(frozen=True)
class Difference:
    """One MR where GitLab and the ledger disagree."""

    project_id: int
    mr_iid: int
    kind: str  # missing | different | extra | unlabelled
    url: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form, as stored and printed."""
        return {
            "project_id": self.project_id,
            "mr_iid": self.mr_iid,
            "kind": self.kind,
            "url": self.url,
            "fields": self.fields,
        }


@dataclass(frozen=True)
class Report:
    """The outcome of one reconciliation."""

    period: Period
    gitlab_count: int
    ledger_count: int
    differences: list[Difference]
    fixed: int = 0
    remaining: list[Difference] = field(default_factory=list)
    id: int | None = None
    checked_at: datetime | None = None

    def count(self, kind: str) -> int:
        """How many differences of one kind."""
        return sum(d.kind == kind for d in self.differences)


def decision_of(mr: Mapping[str, Any]) -> tuple[str, datetime | None, str | None] | None:
    """``(state, decided_at, decided_by)`` of a merged or closed MR from the API."""
    state = p.text(mr, "state")
    if state in ("merged", "closed"):
        at = parse_optional(mr.get(f"{state}_at"))
        return state, at, p.text(_decider(mr), "username")
    return None


def _decider(mr: Mapping[str, Any]) -> Mapping[str, Any]:
    if p.text(mr, "state") == "merged":
        return p.obj(mr, "merge_user") or p.obj(mr, "merged_by")
    return p.obj(mr, "closed_by")


def decided_during(mr: Mapping[str, Any], period: Period) -> bool:
    """Whether the MR was merged or closed inside the period."""
    decision = decision_of(mr)
    return decision is not None and period.contains(decision[1])


def decided_in(mrs: Mapping[MRRef, dict[str, Any]], period: Period) -> dict[MRRef, dict[str, Any]]:
    """The MRs merged or closed inside the period."""
    return {ref: mr for ref, mr in mrs.items() if decided_during(mr, period)}


def compare(
    mr: Mapping[str, Any],
    row: Mapping[str, Any] | RowMapping | None,
    decider_ids: frozenset[tuple[str, int]] = frozenset(),
) -> Difference | None:
    """How the ledger row differs from GitLab's MR, if it does. ``decider_ids``: the
    (decision, user id) pairs the log gives the row's merger and closer
    (``decider_ids``), so that a user renamed since is not a different decider."""
    ref = (int(mr["project_id"]), int(mr["iid"]))
    url = p.text(mr, "web_url")
    if row is None:
        return Difference(*ref, "missing", url)
    state, at, by = decision_of(mr) or (None, None, None)
    fields: dict[str, Any] = {}
    if row["state"] != state:
        fields["state"] = {"gitlab": state, "ledger": row["state"]}
    column = "merged" if state == "merged" else "closed"
    stored_at, stored_by = row[f"{column}_at"], row[f"{column}_by"]
    if at is not None and (stored_at is None or abs(stored_at - at) > MATCH_TOLERANCE):
        fields[f"{column}_at"] = {"gitlab": isoformat(at), "ledger": isoformat(stored_at)}
    by_id = p.integer(_decider(mr), "id")
    renamed = by_id is not None and (column, by_id) in decider_ids
    if by is not None and stored_by != by and not renamed:
        fields[f"{column}_by"] = {"gitlab": by, "ledger": stored_by}
    return Difference(*ref, "different", url, fields) if fields else None


def decider_ids(conn: Connection, key: MRKey, row: RowMapping | None) -> frozenset[tuple[str, int]]:
    """(decision, GitLab user id) of the log's merge and close events by the users the
    ledger row names as merger and closer."""
    if row is None or (row["merged_by"] is None and row["closed_by"] is None):
        return frozenset()
    params = {
        "instance": key.instance,
        "project_id": key.project_id,
        "mr_iid": key.mr_iid,
        "merged_by": row["merged_by"],
        "closed_by": row["closed_by"],
    }
    return frozenset((str(d), int(i)) for d, i in conn.execute(_DECIDER_IDS, params))


def differences(
    engine: Engine,
    instance: str,
    gitlab: Mapping[MRRef, dict[str, Any]],
    period: Period,
    projects: Iterable[int] = (),
) -> tuple[list[Difference], int]:
    """Every difference, and how many ledger rows were decided in the period, in
    ``projects`` (the scope's) and the projects of the MRs GitLab listed."""
    found: list[Difference] = []
    until = period.until or utcnow()
    with engine.connect() as conn:
        for (pid, iid), mr in sorted(gitlab.items()):
            key = MRKey(instance, pid, iid)
            row = ledger.get(conn, key)
            difference = compare(mr, row, decider_ids(conn, key, row))
            if difference is not None:
                found.append(difference)
        # The scope's projects, not only those GitLab still lists an MR of: in a project
        # whose every security label was removed, the ledger's MRs would go unchecked.
        covered = sorted({*projects, *(pid for pid, _ in gitlab)})
        params = {"instance": instance, "projects": covered, "since": period.since}
        decided = {
            (int(a), int(b)) for a, b in conn.execute(_LEDGER_DECIDED, params | {"until": until})
        }
    # In the ledger as decided in the period, but GitLab says otherwise (or dropped the label).
    found += [Difference(pid, iid, "extra") for pid, iid in sorted(decided - set(gitlab))]
    return found, len(decided)


def look_up_extras(
    engine: Engine,
    api: GitLabAPI,
    policy: LabelPolicy,
    period: Period,
    found: list[Difference],
    *,
    fetched: dict[MRRef, dict[str, Any]] | None = None,
) -> tuple[list[Difference], dict[MRRef, dict[str, Any]]]:
    """Each ``extra`` MR asked of GitLab by its iid (the labelled list no longer has it),
    unless ``fetched`` already holds it, and the MRs found; ``unlisted`` says what each
    one is (nothing, for one decided at an edge of ``period``). An MR GitLab no longer
    has (404) stays ``extra``.
    """
    out: list[Difference] = []
    fetched = dict(fetched or {})
    with engine.connect() as conn:
        for difference in found:
            if difference.kind != "extra":
                out.append(difference)
                continue
            ref = (difference.project_id, difference.mr_iid)
            mr = fetched.get(ref) or _merge_request(api, ref)
            if mr is None:  # gone from GitLab
                out.append(difference)
                continue
            fetched[ref] = mr
            key = MRKey(api.instance, *ref)
            row = ledger.get(conn, key)
            found_now = unlisted(mr, row, policy, period, decider_ids(conn, key, row))
            if found_now is not None:
                out.append(found_now)
    return out, fetched


def unlisted(
    mr: Mapping[str, Any],
    row: RowMapping | None,
    policy: LabelPolicy,
    period: Period,
    deciders: frozenset[tuple[str, int]] = frozenset(),
) -> Difference | None:
    """What an MR the ledger decided in the period is, when GitLab's labelled list left
    it out: ``different`` when GitLab disagrees (reopened, or decided otherwise: ``--fix``
    records its history); nothing when it agrees and its time falls just outside the
    period; ``unlabelled`` when it agrees and the MR carries no security label now
    (decided as recorded, the label removed since); otherwise ``extra``."""
    ref, url = (int(mr["project_id"]), int(mr["iid"])), p.text(mr, "web_url")
    changed = compare(mr, row, deciders)
    if changed is not None:
        return changed
    decision = decision_of(mr)
    if decision is not None and _beside_an_edge(decision[1], period):
        # GitLab's time has milliseconds, a webhook's whole seconds: 23:59:59.994 and
        # 00:00:00 fall either side of midnight. The MR agrees; no run could clear it.
        return None
    carried = policy.security_labels(p.label_titles(mr.get("labels")))
    if carried:
        # Still labelled yet not listed: the listing missed it for some other reason
        # (a label the scope's label list lacks, say). Calling it unlabelled would let
        # the run pass as complete with a gap nobody looked at.
        return Difference(*ref, "extra", url, {"security_labels": list(carried)})
    return Difference(*ref, "unlabelled", url)


def _beside_an_edge(moment: datetime | None, period: Period) -> bool:
    """Outside ``period``, within ``MATCH_TOLERANCE`` of one of its ends."""
    if moment is None or period.contains(moment):
        return False
    edges = [period.since] if period.until is None else [period.since, period.until]
    return any(abs(moment - edge) <= MATCH_TOLERANCE for edge in edges)


def _merge_request(api: GitLabAPI, ref: MRRef) -> dict[str, Any] | None:
    """One MR from GitLab, or None when GitLab answers 404."""
    try:
        return api.merge_request(*ref)
    except GitLabAPIError as exc:
        if exc.status != 404:
            raise
    return None


def fix(
    engine: Engine,
    api: GitLabAPI,
    policy: LabelPolicy,
    mrs: Iterable[dict[str, Any]],
    *,
    recording: Recording = DEFAULT_RECORDING,
    found_events: LabelEvents | None = None,
) -> int:
    """Record the API history of each MR, through the backfill path; how many MRs were
    read (an MR deleted since it was listed is passed over, as backfill does).
    ``found_events`` holds label events read already (``find_merge_requests``)."""
    count = 0
    for mr in mrs:
        ref = (int(mr["project_id"]), int(mr["iid"]))
        events = found_events.get(ref) if found_events else None
        try:
            envelopes = fetch_history(api, mr, policy, events)
        except GitLabAPIError as exc:
            if exc.status != 404 or not mr_gone(api, *ref):
                raise
            log.warning("reconcile_mr_gone", project_id=ref[0], mr_iid=ref[1])
            continue
        with engine.begin() as conn:
            record_envelopes(conn, api.instance, envelopes, policy, recording=recording)
        count += 1
    return count


def store(
    engine: Engine,
    instance: str,
    scopes: list[Scope],
    report: Report,
    *,
    label_history: bool = False,
) -> Report:
    """Keep the result as evidence; the report with its id and time. The scope says
    whether GitLab's population held the MRs found by their label history."""
    stored = [d.to_json() for d in report.differences]
    remaining = [d.to_json() for d in report.remaining]
    scope = ", ".join(str(s) for s in scopes) + (" (with label history)" if label_history else "")
    params = {
        "instance": instance,
        "scope": scope,
        "period_start": report.period.since,
        "period_end": report.period.until,
        "gitlab_count": report.gitlab_count,
        "ledger_count": report.ledger_count,
        "missing_count": report.count("missing"),
        "different_count": report.count("different"),
        "fixed_count": report.fixed,
        "differences": orjson.dumps({"found": stored, "after_fix": remaining}).decode(),
    }
    with engine.begin() as conn:
        row_id, checked_at = conn.execute(_STORE, params).one()
    return Report(**{**report.__dict__, "id": row_id, "checked_at": checked_at})


def reconcile(
    engine: Engine,
    api: GitLabAPI,
    policy: LabelPolicy,
    scopes: list[Scope],
    period: Period,
    *,
    apply_fix: bool = False,
    recording: Recording = DEFAULT_RECORDING,
    label_history: bool = False,
    workers: int = 1,
    progress: Progress | None = None,
) -> Report:
    """Compare, optionally fix, compare again, and store the result.

    With ``label_history``, GitLab's population also holds the MRs that carried a
    security label once and carry none now (``backfill.once_labelled``).
    """
    closed_period = Period(period.since, period.until or utcnow())
    found_events: LabelEvents = {}
    listed = find_merge_requests(
        api,
        scopes,
        policy,
        Period(closed_period.since),
        label_history=label_history,
        workers=workers,
        progress=progress,
        # Only MRs merged or closed in the period are in the population: the label
        # history of the others need not be read.
        wanted=lambda mr: decided_during(mr, closed_period),
        found_events=found_events,
    )
    gitlab = decided_in(listed, closed_period)
    projects = {pid for scope in scopes for pid in api.project_ids(scope)}
    found, ledger_count = differences(engine, api.instance, gitlab, closed_period, projects)
    found, fetched = look_up_extras(engine, api, policy, closed_period, found)
    known = {**fetched, **gitlab}
    fixed, remaining = 0, found
    fixable = ("missing", "different")
    to_fix = [known[(d.project_id, d.mr_iid)] for d in found if d.kind in fixable]
    if apply_fix and to_fix:
        fix(engine, api, policy, to_fix, recording=recording, found_events=found_events)
        remaining, _ = differences(engine, api.instance, gitlab, closed_period, projects)
        remaining, _ = look_up_extras(
            engine, api, policy, closed_period, remaining, fetched=fetched
        )
        # Fixed: re-read and no longer different (an MR re-read whose difference the
        # API's history cannot repair, a closed_by, say, is not).
        still = {(d.project_id, d.mr_iid) for d in remaining if d.kind in fixable}
        fixed = sum(1 for mr in to_fix if (int(mr["project_id"]), int(mr["iid"])) not in still)
    # Informational: decided as recorded, the label removed since (nothing to fix).
    remaining = [d for d in remaining if d.kind != "unlabelled"]
    report = Report(closed_period, len(gitlab), ledger_count, found, fixed, remaining)
    return store(engine, api.instance, scopes, report, label_history=label_history)
