"""Copies of one decision in ``review_events``, and which one counts: the fold's rules in SQL.

One decision can be logged more than once: told by a webhook and again by the GitLab API
(backfill, ``reconcile --fix``, enrichment), or delivered by a project hook and again by
a system hook. The ledger fold counts it once: ``projection.merge_sources`` drops an API
fact a webhook event tells, then ``projection.distinct_facts`` keeps the first of the
events that repeat one another. :data:`COUNTED` says the same of a decision event ``e``,
so the ``bi_decisions`` view (migration 0013 holds a copy of the text; a test keeps the
two equal) counts the events the ledger row was folded from; the reviewers report
counts the same, read as groups (:func:`counted_groups`).
"""

from __future__ import annotations

from secledger.extract import APPROVALS_RESET
from secledger.intake import API_SOURCE
from secledger.projection import MATCH_TOLERANCE, SAVED_TIMES, UNDATED_APPROVAL

_WINDOW = f"interval '{MATCH_TOLERANCE.total_seconds():g} seconds'"


def _from_api(alias: str) -> str:
    return f'{alias}.facts @> \'{{"source": "{API_SOURCE}"}}\''


def api_twin(alias: str) -> str:
    """SQL: the decision event ``alias`` is an API fact that a webhook (or replayed) event
    of its MR already tells, as ``projection.merge_sources`` decides for a decision.

    The same decision, by the same user when both name one, at event times at most
    ``MATCH_TOLERANCE`` apart; an undated API approval matches an earlier one that its
    user has not revoked by the API fact's time (``_revoked``), and so does a dated one
    an earlier webhook approval dated by the MR's last save (``early``). The source
    test comes first, so a webhook event costs no index probe; the time windows are
    read within the MR's rows of ``review_events_mr``.
    """
    x = alias
    undated = _undated(x)
    early = _early(x)
    return (
        f"({_from_api(x)} AND EXISTS (SELECT 1"
        " FROM review_events w"
        f" WHERE w.instance = {x}.instance AND w.project_id = {x}.project_id"
        f" AND w.mr_iid = {x}.mr_iid"
        f" AND (w.event_at BETWEEN CASE WHEN {undated} THEN '-infinity'"
        f" ELSE {x}.event_at - {_WINDOW} END"
        f" AND CASE WHEN {undated} THEN {x}.event_at ELSE {x}.event_at + {_WINDOW} END"
        f" OR {early})"
        f" AND w.decision = {x}.decision"
        f" AND {same_user('w', x)} IS NOT FALSE"
        f" AND NOT {_from_api('w')}"
        f" AND NOT ({undated} AND {_repeat_w()})"
        f" AND NOT (({undated} OR {early}) AND {_revoked(x)})))"
    )


def _saved(alias: str) -> str:
    return (
        "("
        + " OR ".join(
            f'{alias}.facts @> \'{{"event_at_source": "{name}"}}\'' for name in SAVED_TIMES
        )
        + ")"
    )


def _early(x: str) -> str:
    """SQL: ``projection._told_early`` and ``_early_twin`` (but the standing check,
    ``_revoked``): ``w``, an approval a webhook dated by the MR's last save more than the
    window before the API's time, by the same named user, not a repeat of an earlier
    event at its time (``REPEATED``'s rule), with no save between the two times."""
    return (
        f"(NOT {_undated(x)} AND w.decision = 'approved' AND {_saved('w')}"
        f" AND w.event_at < {x}.event_at - {_WINDOW}"
        f" AND {same_user('w', x)} IS TRUE AND NOT {_repeat_w()}"
        " AND NOT EXISTS (SELECT 1 FROM review_events s2"
        f" WHERE {_same_mr('s2')} AND s2.event_at > w.event_at"
        f" AND s2.event_at < {x}.event_at - {_WINDOW} AND {_saved('s2')}))"
    )


def _same_mr(alias: str) -> str:
    return f"{alias}.instance = w.instance AND {alias}.project_id = w.project_id" + (
        f" AND {alias}.mr_iid = w.mr_iid"
    )


def _repeat_w() -> str:
    """SQL: ``projection._repeat`` of ``w``: it repeats an earlier event at its time
    (``REPEATED``'s rule), and the fold counts that one instead."""
    return (
        "EXISTS (SELECT 1 FROM review_events t2"
        f" WHERE {_same_mr('t2')} AND t2.event_at = w.event_at AND t2.seq < w.seq"
        " AND t2.kind = w.kind AND t2.decision = w.decision"
        f" AND t2.actor IS NOT DISTINCT FROM w.actor AND NOT {_from_api('t2')})"
    )


def _undated(x: str) -> str:
    return f'{x}.facts @> \'{{"event_at_source": "{UNDATED_APPROVAL}"}}\''


def _id_of(alias: str) -> str:
    user = f"{alias}.facts -> 'actor_id'"
    return f"(CASE WHEN jsonb_typeof({user}) = 'number' THEN {user} END)"


def same_user(a: str, b: str) -> str:
    """SQL: ``projection.same_user`` of events ``a`` and ``b``: by user id when both carry
    one (names change), else by username; NULL when either names nobody."""
    id_a, id_b = _id_of(a), _id_of(b)
    return (
        f"(CASE WHEN {id_a} IS NOT NULL AND {id_b} IS NOT NULL THEN {id_a} = {id_b}"
        f" WHEN nullif({a}.actor, '') IS NULL OR nullif({b}.actor, '') IS NULL THEN NULL"
        f" ELSE {a}.actor = {b}.actor END)"
    )


def _revoked(x: str) -> str:
    # ``projection._standing``: the approval ``w`` is revoked, after it in event-time order
    # (then log seq) and by the API fact ``x``'s time, by its user (or the API fact's, when
    # ``w`` names none; ``same_user``), or a push reset approvals then.
    return (
        "EXISTS (SELECT 1 FROM review_events r"
        " WHERE r.instance = w.instance AND r.project_id = w.project_id"
        f" AND r.mr_iid = w.mr_iid AND r.event_at BETWEEN w.event_at AND {x}.event_at"
        " AND (r.event_at, r.seq) > (w.event_at, w.seq)"
        f" AND (r.kind = '{APPROVALS_RESET}' OR r.decision = 'unapproved'"
        f" AND CASE WHEN nullif(w.actor, '') IS NOT NULL OR {_id_of('w')} IS NOT NULL"
        f" THEN {same_user('r', 'w')} ELSE {same_user('r', x)} END)"
        f" AND NOT {_from_api('r')})"
    )


# An earlier event of the MR that tells the same decision (``projection.fact_identity``)
# and is not itself an API twin. Without that last test, an API copy logged first at the
# webhook's very second would hide the webhook, and be dropped for it: neither counting.
REPEATED = (
    "EXISTS (SELECT 1 FROM review_events t"
    " WHERE t.instance = e.instance AND t.project_id = e.project_id AND t.mr_iid = e.mr_iid"
    " AND t.event_at = e.event_at AND t.seq < e.seq AND t.kind = e.kind"
    " AND t.decision = e.decision AND t.actor IS NOT DISTINCT FROM e.actor"
    f" AND NOT {api_twin('t')})"
)

# The decision event ``e`` counts: it is the copy the ledger fold keeps.
COUNTED = f"NOT {api_twin('e')} AND NOT {REPEATED}"

# What tells decision events apart in the fold: events alike in all of these repeat one
# another (``REPEATED``). The order of migration 0017's two indexes.
GROUP = ("instance", "project_id", "mr_iid", "event_at", "kind", "decision", "actor")


def counted_groups(where: str) -> str:
    """SQL: one row of ``GROUP``'s columns per counted decision that has an actor, among
    the decision events ``e`` that pass ``where`` (a condition on those columns only).

    The events ``COUNTED`` keeps, read as a set: within one group, the first event that
    is not an API twin counts and the others repeat it, so a group holds exactly one
    counted event when it holds any event that is not an API twin, and none otherwise.
    A report that reads no column outside the group then needs no probe per event:
    webhook events (never API twins) come from an index-only scan of migration 0017's
    ``review_events_webhook_decisions`` and the API ones from its small twin, both in
    group order, which PostgreSQL merges and rids of repeats without sorting.
    """
    columns = ", ".join(f"e.{name}" for name in GROUP)
    decided = "e.decision IS NOT NULL AND e.actor IS NOT NULL"
    return (
        f"SELECT {columns} FROM review_events e"
        f" WHERE {decided} AND NOT {_from_api('e')} AND {where}"
        f" UNION SELECT {columns} FROM review_events e"
        f" WHERE {decided} AND {_from_api('e')} AND NOT {api_twin('e')} AND {where}"
    )
