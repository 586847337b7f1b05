"""``quick`` builds the same objects as the dataclass's own ``__init__``."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import FrozenInstanceError, InitVar, dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import pytest

from secledger import quickinit
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

    @dataclass(frozen=True, init=False)
    class Uninitialised:
        n: int

    for cls in (Mutable, Hidden, Uninitialised, int):
        with pytest.raises(TypeError):
            quick(cls)


def test_refuses_an_init_var() -> None:
    """An InitVar is a parameter of the dataclass's __init__, handed to __post_init__,
    but not a field: quick's __init__ did not take it, and every construction failed."""

    @dataclass(frozen=True)
    class Salted:
        n: int
        salt: InitVar[str]

        def __post_init__(self, salt: str) -> None:
            pass

    assert Salted(1, "pepper").n == 1  # a working dataclass, as it stands
    with pytest.raises(TypeError, match="InitVar"):
        quick(Salted)


def test_refuses_fields_kept_in_slots_of_a_base() -> None:
    """Fields in slots, the class's own or a base's, hide what quick puts in __dict__."""

    @dataclass(frozen=True, slots=True)
    class Slotted:
        n: int

    @dataclass(frozen=True)
    class Child(Slotted):
        m: int = 0

    for cls in (Slotted, Child):
        with pytest.raises(TypeError, match="slots"):
            quick(cls)


def test_takes_a_class_whose_bases_declare_empty_slots() -> None:
    """A base declaring ``__slots__ = ()``, as typing.Generic does, leaves instances
    their __dict__ and keeps no field: accepted."""
    item = TypeVar("item")

    @quick
    @dataclass(frozen=True)
    class Boxed(Generic[item]):
        value: item

    assert Boxed(3).value == 3


def test_the_generated_init_belongs_to_the_class_module() -> None:
    assert Quick.__init__.__module__ == Plain.__init__.__module__ == __name__
    for cls in QUICK:
        assert cls.__init__.__module__ == cls.__module__


def dataclass_twin(cls: type) -> type:
    """The class ``dataclass(frozen=True)`` makes of ``cls``'s fields, without quick."""
    specs = [
        (
            f.name,
            f.type,
            field(default=f.default, default_factory=f.default_factory, kw_only=f.kw_only),
        )
        for f in dataclasses.fields(cls)
    ]
    return dataclasses.make_dataclass(cls.__name__, specs, frozen=True)


def parameters(init: Callable[..., object]) -> list[tuple[str, Any, object]]:
    """Each parameter after ``self``: name, kind, and default (a default factory's
    stand-in, dataclass's or quick's, as one marker)."""
    found = list(inspect.signature(init).parameters.values())[1:]
    return [(p.name, p.kind, "factory" if _is_factory(p.default) else p.default) for p in found]


def _is_factory(default: object) -> bool:
    return default is quickinit._FACTORY or repr(default) == "<factory>"


@pytest.mark.parametrize("cls", [*QUICK, Quick], ids=lambda cls: cls.__name__)
def test_hot_path_classes_keep_their_signature(cls: type) -> None:
    """The parameters of the __init__ dataclass itself would give the class: names,
    order, kinds (keyword-only after ``*``) and defaults."""
    assert parameters(cls.__init__) == parameters(dataclass_twin(cls).__init__)


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
