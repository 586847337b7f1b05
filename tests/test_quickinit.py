"""``quick`` builds the same objects as the dataclass's own ``__init__``."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import FrozenInstanceError, dataclass, field
from datetime import UTC, datetime

import pytest

from secledger.extract import EventFacts
from secledger.findings import Assessment, Finding
from secledger.intake import Delivery, Verified
from secledger.projection import SequencedEvent
from secledger.quickinit import quick
from secledger.rules import Context, Hit, MRHistory, SlaClock
from secledger.service import Outcome
from secledger.store.chain import LogRow
from secledger.store.eventcache import Cached, Fingerprint

QUICK = (
    EventFacts,
    Assessment,
    Finding,
    Delivery,
    Verified,
    SequencedEvent,
    Context,
    Hit,
    MRHistory,
    SlaClock,
    Outcome,
    LogRow,
    Cached,
    Fingerprint,
)


@dataclass(frozen=True)
class Plain:
    a: int
    b: str = "b"
    c: list[int] = field(default_factory=list)
    d: int = field(default=4, kw_only=True)


@quick
@dataclass(frozen=True)
class Quick:
    a: int
    b: str = "b"
    c: list[int] = field(default_factory=list)
    d: int = field(default=4, kw_only=True)


def as_tuple(value: object) -> tuple[object, ...]:
    return tuple(getattr(value, f.name) for f in dataclasses.fields(value))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1,), {}), ((1, "x"), {}), ((1,), {"c": [2]}), ((1, "x", [3]), {"d": 5}), ((), {"a": 7})],
)
def test_same_fields_as_the_generated_init(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    assert as_tuple(Quick(*args, **kwargs)) == as_tuple(Plain(*args, **kwargs))  # type: ignore[arg-type]


def test_defaults_factories_and_errors_match() -> None:
    one, two = Quick(1), Quick(1)
    assert one.c == [] and one.c is not two.c  # a new list each time, as a factory gives
    assert one == two
    assert hash(Fingerprint(1, 2, 3)) == hash(Fingerprint(1, 2, 3))
    with pytest.raises(FrozenInstanceError):
        one.a = 2  # type: ignore[misc]
    for bad in ((), (1, "x", [], 4)):
        with pytest.raises(TypeError):
            Quick(*bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            Plain(*bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Quick(1, e=2)  # type: ignore[call-arg]


def test_post_init_still_runs() -> None:
    @quick
    @dataclass(frozen=True)
    class Checked:
        n: int

        def __post_init__(self) -> None:
            if self.n < 0:
                raise ValueError("negative")

    assert Checked(1).n == 1
    with pytest.raises(ValueError, match="negative"):
        Checked(-1)


def test_refuses_what_it_cannot_build() -> None:
    @dataclass
    class Mutable:
        n: int

    @dataclass(frozen=True)
    class Hidden:
        n: int
        m: int = field(default=0, init=False)

    for cls in (Mutable, Hidden, int):
        with pytest.raises(TypeError):
            quick(cls)


@pytest.mark.parametrize("cls", QUICK, ids=lambda cls: cls.__name__)
def test_hot_path_classes_keep_their_signature(cls: type) -> None:
    # The same parameters, in the same order, with the same defaults as the dataclass's.
    quick_sig = inspect.signature(cls.__init__)
    fields = dataclasses.fields(cls)
    names = [name for name in quick_sig.parameters if name != "self"]
    assert names == [f.name for f in fields]
    for f in fields:
        default = quick_sig.parameters[f.name].default
        if f.default is not dataclasses.MISSING:
            assert default == f.default
        elif f.default_factory is dataclasses.MISSING:
            assert default is inspect.Parameter.empty


def test_event_facts_round_trip() -> None:
    now = datetime(2025, 8, 5, 20, 30, tzinfo=UTC)
    facts = EventFacts(
        instance="https://gitlab.example.com",
        project_id=1,
        mr_iid=2,
        mr_id=3,
        kind="approved",
        decision="approved",
        event_at=now,
        event_at_source="header",
        is_security=True,
        tier="high",
        labels=("sec::high",),
    )
    assert facts.extra == {} and facts.reviewers is None and facts.source == "webhook"
    assert EventFacts.from_json(facts.to_json()) == facts
