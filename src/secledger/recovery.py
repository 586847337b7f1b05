"""Recovering, from GitLab's REST API, a merge request whose webhook delivery was lost.

When the receiver finds that it ignored a delivery it should have recorded, and no
longer has its body (``recheck``), GitLab's API still knows the MR's label, state and
approval events. With an API token configured, ``serve`` records them at once, by the
backfill path, in a thread of its own: the facts ``secledger backfill --label-history``
would record, without waiting for an operator. What the API does not keep (an approval
withdrawn: the approvals endpoint tells who approves now) cannot come back this way.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy import Engine

from secledger.backfill import fetch_history, record_envelopes
from secledger.config import Settings
from secledger.errors import GitLabAPIError
from secledger.extract import MRKey
from secledger.gitlab_api import GitLabAPI, about_existing_mr
from secledger.metrics import RecheckTally
from secledger.policy import LabelPolicy
from secledger.recentignored import Lost
from secledger.recheck import RECOVER_HINT
from secledger.service import DEFAULT_RECORDING, Recording

log = structlog.get_logger("secledger.recovery")

# At most this many MRs wait: more would mean GitLab's API is down or far too slow; each
# one turned away is reported lost, for `secledger backfill`.
MAX_WAITING = 1000
# How long shutdown waits for the MR in hand (the writer still has to drain after it).
CLOSE_SECONDS = 5.0
# GitLab answers 404 for an MR deleted, and for one in a project the token cannot read.
HIDDEN_HINT = (
    "GitLab's API does not show this MR: deleted, or in a project the token cannot read"
    " (then run secledger backfill --label-history for it with a token that can)"
)


def fetch(api: GitLabAPI, policy: LabelPolicy, key: MRKey) -> list[dict[str, Any]]:
    """What the API tells of one MR's history, as backfill envelopes."""
    mr = api.merge_request(key.project_id, key.mr_iid)
    with about_existing_mr():
        return fetch_history(api, mr, policy)


class Recoverer:
    """A daemon thread recording, from the API, the MRs of lost deliveries.

    Each MR ends with exactly one outcome, ``recovered`` or ``lost``: the thread claims
    the MR in hand before reporting it, once while GitLab is asked and once while the
    events are written, and a shutdown that stops waiting for it reports it only if it
    claims it first. A write that commits after shutdown reported it lost stays silent:
    backfill, which the report asks for, then finds it recorded.
    """

    def __init__(
        self,
        engine: Engine,
        api: GitLabAPI,
        policy: LabelPolicy,
        tally: RecheckTally,
        *,
        recording: Recording = DEFAULT_RECORDING,
    ) -> None:
        self.engine, self.api, self.policy, self.recording = engine, api, policy, recording
        self.tally = tally
        self._waiting: queue.Queue[Lost | None] = queue.Queue(MAX_WAITING)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._in_hand: Lost | None = None
        self._writing: Lost | None = None  # taken by the thread once GitLab has answered
        self._thread = threading.Thread(target=self._run, name="secledger-recover", daemon=True)

    def start(self) -> None:
        """Begin taking MRs."""
        self._thread.start()

    def recover(self, lost: Lost) -> str | None:
        """Queue the MR of ``lost`` (on the event loop, where ``close`` runs too): None
        once queued, else why not."""
        if lost.key.instance != self.api.instance:
            return f"the MR is on {lost.key.instance}; SECLEDGER_GITLAB_URL is {self.api.instance}"
        if self._stopping.is_set():
            return "the receiver is shutting down"
        try:
            self._waiting.put_nowait(lost)
        except queue.Full:
            return f"{MAX_WAITING} recoveries are already waiting for GitLab's API"
        return None

    def stopping(self) -> None:
        """Take no more MRs (``close`` then waits for the one in hand)."""
        self._stopping.set()
        # Wakes the thread if it waits for work; when full, it is busy, and sees the stop
        # before taking another.
        with contextlib.suppress(queue.Full):
            self._waiting.put_nowait(None)

    def close(self) -> None:
        """Stop, waiting a little for the MR in hand; each MR not recovered by then is
        reported lost."""
        self.stopping()
        if self._thread.is_alive():
            self._thread.join(timeout=CLOSE_SECONDS)
        while True:
            try:
                lost = self._waiting.get_nowait()
            except queue.Empty:
                break
            if lost is not None:
                self._lost(lost, "the receiver shut down before GitLab's API was asked")
        cut_off = self._claim()
        if cut_off is not None:
            self._lost(cut_off, "the receiver shut down while GitLab's API was being asked")
        # A write that outlasted the wait (a chain lock held elsewhere, a slow database)
        # ends with the process, most likely rolled back: said now, or never.
        unfinished = self._claim_writing()
        if unfinished is not None:
            self._lost(unfinished, "the receiver shut down while the MR's events were written")

    def _run(self) -> None:
        while not self._stopping.is_set():
            lost = self._waiting.get()
            if lost is None:
                return
            with self._lock:
                self._in_hand = lost
            self._recover(lost)

    def _claim(self) -> Lost | None:
        """The MR in hand, now this caller's to end, or None when another caller has it."""
        with self._lock:
            lost, self._in_hand = self._in_hand, None
        return lost

    def _claim_writing(self) -> Lost | None:
        """``_claim`` for the MR whose events are being written."""
        with self._lock:
            lost, self._writing = self._writing, None
        return lost

    def _recover(self, lost: Lost) -> None:
        try:
            envelopes = fetch(self.api, self.policy, lost.key)
        except GitLabAPIError as exc:  # in GitLab's own words
            if self._claim() is not None:
                self._lost(lost, str(exc), hidden=exc.gone)
            return
        except Exception as exc:  # noqa: BLE001 - a background thread must not end: lost
            if self._claim() is not None:
                self._lost(lost, type(exc).__name__)
            return
        with self._lock:
            if self._in_hand is None:  # shutdown stopped waiting, and reported it
                return
            self._in_hand, self._writing = None, lost
        try:
            with self.engine.begin() as conn:
                facts = record_envelopes(
                    conn, self.api.instance, envelopes, self.policy, recording=self.recording
                )
        except Exception as exc:  # noqa: BLE001 - a background thread must not end: lost
            if self._claim_writing() is not None:
                self._lost(lost, type(exc).__name__)
            return
        if self._claim_writing() is None:
            # Shutdown gave up waiting and reported it lost; the write went through after
            # all. Backfill, which the report asks for, finds it recorded: one outcome.
            return
        self.tally.note("recovered")
        # Nothing new: the MR's API history was known already, and what was lost, if it
        # mattered to the ledger, is not in the API (a withdrawn approval, say).
        log.warning("ignored_delivery_recovered", new_facts=facts, **lost.fields())

    def _lost(self, lost: Lost, error: str, *, hidden: bool = False) -> None:
        self.tally.note("lost")
        hint = HIDDEN_HINT if hidden else RECOVER_HINT
        log.error("ignored_delivery_lost", error=error, hint=hint, **lost.fields())


def why_off(settings: Settings) -> str | None:
    """Why ``serve`` recovers nothing from the API, or None when it does."""
    if not settings.recover_lost_deliveries:
        return "SECLEDGER_RECOVER_LOST_DELIVERIES is false"
    if not settings.gitlab_url:
        return "SECLEDGER_GITLAB_URL is not set"
    if not settings.gitlab_api_set:
        return "no GitLab API token is configured"
    return None


def off(settings: Settings) -> Callable[[Lost], str | None]:
    """``Runtime.recover`` when no ``Recoverer`` runs: it says why."""
    reason = why_off(settings) or "recovery is not running"
    return lambda _lost: reason


def start(settings: Settings, engine: Engine, tally: RecheckTally) -> Recoverer | None:
    """A running ``Recoverer``, unless ``why_off`` says why not (then None)."""
    if why_off(settings) is not None:
        return None
    recoverer = Recoverer(
        engine,
        GitLabAPI.from_settings(settings),
        LabelPolicy.from_settings(settings),
        tally,
        recording=Recording.from_settings(settings),
    )
    recoverer.start()
    log.info("recovery_started", instance=recoverer.api.instance)
    return recoverer
