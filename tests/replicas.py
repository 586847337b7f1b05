"""What another replica does meanwhile, for tests of the receiver's known-MR window."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from secledger.config import Settings
from secledger.extract import extract_facts
from secledger.intake import Ignored, parse_delivery
from secledger.policy import LabelPolicy
from secledger.service import record_one


def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> bool:
    """Whether ``condition`` came true within ``seconds`` (polled every 0.1 s)."""
    pause = threading.Event()
    for _ in range(int(seconds * 10)):  # bounded: a loaded machine may take a while
        if condition():
            return True
        pause.wait(0.1)
    return condition()


def recorded_elsewhere(
    engine: Engine, body: dict[str, Any], received_at: datetime, **headers: str
) -> None:
    """``body``, recorded by another replica as received at ``received_at``; ``headers``
    by their lower-case names (``x-gitlab-instance``, ``idempotency-key``)."""
    delivery = parse_delivery(
        {"x-gitlab-event": "Merge Request Hook", **headers},
        json.dumps(body).encode(),
        secrets=(),
        max_body_bytes=1 << 20,
        received_at=received_at,
        require_token=False,
    )
    assert not isinstance(delivery, Ignored)
    facts = extract_facts(delivery, LabelPolicy.from_settings(Settings()))
    assert record_one(engine, delivery, facts).status == "recorded"
