"""Prometheus metrics, one registry per running receiver (``GET /metrics``).

The hot path adds to plain integers (:class:`DeliveryTally`); they become Prometheus
families only when Prometheus scrapes, so a delivery pays no lock and no label
lookup. Figures that live in the database (open MRs and SLA breaches by tier, chain
head) are read at scrape time too, never on the hot path.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Literal, NamedTuple

import structlog
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from secledger.reports import OPEN

log = structlog.get_logger("secledger.metrics")

# X-Gitlab-Event is sender-controlled: only these become label values, so a hostile
# sender cannot grow the number of series without bound.
KNOWN_EVENTS = frozenset({"Merge Request Hook", "System Hook", "Service Hook"})
# What became of an ignored delivery looked at again when its MR became known
# (``recheck``): a held one's answer from the writer (``recorded``, ``duplicate``,
# ``spooled``), ``left`` (it came before the MR was known), ``recovered`` (no longer
# held; its MR recorded from GitLab's API, ``recovery``), ``lost`` (no longer held, not
# recovered), ``not_recorded`` (the store refused it) or ``unchecked`` (the database
# could not say).
RecheckOutcome = Literal[
    "recorded", "duplicate", "spooled", "left", "recovered", "lost", "not_recorded", "unchecked"
]
RECHECK_OUTCOMES: tuple[RecheckOutcome, ...] = (
    "recorded",
    "duplicate",
    "spooled",
    "left",
    "recovered",
    "lost",
    "not_recorded",
    "unchecked",
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Open as the reports count it (reports.OPEN): a locked MR is still to be decided.
_OPEN_BY_TIER = text(
    f"SELECT l.risk_tier, count(*) FROM security_review_ledger l WHERE {OPEN} GROUP BY l.risk_tier"
)
_HEAD = text("SELECT coalesce(max(seq), 0) FROM delivery_log")
# Open MRs holding an unresolved `sla-breached` finding: overdue ones (recorded by
# serve's periodic check) and ones decided late but not yet merged or closed.
_BREACHED_BY_TIER = text(
    "SELECT l.risk_tier, count(*) FROM findings f"
    " JOIN security_review_ledger l USING (instance, project_id, mr_iid)"
    " WHERE f.rule = 'sla-breached' AND f.resolved_at IS NULL"
    f" AND {OPEN} GROUP BY l.risk_tier"
)


def event_label(event: str | None) -> str:
    """The bounded label value for an ``X-Gitlab-Event`` header."""
    if event is None:
        return "none"
    return event if event in KNOWN_EVENTS else "other"


# How long a scrape waits for the database's figures: a database that accepts
# connections and never answers held /metrics for as long as TCP took to give up, and
# the spool and delivery series, read from memory, went missing with it.
SCRAPE_DB_TIMEOUT_SECONDS = 2.0


class _Figures(NamedTuple):
    open_by_tier: list[tuple[str, int]]
    breached_by_tier: dict[str, int]
    head: int


class LedgerCollector(Collector):
    """Gauges read from the database at scrape time."""

    def __init__(
        self,
        engine: Engine,
        tiers: Sequence[str] = (),
        timeout: float = SCRAPE_DB_TIMEOUT_SECONDS,
    ) -> None:
        self._engine = engine
        self._tiers = tuple(tiers)
        self._timeout = timeout
        # One query at a time: scrapes that come while it runs wait on it, each no longer
        # than the timeout, and no thread piles up behind a silent database.
        self._reading: Future[_Figures] | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Open security MRs and SLA breaches by tier, and the chain head sequence number."""
        try:
            figures = self._figures().result(timeout=self._timeout)
        except FutureTimeout:
            log.warning("metrics_database_unavailable", error="timeout")
            return
        except SQLAlchemyError as exc:
            # A scrape must not fail because the database blinked: the series go
            # missing for one scrape and the log says why.
            log.warning("metrics_database_unavailable", error=type(exc).__name__)
            return
        open_mrs = GaugeMetricFamily(
            "secledger_open_security_mrs",
            "Security merge requests currently open, by risk tier.",
            labels=["tier"],
        )
        for tier, count in figures.open_by_tier:
            open_mrs.add_metric([tier], count)
        breaches = GaugeMetricFamily(
            "secledger_sla_breaches",
            "Open security merge requests with an unresolved sla-breached finding, by tier.",
            labels=["tier"],
        )
        for tier, count in figures.breached_by_tier.items():
            breaches.add_metric([tier], count)
        head = GaugeMetricFamily(
            "secledger_chain_head_seq", "Sequence number of the newest delivery-log row."
        )
        head.add_metric([], figures.head)
        yield open_mrs
        yield breaches
        yield head

    def _figures(self) -> Future[_Figures]:
        """The query in flight, or a new one on a daemon thread of its own."""
        with self._lock:
            reading = self._reading
            if reading is None or reading.done():
                reading = self._reading = Future()
                threading.Thread(
                    target=self._read, args=(reading,), name="secledger-metrics", daemon=True
                ).start()
            return reading

    def _read(self, into: Future[_Figures]) -> None:
        try:
            with self._engine.connect() as conn:
                opened = [(tier, count) for tier, count in conn.execute(_OPEN_BY_TIER)]
                # Every configured tier has a sample, so "no breach" reads 0, not "no data".
                breached = dict.fromkeys(self._tiers, 0)
                breached.update(dict(conn.execute(_BREACHED_BY_TIER).all()))
                head = conn.execute(_HEAD).scalar_one()
        except BaseException as exc:  # noqa: BLE001 - handed to the scrape that waits
            into.set_exception(exc)
            return
        into.set_result(_Figures(opened, breached, head))


class DeliveryTally(Collector):
    """Deliveries by event and outcome, and their processing-time histogram.

    Only the event loop's thread adds (the webhook handler); a scrape copies the
    figures, which under the GIL is a consistent enough view for counters.
    """

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self._bounds = tuple(buckets)
        self._counts: dict[tuple[str, str], int] = {}
        # One slot per bound plus +Inf; cumulative sums are made at scrape time.
        self._hist = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def add(self, event: str | None, outcome: str, seconds: float) -> None:
        """Count one answered delivery and its processing time."""
        # Mapped here, not at scrape time: the header is sender-controlled, and raw
        # values as keys would let a sender grow this dict without bound.
        key = (event_label(event), outcome)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        self._hist[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        """The two families, from a copy of the current figures."""
        counts = dict(self._counts)
        hist = list(self._hist)
        deliveries = CounterMetricFamily(
            "secledger_deliveries",
            "Webhook deliveries answered, by X-Gitlab-Event and outcome.",
            labels=["event", "outcome"],
        )
        for labels, n in sorted(counts.items()):
            deliveries.add_metric(list(labels), n)
        yield deliveries
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(repr, self._bounds), "+Inf"), hist, strict=True):
            running += n
            cumulative.append((bound, running))
        latency = HistogramMetricFamily(
            "secledger_delivery_processing_seconds",
            "Time from request start to answer for webhook deliveries.",
        )
        latency.add_metric([], cumulative, sum_value=self._sum)
        yield latency


class RecheckTally(Collector):
    """``secledger_ignored_rechecked_total{outcome}``: the event loop and the recovery
    thread add, rarely, so under a lock."""

    def __init__(self) -> None:
        self._counts: dict[RecheckOutcome, int] = dict.fromkeys(RECHECK_OUTCOMES, 0)
        self._lock = threading.Lock()

    def note(self, outcome: RecheckOutcome, count: int = 1) -> None:
        """Count ``count`` deliveries with ``outcome``."""
        with self._lock:
            self._counts[outcome] += count

    def collect(self) -> Iterator[CounterMetricFamily]:
        """Every outcome, 0 included, so an alert on ``lost`` has a series from the start."""
        family = CounterMetricFamily(
            "secledger_ignored_rechecked",
            "Ignored deliveries looked at again when their merge request became known"
            " (of those no longer held, the newest per merge request), by outcome.",
            labels=["outcome"],
        )
        with self._lock:
            counts = dict(self._counts)
        for outcome, n in counts.items():
            family.add_metric([outcome], n)
        yield family


class Metrics:
    """The receiver's metrics; ``registry`` is what ``/metrics`` exposes."""

    def __init__(self, engine: Engine | None = None, tiers: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tally = DeliveryTally()
        self.registry.register(self.tally)
        self.rechecked = RecheckTally()
        self.registry.register(self.rechecked)
        self.spool_depth = Gauge(
            "secledger_spool_depth",
            "Deliveries waiting in the local spool (set by the spool, 0 when there is none).",
            registry=self.registry,
        )
        if engine is not None:
            self.registry.register(LedgerCollector(engine, tiers))

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
