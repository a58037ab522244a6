"""Fast positional constructors for the frozen, slotted dataclasses of the close path.

A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``
(about 90 ns a field on Python 3.11). The close path builds several per close
(``PlanResult``, ``Observed``, ``CloseReport``, ``TcpInfo`` with 69 fields), and a
busy server closes thousands of connections a second. Setting the slots through
their member descriptors from C (``map`` over the setters) costs a little over half.

What must live here: only construction. The classes stay ordinary frozen dataclasses
(equality, ``repr``, ``dataclasses.replace`` and ``fields`` unchanged); a class whose
shape this does not expect (a ``__post_init__``, a field that is not an ``__init__``
parameter, no slots) gets its own constructor back, so nothing can be skipped by
mistake.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import deque
from collections.abc import Callable
from itertools import repeat
from typing import Any, TypeVar

__all__ = ("positional_constructor",)

T = TypeVar("T")


def positional_constructor(cls: type[T]) -> Callable[..., T]:
    """A function taking every field of ``cls`` positionally, in declaration order,
    and returning an instance equal to ``cls(*values)``.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True, slots=True)
    ... class Point:
    ...     x: int
    ...     y: int = 0
    >>> make = positional_constructor(Point)
    >>> make(1, 2) == Point(1, 2)
    True
    >>> make(1)
    Traceback (most recent call last):
    ...
    TypeError: Point takes 2 values, got 1
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    descriptors = [cls.__dict__.get(f.name) for f in fields]
    if (
        not getattr(cls, "__dataclass_params__", None)
        or hasattr(cls, "__post_init__")
        or not all(f.init for f in fields)
        or not all(type(d).__name__ == "member_descriptor" for d in descriptors)
    ):
        return cls
    setters = tuple(d.__set__ for d in descriptors)  # type: ignore[union-attr]
    count = len(setters)
    name = cls.__name__
    new = object.__new__
    call = operator.call

    def make(*values: Any) -> T:
        if len(values) != count:
            raise TypeError(f"{name} takes {count} values, got {len(values)}")
        obj: T = new(cls)
        deque(map(call, setters, repeat(obj), values), 0)
        return obj

    make.__name__ = make.__qualname__ = f"make_{name}"
    return make
