"""The in-memory set of ledger keys the receiver uses to ignore non-security MRs cheaply."""

from __future__ import annotations

import threading

from builders import dumps, mr_event
from secledger.config import Settings
from secledger.extract import MRKey
from secledger.membership import KnownMRs
from secledger.policy import LabelPolicy
from secledger.service import feed
from secledger.store import db

KEY = MRKey("https://gitlab.example.com", 14, 1)


def test_keys_written_before_listening_are_not_missed(engine, database_url) -> None:
    """A row committed between load() and LISTEN (or while the listener was reconnecting)
    sends its NOTIFY to nobody; the listener reads the keys again once it listens."""
    known = KnownMRs()
    known.load(engine)
    assert KEY not in known
    # Another replica records the MR now: its NOTIFY reaches no listener.
    policy = LabelPolicy.from_settings(Settings())
    headers = {"x-gitlab-event": "Merge Request Hook"}
    outcome = feed(
        engine, policy, headers, dumps(mr_event("open")), max_body_bytes=1 << 20, source="replay"
    )
    assert outcome.status == "recorded"
    known.listen(db.libpq_url(database_url))
    try:
        pause = threading.Event()
        for _ in range(200):  # bounded: at most 20 s on a loaded machine
            if KEY in known:
                break
            pause.wait(0.1)
        assert KEY in known
    finally:
        known.close()
