"""Backfill: record the history of security merge requests from the GitLab REST API.

Every fact goes through :func:`secledger.service.record` like a webhook delivery,
keyed by the fact's own identity, so a second run, or a run after the webhooks,
adds nothing. Each merge request is recorded in one transaction together with its
cursor row, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

import structlog
from sqlalchemy import Connection, Engine, text

from secledger import apifacts, findings
from secledger.errors import GitLabAPIError
from secledger.extract import MRKey
from secledger.gitlab_api import GitLabAPI, Scope
from secledger.policy import LabelPolicy
from secledger.service import DEFAULT_RECORDING, Recording, record
from secledger.store import ledger
from secledger.store.log import Chain
from secledger.times import isoformat, parse_optional, utcnow

log = structlog.get_logger("secledger.backfill")

MRRef = tuple[int, int]  # (project_id, iid)
LabelEvents = dict[MRRef, list[dict[str, Any]]]
Done = dict[MRRef, datetime | None]  # MRs a run recorded, with updated_at as then listed

_START = text(
    "INSERT INTO backfill_runs (run_key, instance, scope, since, until)"
    " VALUES (:run_key, :instance, :scope, :since, :until) ON CONFLICT (run_key) DO NOTHING"
)
_FINISHED = text("SELECT finished_at FROM backfill_runs WHERE run_key = :run_key")
_RESTART = text(
    "UPDATE backfill_runs SET finished_at = NULL, started_at = now(), mr_count = 0,"
    " fact_count = 0 WHERE run_key = :run_key"
)
_FORGET = text("DELETE FROM backfill_cursor WHERE run_key = :run_key")
_DONE = text(
    "SELECT project_id, mr_iid, mr_updated_at FROM backfill_cursor WHERE run_key = :run_key"
)
# Replaced, not updated: the application role may delete here but not update (0015).
_UNMARK = text(
    "DELETE FROM backfill_cursor WHERE run_key = :run_key AND project_id = :pid AND mr_iid = :iid"
)
_MARK = text(
    "INSERT INTO backfill_cursor (run_key, project_id, mr_iid, mr_updated_at)"
    " VALUES (:run_key, :pid, :iid, :updated_at)"
)
_COUNT = text(
    "UPDATE backfill_runs SET mr_count = mr_count + 1, fact_count = fact_count + :facts"
    " WHERE run_key = :run_key"
)
_FINISH = text("UPDATE backfill_runs SET finished_at = now() WHERE run_key = :run_key")


@dataclass(frozen=True)
class Period:
    """``[since, until)``; an open end means up to now."""

    since: datetime
    until: datetime | None = None

    def contains(self, moment: datetime | None) -> bool:
        """True when ``moment`` falls in the period."""
        if moment is None or moment < self.since:
            return False
        return self.until is None or moment < self.until


class Progress(Protocol):
    """Where a backfill reports how far it got (a rich progress bar in the CLI)."""

    def start(self, total: int, what: str = "merge requests") -> None:
        """``total`` of ``what`` are to be read (a new phase starts from zero)."""

    def advance(self) -> None:
        """One more merge request was read."""


@dataclass(frozen=True)
class Result:
    """What one backfill did."""

    found: int
    skipped: int
    recorded_mrs: int
    recorded_facts: int
    gone: int = 0  # deleted between the listing and the reading of their history


def security_labels(api: GitLabAPI, scope: Scope, policy: LabelPolicy) -> list[str]:
    """The scope's label names that are security labels (the MR filter has no wildcard)."""
    names = {str(label.get("name")) for label in api.labels(scope)}
    return sorted(name for name in names if policy.is_security_label(name))


def find_merge_requests(
    api: GitLabAPI,
    scopes: Iterable[Scope],
    policy: LabelPolicy,
    period: Period,
    *,
    label_history: bool = False,
    workers: int = 1,
    progress: Progress | None = None,
    wanted: Callable[[dict[str, Any]], bool] | None = None,
    found_events: LabelEvents | None = None,
    open_too: bool = False,
) -> dict[MRRef, dict[str, Any]]:
    """Every MR that carries a security label and may have been active in the period
    (``GitLabAPI.merge_requests``), once each; with ``open_too``, also every open one
    (an MR only approved in the period was not updated in it); with ``label_history``,
    also every one that carried one once (see ``once_labelled``, to which ``progress``,
    ``wanted`` and ``found_events`` are passed)."""
    scopes = list(scopes)
    found: dict[MRRef, dict[str, Any]] = {}
    for scope in scopes:
        for label in security_labels(api, scope, policy):
            for mr in api.merge_requests(scope, label, period.since, period.until):
                found.setdefault(_ref(mr), mr)
            if open_too:
                listed = api.merge_requests(
                    scope, label, period.since, period.until, open_only=True
                )
                for mr in listed:
                    found.setdefault(_ref(mr), mr)
    if label_history:
        found |= once_labelled(
            api,
            scopes,
            policy,
            period,
            set(found),
            workers=workers,
            progress=progress,
            wanted=wanted,
            found_events=found_events,
        )
    return found


def once_labelled(
    api: GitLabAPI,
    scopes: Iterable[Scope],
    policy: LabelPolicy,
    period: Period,
    listed: set[MRRef],
    *,
    workers: int = 1,
    progress: Progress | None = None,
    wanted: Callable[[dict[str, Any]], bool] | None = None,
    found_events: LabelEvents | None = None,
) -> dict[MRRef, dict[str, Any]]:
    """MRs that may have been active in the period, not in ``listed``, whose label events
    show a security label added at some time: GitLab's label filter matches the labels
    an MR carries now, so an MR whose security label was removed is found only this
    way. Every MR of the scopes is listed and the label events of each one ``wanted``
    accepts (all, by default) are read: one request per MR. An MR deleted meanwhile
    (404) is skipped. The label events of each MR found are put in ``found_events``,
    for ``fetch_history``."""
    candidates: dict[MRRef, dict[str, Any]] = {}
    for scope in scopes:
        for mr in api.merge_requests(scope, None, period.since, period.until):
            if _ref(mr) not in listed and (wanted is None or wanted(mr)):
                candidates.setdefault(_ref(mr), mr)
    refs = sorted(candidates)
    if progress:
        progress.start(len(refs), "label histories")
    once: dict[MRRef, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        histories = pool.map(lambda ref: _label_events(api, ref), refs)
        for ref, events in zip(refs, histories, strict=True):
            if any(_adds_security(event, policy) for event in events):
                once[ref] = candidates[ref]
                if found_events is not None:
                    found_events[ref] = events
            if progress:
                progress.advance()
    return once


def _label_events(api: GitLabAPI, ref: MRRef) -> list[dict[str, Any]]:
    try:
        return api.label_events(*ref)
    except GitLabAPIError as exc:
        if exc.status != 404 or not mr_gone(api, *ref):
            raise
    return []


def mr_gone(api: GitLabAPI, project_id: int, iid: int) -> bool:
    """True when the MR itself answers 404. A sub-resource's 404 does not prove it
    deleted: resource_state_events exists from GitLab 13.2, an approvals endpoint may
    be missing, a proxy may answer 404; taken as deleted, every MR would be passed
    over and the run marked finished. Any other error of this request propagates."""
    try:
        api.merge_request(project_id, iid)
    except GitLabAPIError as exc:
        if exc.status != 404:
            raise
        return True
    return False


def _adds_security(event: dict[str, Any], policy: LabelPolicy) -> bool:
    name = apifacts.label_name(event)
    return event.get("action") == "add" and name is not None and policy.is_security_label(name)


def _ref(mr: dict[str, Any]) -> MRRef:
    return int(mr["project_id"]), int(mr["iid"])


def fetch_history(
    api: GitLabAPI,
    mr: dict[str, Any],
    policy: LabelPolicy,
    label_events: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The envelopes of every API fact about one merge request; ``label_events``, when
    they were read already (``once_labelled``), are not asked for again."""
    pid, iid = int(mr["project_id"]), int(mr["iid"])
    if label_events is None:
        label_events = api.label_events(pid, iid)
    envelopes = apifacts.label_envelopes(mr, label_events, policy)
    envelopes += apifacts.state_envelopes(mr, api.state_events(pid, iid))
    envelopes += apifacts.approval_envelopes(mr, api.approvals(pid, iid))
    return envelopes


def record_envelopes(
    conn: Connection,
    instance: str,
    envelopes: Iterable[dict[str, Any]],
    policy: LabelPolicy,
    *,
    recording: Recording = DEFAULT_RECORDING,
) -> int:
    """Record API facts in the caller's transaction; how many were new.

    ``recording`` carries the findings policy and the sink flag, as the receiver's does.
    """
    chain = Chain.open(conn)
    received_at = utcnow()
    recorded = 0
    # One MR's facts come grouped by kind (labels, then states, then approvals), not in
    # time order: judged after each, a merge recorded before its approvals left an
    # insufficient-approvals finding behind, resolved an instant later. Each touched MR
    # is judged once, on all of its events, as a webhook batch judges it.
    quiet = replace(recording, assess=False)
    touched: set[MRKey] = set()
    for envelope in envelopes:
        env = _placed(conn, instance, envelope)
        if env is None:
            continue  # an approval already logged as the API told it before
        delivery = apifacts.delivery(instance, env, received_at)
        facts = apifacts.facts(instance, env, policy)
        outcome = record(conn, chain, delivery, facts, recording=quiet)
        if outcome.status == "recorded":
            recorded += 1
            touched.add(facts.key)
    now = utcnow()
    for key in sorted(touched):
        row = ledger.get(conn, key)
        if row is not None:
            findings.evaluate_mr(conn, row, recording.compliance, now, as_of=row["last_event_at"])
    return recorded


def _placed(conn: Connection, instance: str, env: dict[str, Any]) -> dict[str, Any] | None:
    """``env``, an undated approval marked with the revocation it follows, if any; None
    when an undated approval of that user already follows that revocation in the log,
    with no other revocation of theirs between (``ledger.undated_standing``), and for a
    dated approval when such an undated one, placed at or after its time, told it.

    Without a time, one user's approvals differ only by the revocations between them,
    taken in the fold's order (event time, then seq) up to this approval's bound, not in
    the order they were logged: a revocation whose webhook came late can fall before an
    API approval logged earlier, which is then the approval that followed it.
    """
    key = MRKey(instance, int(env["mr"]["project_id"]), int(env["mr"]["iid"]))
    dated = apifacts.dated_approval(env)
    user_id = apifacts.approver_id(env)
    if dated is not None:
        # GitLab began giving approval times (an upgrade): the approval an older one gave
        # without a time, logged already, is this one, under a key of its own.
        _, told = ledger.undated_standing(conn, key, *dated, dated=True, actor_id=user_id)
        return None if told else env
    approver = apifacts.undated_approver(env)
    bound = parse_optional(env.get("upper_bound"))
    if approver is None or bound is None:
        return env
    revoked, told = ledger.undated_standing(conn, key, approver, bound, actor_id=user_id)
    if told:
        return None
    return apifacts.after_revocation(env, revoked)


def run_key(instance: str, scopes: Iterable[Scope], period: Period) -> str:
    """The identity of a backfill: same scope and period resume the same run."""
    parts = [instance, *sorted(str(s) for s in scopes)]
    parts += [isoformat(period.since) or "", isoformat(period.until) or ""]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def open_run(engine: Engine, key: str, instance: str, scope: str, period: Period) -> Done:
    """Start or resume a run; the MRs a resumed run already recorded."""
    with engine.begin() as conn:
        params = {"run_key": key, "instance": instance, "scope": scope}
        conn.execute(_START, params | {"since": period.since, "until": period.until})
        if conn.execute(_FINISHED, {"run_key": key}).scalar() is not None:
            # A finished run is started afresh: new facts may have happened since.
            conn.execute(_FORGET, {"run_key": key})
            conn.execute(_RESTART, {"run_key": key})
        rows = conn.execute(_DONE, {"run_key": key})
        return {(int(pid), int(iid)): updated for pid, iid, updated in rows}


def is_done(done: Done, mr: dict[str, Any]) -> bool:
    """True when the run recorded ``mr`` and GitLab lists it unchanged since: an MR
    updated since (merged, relabelled) may have new facts, and one recorded before its
    time was kept (NULL, before migration 0015) is read again. So is an open one: an
    approval or its revocation does not move ``updated_at``."""
    if _ref(mr) not in done or mr.get("state") == "opened":
        return False
    recorded, listed = done[_ref(mr)], parse_optional(mr.get("updated_at"))
    return recorded is not None and listed is not None and listed <= recorded


class Backfill:
    """One backfill of some projects or groups over one period."""

    def __init__(
        self,
        engine: Engine,
        api: GitLabAPI,
        policy: LabelPolicy,
        scopes: list[Scope],
        period: Period,
        *,
        workers: int = 4,
        recording: Recording = DEFAULT_RECORDING,
        label_history: bool = False,
    ) -> None:
        self.engine, self.api, self.policy = engine, api, policy
        self.recording, self.label_history = recording, label_history
        self.scopes, self.period, self.workers = scopes, period, workers
        self.key = run_key(api.instance, scopes, period)
        self._found_events: LabelEvents = {}  # read while planning, by MR

    def plan(self, progress: Progress | None = None) -> tuple[list[dict[str, Any]], int]:
        """MRs still to record, and how many a resumed run skips (``progress``: the
        label histories read, with ``label_history``)."""
        scope_text = ", ".join(str(s) for s in self.scopes)
        done = open_run(self.engine, self.key, self.api.instance, scope_text, self.period)
        passed_over: set[MRRef] = set()

        def wanted(mr: dict[str, Any]) -> bool:  # recorded by the interrupted run: no need
            if is_done(done, mr):
                passed_over.add(_ref(mr))
                return False
            return True

        found = find_merge_requests(
            self.api,
            self.scopes,
            self.policy,
            self.period,
            label_history=self.label_history,
            workers=self.workers,
            progress=progress,
            wanted=wanted,
            found_events=self._found_events,
            open_too=True,
        )
        todo = [mr for mr in found.values() if not is_done(done, mr)]
        skipped = {ref for ref, mr in found.items() if is_done(done, mr)} | passed_over
        return todo, len(skipped)

    def record_one(self, mr: dict[str, Any], envelopes: list[dict[str, Any]]) -> int:
        """Record one MR's facts and its cursor row in one transaction.

        The cursor keeps ``updated_at`` as the plan listed it, not as the history read
        later may show it: a change made between the two is read again on resume.
        """
        with self.engine.begin() as conn:
            recorded = record_envelopes(
                conn, self.api.instance, envelopes, self.policy, recording=self.recording
            )
            params = {"run_key": self.key, "pid": int(mr["project_id"]), "iid": int(mr["iid"])}
            conn.execute(_UNMARK, params)
            conn.execute(_MARK, params | {"updated_at": parse_optional(mr.get("updated_at"))})
            conn.execute(_COUNT, {"run_key": self.key, "facts": recorded})
        return recorded

    def histories(
        self, mrs: list[dict[str, Any]]
    ) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]] | None]]:
        """Fetch histories concurrently (the API is the slow part), yielded in order;
        None for an MR deleted since it was listed."""
        events = [self._found_events.pop(_ref(mr), None) for mr in mrs]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            fetched = pool.map(self._history, mrs, events)
            yield from zip(mrs, fetched, strict=True)

    def _history(
        self, mr: dict[str, Any], label_events: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]] | None:
        try:
            return fetch_history(self.api, mr, self.policy, label_events)
        except GitLabAPIError as exc:
            # Deleted while the run went on: nothing left to read, and one MR must not
            # end a run of thousands. Not marked done; a rerun no longer lists it.
            if exc.status != 404 or not mr_gone(self.api, int(mr["project_id"]), int(mr["iid"])):
                raise
        log.warning("backfill_mr_gone", project_id=mr.get("project_id"), mr_iid=mr.get("iid"))
        return None

    def run(self, progress: Progress | None = None) -> Result:
        """Plan, then record every merge request still to do."""
        todo, skipped = self.plan(progress)
        if progress:
            progress.start(len(todo))
        facts = gone = 0
        for mr, envelopes in self.histories(todo):
            if envelopes is None:
                gone += 1
            else:
                facts += self.record_one(mr, envelopes)
            if progress:
                progress.advance()
        with self.engine.begin() as conn:
            conn.execute(_FINISH, {"run_key": self.key})
        return Result(len(todo) + skipped, skipped, len(todo) - gone, facts, gone)
