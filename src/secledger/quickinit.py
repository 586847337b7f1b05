"""A faster ``__init__`` for the frozen dataclasses built once or more per delivery.

A frozen dataclass's generated ``__init__`` sets each field through
``object.__setattr__``, one call per field: 4 us for the 28 fields of ``EventFacts``,
and a dozen such objects are built for every recorded delivery. ``quick`` replaces it
with one that fills the instance's ``__dict__`` in a single update (0.4 us). The
signature, the defaults, default factories and ``__post_init__`` are the dataclass's
own; the class stays frozen (assignment still raises), equal and hashable as before.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, TypeVar

T = TypeVar("T")

_FACTORY = object()  # stands for "no value given" where a default factory applies


def _refuse_what_it_cannot_build(cls: type, fields: tuple[dataclasses.Field[Any], ...]) -> None:
    """TypeError unless ``quick`` can build the same objects as the dataclass's ``__init__``."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or not params.init:
        raise TypeError(f"{cls.__name__}: quick() takes a frozen dataclass with its __init__")
    names = [f.name for f in fields]
    for f in fields:
        if not f.init:
            raise TypeError(f"{cls.__name__}.{f.name}: quick() needs every field in __init__")
    # An InitVar is a parameter of the dataclass's __init__ that fields() leaves out,
    # handed to __post_init__: the __init__ built from fields() would not take it.
    own = list(inspect.signature(vars(cls)["__init__"]).parameters)[1:]  # after self
    extra = [p for p in own if p not in names]
    if extra:
        raise TypeError(f"{cls.__name__}.{extra[0]}: quick() takes no InitVar")
    # The fields go into the instance's __dict__: there must be one (some class of the
    # MRO without __slots__), and no field may be a slot of the class or of a base, whose
    # descriptor would hide the value put there.
    has_dict = any("__dict__" in vars(k) for k in cls.__mro__)
    slot = types.MemberDescriptorType
    if not has_dict or any(isinstance(inspect.getattr_static(cls, n, None), slot) for n in names):
        raise TypeError(f"{cls.__name__}: quick() needs fields kept in __dict__, not __slots__")


def quick(cls: type[T]) -> type[T]:
    """Class decorator, placed above ``@dataclass(frozen=True)``.

    TypeError, when decorating, for a class it cannot build: a field left out of
    ``__init__``, an ``InitVar``, a field kept in ``__slots__`` (the class's or a base's).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__}: quick() takes a frozen dataclass")
    fields = dataclasses.fields(cls)
    _refuse_what_it_cannot_build(cls, fields)
    scope: dict[str, Any] = {"_FACTORY": _FACTORY}
    signature: list[str] = []
    keyword_only: list[str] = []
    made: list[str] = []
    for f in fields:
        name = f.name
        if f.default is not dataclasses.MISSING:
            scope[f"_default_{name}"] = f.default
            param = f"{name}=_default_{name}"
        elif f.default_factory is not dataclasses.MISSING:
            scope[f"_factory_{name}"] = f.default_factory
            param = f"{name}=_FACTORY"
            made.append(f"    if {name} is _FACTORY: {name} = _factory_{name}()")
        else:
            param = name
        (keyword_only if f.kw_only else signature).append(param)
    if keyword_only:
        signature += ["*", *keyword_only]
    names = [f.name for f in fields]
    lines = [f"def __init__(self, {', '.join(signature)}):", *made]
    lines.append("    self.__dict__.update({" + ", ".join(f"{n!r}: {n}" for n in names) + "})")
    if hasattr(cls, "__post_init__"):
        lines.append("    self.__post_init__()")
    exec("\n".join(lines), scope)  # noqa: S102 - our own text, as dataclasses builds it
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
