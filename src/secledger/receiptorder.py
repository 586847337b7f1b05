"""Whether a delivery an MR's replica ignored came after the MR's first logged one.

A delivery received before its MR's first security delivery was logged was rightly
ignored; one received after it should have been recorded. The receipt times come from
the clocks of different replicas, GitLab's event times from one clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta

# How far the replicas' clocks may disagree when a delivery's receipt is compared with
# the MR's first logged one (perhaps another replica's clock).
CLOCK_MARGIN = timedelta(seconds=1)


def came_after(
    received_at: datetime, event_at: datetime, first_received: datetime, first_event: datetime
) -> bool:
    """Whether a delivery came after the MR's first logged one: received later, or, up
    to ``CLOCK_MARGIN`` before it (the replicas' clocks), about a later event in GitLab,
    whose times come from one clock. Leaning towards recording: an extra event from
    just before the MR was known changes no decision."""
    if received_at > first_received:
        return True
    if received_at <= first_received - CLOCK_MARGIN:
        return False
    return event_at > first_event


def surely_after(
    received_at: datetime,
    event_at: datetime | None,
    first_received: datetime,
    first_event: datetime,
) -> bool:
    """``came_after`` with the margin on both sides: an error is logged on it, and an
    MR labelled by a bot a moment after it was opened must not log one when this
    replica's clock is ahead of the one that recorded the MR first. Within the margin,
    without GitLab's time for the event (``event_at`` None), it is not sure."""
    if abs(received_at - first_received) < CLOCK_MARGIN:
        return event_at is not None and event_at > first_event
    return received_at > first_received
