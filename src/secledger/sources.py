"""Facts from a stored log row, whatever way it came in: the decoder ``rebuild`` uses.

Webhook, replay and spool rows hold a GitLab request body; ``api`` rows hold the
canonical envelope of one REST API fact (see :mod:`secledger.apifacts`). Both come
out as :class:`~secledger.extract.EventFacts`, so the fold never asks where a fact
came from except to merge an API fact with the webhook that told the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from secledger import apifacts
from secledger.extract import EventFacts, extract_facts
from secledger.intake import Ignored, parse_delivery
from secledger.policy import LabelPolicy


def facts_from_log(row: Mapping[str, Any], policy: LabelPolicy) -> EventFacts | None:
    """Re-extract the facts of one ``delivery_log`` row (a mapping of its columns).

    None when the row tells nothing about a merge request.
    """
    source, instance, payload = str(row["source"]), str(row["instance"]), bytes(row["payload"])
    if source == apifacts.SOURCE:
        return apifacts.facts(instance, orjson.loads(payload), policy)
    stored = row["headers"]
    headers: dict[str, str] = orjson.loads(stored) if isinstance(stored, str | bytes) else {}
    headers |= {"x-gitlab-event": str(row["event"]), "x-gitlab-instance": instance}
    delivery = parse_delivery(
        headers,
        payload,
        secrets=(),
        max_body_bytes=max(len(payload), 1),
        received_at=row["received_at"],
        require_token=False,
        source=source,
    )
    if isinstance(delivery, Ignored):
        return None
    return extract_facts(delivery, policy)
