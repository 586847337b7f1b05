"""Label-time enrichment: when no webhook showed a security label being added, ask the API.

A ledger row whose ``labeled_at_source`` is ``created_at_fallback`` only knows when
the MR was created. GitLab's ``resource_label_events`` know when the first security
label was added and by whom; that event is recorded as an ``api`` log entry (the same
entry backfill would write for it), with the MR's state events up to it (whether it was
already merged or closed then decides whether its SLA clock ever ran), and the fold then
reports ``labeled_at_source = "api"``. Runs from ``secledger enrich`` and in the
background of ``serve``, never on the request path.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

import structlog
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from secledger import apifacts, earlyapprovals
from secledger.backfill import record_envelopes
from secledger.config import Settings
from secledger.errors import GitLabAPIError
from secledger.extract import MRKey
from secledger.gitlab_api import GitLabAPI, about_existing_mr
from secledger.policy import LabelPolicy
from secledger.service import DEFAULT_RECORDING, Recording

log = structlog.get_logger("secledger.enrich")

FALLBACK = "created_at_fallback"
API_ERROR = "api_error"
# Anything else went wrong with this MR (a time GitLab wrote oddly, a database error):
# not asked again unless --recheck.
FAILED = "failed"
# Counted apart from api_error (noted as api_error all the same): the MR was deleted or
# is out of the token's reach, which no later pass mends unless someone grants access.
GONE = "gone"
# Not asked yet first, then those the API refused, longest ago first: MRs it keeps
# refusing (deleted, out of the token's reach) must not hold up the rest for good.
_CANDIDATES = text(
    "SELECT l.project_id, l.mr_iid FROM security_review_ledger l"
    " LEFT JOIN enrichment_checks c"
    "  ON c.instance = l.instance AND c.project_id = l.project_id AND c.mr_iid = l.mr_iid"
    " WHERE l.instance = :instance AND l.labeled_at_source = :fallback"
    " AND (:recheck OR c.outcome IS NULL OR c.outcome = :api_error)"
    " ORDER BY c.checked_at NULLS FIRST, l.last_event_at LIMIT :limit"
)
_CHECKED = text(
    "INSERT INTO enrichment_checks (instance, project_id, mr_iid, outcome)"
    " VALUES (:instance, :project_id, :mr_iid, :outcome)"
    " ON CONFLICT (instance, project_id, mr_iid)"
    " DO UPDATE SET outcome = excluded.outcome, checked_at = now()"
)


def candidates(engine: Engine, instance: str, *, limit: int, recheck: bool) -> list[MRKey]:
    """Ledger rows of ``instance`` still on the created_at fallback (not yet asked, unless
    ``recheck``)."""
    params = {"instance": instance, "fallback": FALLBACK, "recheck": recheck, "limit": limit}
    params["api_error"] = API_ERROR
    with engine.connect() as conn:
        return [MRKey(instance, pid, iid) for pid, iid in conn.execute(_CANDIDATES, params)]


def enrich_one(
    engine: Engine,
    api: GitLabAPI,
    policy: LabelPolicy,
    key: MRKey,
    *,
    recording: Recording = DEFAULT_RECORDING,
) -> str:
    """Look up one MR's first security-label add and record it; the outcome."""
    mr = api.merge_request(key.project_id, key.mr_iid)
    with about_existing_mr():
        events = api.label_events(key.project_id, key.mr_iid)
    first = apifacts.first_security_add(events, policy)
    envelopes = [
        env
        for env in apifacts.label_envelopes(mr, events, policy)
        if first is not None and env["event"].get("id") == first.get("id")
    ]
    if envelopes and first is not None:
        # Whether the MR was already merged or closed when labelled decides whether its
        # SLA clock ever ran; an API label event carries no state, its state events do.
        added = apifacts.event_time(first)
        with about_existing_mr():
            states = api.state_events(key.project_id, key.mr_iid)
        envelopes += [
            env
            for env in apifacts.state_envelopes(mr, states)
            if apifacts.event_time(env["event"]) <= added
        ]
    with engine.begin() as conn:
        recorded = (
            record_envelopes(conn, api.instance, envelopes, policy, recording=recording)
            if envelopes
            else 0
        )
        outcome = "no_label_event" if not envelopes else "recorded" if recorded else "known"
        _note_in(conn, key, outcome)
    return outcome


def _note(engine: Engine, key: MRKey, outcome: str) -> None:
    with engine.begin() as conn:
        _note_in(conn, key, outcome)


def _note_in(conn: Connection, key: MRKey, outcome: str) -> None:
    params = {"instance": key.instance, "project_id": key.project_id, "mr_iid": key.mr_iid}
    conn.execute(_CHECKED, params | {"outcome": outcome})


@dataclass(frozen=True)
class EnrichResult:
    """How many MRs were looked up, by outcome."""

    outcomes: dict[str, int]

    @property
    def total(self) -> int:
        """Every MR looked up."""
        return sum(self.outcomes.values())


def enrich(
    engine: Engine,
    api: GitLabAPI,
    policy: LabelPolicy,
    *,
    limit: int = 500,
    recheck: bool = False,
    recording: Recording = DEFAULT_RECORDING,
) -> EnrichResult:
    """Enrich every candidate, up to ``limit``; an API error on one MR does not stop the rest."""
    counts: Counter[str] = Counter()
    for key in candidates(engine, api.instance, limit=limit, recheck=recheck):
        stop = False
        try:
            outcome = enrich_one(engine, api, policy, key, recording=recording)
        except Exception as exc:  # noqa: BLE001 - one MR must not stop (or starve) the rest
            api_error = isinstance(exc, GitLabAPIError)
            log.warning(
                "enrich_failed",
                project_id=key.project_id,
                mr_iid=key.mr_iid,
                error=str(exc)[:300] if api_error else type(exc).__name__,
            )
            # Noted, so that a pass does not meet it first every time: an API error is
            # asked again on later passes (behind the MRs never asked), anything else
            # only with --recheck (as the early-approvals check does), or every cron
            # run would fail on it.
            # A database error may pass (a deadlock, a failover): asked again, as GitLab's.
            retry = api_error or isinstance(exc, SQLAlchemyError)
            _note(engine, key, API_ERROR if retry else FAILED)
            outcome = API_ERROR if api_error else FAILED
            if isinstance(exc, GitLabAPIError):
                outcome = GONE if exc.gone else API_ERROR
                # Each of the others would wait out the same retries (with GitLab down,
                # a pass of 500 took more than a day).
                stop = exc.systemic
        counts[outcome] += 1
        if stop:
            log.warning("enrich_stopped", hint=earlyapprovals.STOPPED_HINT)
            break
    return EnrichResult(dict(counts))


class Enricher:
    """A daemon thread that enriches every ``interval`` seconds while ``serve`` runs."""

    def __init__(
        self,
        engine: Engine,
        api: GitLabAPI,
        policy: LabelPolicy,
        interval: float,
        *,
        recording: Recording = DEFAULT_RECORDING,
    ) -> None:
        self.engine, self.api, self.policy, self.interval = engine, api, policy, interval
        self.recording = recording
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="secledger-enrich", daemon=True)

    def start(self) -> None:
        """Begin enriching in the background."""
        self._thread.start()

    def stopping(self) -> None:
        """Start no other pass (``close`` then waits for the current one)."""
        self._stop.set()

    def close(self) -> None:
        """Stop after the current pass."""
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                result = enrich(self.engine, self.api, self.policy, recording=self.recording)
            except Exception as exc:  # noqa: BLE001 - a background pass must not end the loop
                log.warning("enrich_pass_failed", error=type(exc).__name__)
            else:
                if result.total:
                    log.info("enrich_pass", **result.outcomes)
            try:
                early = earlyapprovals.check(
                    self.engine, self.api, self.policy, recording=self.recording
                )
            except Exception as exc:  # noqa: BLE001 - a background pass must not end the loop
                log.warning("early_approvals_pass_failed", error=type(exc).__name__)
            else:
                if early:
                    log.info("early_approvals_pass", **early)


def would_start(settings: Settings) -> bool:
    """Whether ``serve`` enriches in the background: a GitLab token and an interval set."""
    return settings.enrich_interval_seconds > 0 and settings.gitlab_api_set


def start_background(settings: Settings, engine: Engine) -> Enricher | None:
    """Start enrichment for ``serve`` when a GitLab URL and token are configured."""
    if not would_start(settings):
        return None
    api = GitLabAPI.from_settings(settings)
    enricher = Enricher(
        engine,
        api,
        LabelPolicy.from_settings(settings),
        settings.enrich_interval_seconds,
        recording=Recording.from_settings(settings),
    )
    enricher.start()
    log.info("enrich_started", interval=settings.enrich_interval_seconds, instance=api.instance)
    return enricher
