"""Which labels make a merge request a security merge request, and which risk tier it has."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from secledger.config import Settings

MEMO_SIZE = 4096


@dataclass(frozen=True)
class LabelPolicy:
    """Security-label patterns (shell globs, case-insensitive) and tiers, highest first."""

    patterns: tuple[str, ...] = ("sec/*", "sec::*")
    tiers: tuple[str, ...] = ("critical", "high", "medium", "low")
    unclassified: str = "unclassified"
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _tails: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    # Label titles already classified: a handful of titles recur in every delivery.
    _known: dict[str, bool] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        joined = "|".join(f"(?:{_unanchored(p.lower())}\\Z)" for p in self.patterns)
        object.__setattr__(self, "_regex", re.compile(joined))
        # A tier is what a pattern's last "*" matched, when the pattern ends with it
        # ("high" in "sec::high" for "sec::*", in "team::sec-high" for "*::sec-*").
        tails = tuple(_tail(p.lower()) for p in self.patterns if p.endswith("*"))
        object.__setattr__(self, "_tails", tails)

    @classmethod
    def from_settings(cls, settings: Settings) -> LabelPolicy:
        """Build the policy from configured patterns and tiers."""
        return cls(
            patterns=tuple(settings.security_label_patterns),
            tiers=tuple(settings.risk_tiers),
            unclassified=settings.unclassified_tier,
        )

    def is_security_label(self, title: str) -> bool:
        """True when a label title matches any security pattern."""
        known = self._known.get(title)
        if known is None:
            known = self._regex.match(title.lower()) is not None
            if len(self._known) >= MEMO_SIZE:
                self._known.clear()  # bounded: titles are sender-controlled
            self._known[title] = known
        return known

    def any_security(self, titles: Iterable[str]) -> bool:
        """True when any of ``titles`` is a security label."""
        # Called for every delivery: the memo is read inline, not through a generator.
        known = self._known
        for title in titles:
            found = known.get(title)
            if found is None:
                found = self.is_security_label(title)
            if found:
                return True
        return False

    def any_security_in(self, items: object) -> bool:
        """``any_security(payloads.label_titles(items))`` without building the list: the
        ignore decision asks this of nearly every delivery."""
        if not isinstance(items, list):
            return False
        known = self._known
        for item in items:
            if isinstance(item, dict):
                title = item["title"] if "title" in item else item.get("name")
            else:
                title = item
            if not isinstance(title, str):
                continue
            found = known.get(title)
            if found is None:
                found = self.is_security_label(title)
            if found:
                return True
        return False

    def security_labels(self, titles: Iterable[str]) -> tuple[str, ...]:
        """The security labels among ``titles``, in their given order."""
        return tuple(t for t in titles if self.is_security_label(t))

    def tier_of_label(self, title: str) -> str | None:
        """The tier one security label names, if any."""
        lowered = title.lower()
        for tail in self._tails:
            matched = tail.match(lowered)
            if matched is not None:
                suffix = matched.group(1).strip()
                if suffix in self.tiers:
                    return suffix
        return None

    def tier(self, titles: Iterable[str]) -> str:
        """The highest tier among the labels; ``unclassified`` when none names one."""
        ranks = [
            self.tiers.index(tier)
            for tier in (self.tier_of_label(t) for t in titles if self.is_security_label(t))
            if tier is not None
        ]
        return self.tiers[min(ranks)] if ranks else self.unclassified


# fnmatch.translate ends its regex with this anchor: \Z up to Python 3.13, \z since 3.14
# (which older versions' re does not know).
_ANCHORS = (r"\Z", r"\z")


def _unanchored(glob: str) -> str:
    """``fnmatch.translate(glob)`` without its end anchor, for any Python version."""
    regex = fnmatch.translate(glob)
    anchor = next((a for a in _ANCHORS if regex.endswith(a)), None)
    if anchor is None:
        # Left in, an unknown anchor would make a tail match nothing: every MR unclassified.
        raise RuntimeError(f"unexpected fnmatch.translate output: {regex!r}")
    return regex.removesuffix(anchor)


def _tail(pattern: str) -> re.Pattern[str]:
    """A regex for ``pattern`` (ending with "*") whose group 1 is what that "*" matched."""
    return re.compile(_unanchored(pattern[:-1]) + r"(.*)\Z", re.DOTALL)
