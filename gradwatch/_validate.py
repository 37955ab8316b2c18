"""Argument validators shared by every public constructor and function.

Each returns the normalised value or raises ``TypeError`` (wrong kind of value)
or ``ValueError`` (right kind, outside the allowed range) naming the argument
and what is allowed, so every class rejects the same inputs the same way.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_instance",
    "check_int",
    "check_names",
]


def check_int(value: Any, name: str, *, min: int | None = None, max: int | None = None) -> int:
    """An integer (``bool`` and floats such as ``3.0`` are rejected) within ``[min, max]``.

    Example:
        >>> check_int(3, "window", min=1)
        3
        >>> check_int(3.0, "window", min=1)
        Traceback (most recent call last):
        ...
        TypeError: window must be an integer, got 3.0 (float)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    v = int(value)
    if (min is not None and v < min) or (max is not None and v > max):
        raise ValueError(f"{name} must be an integer in {_range(min, max)}, got {value!r}")
    return v


def check_float(
    value: Any,
    name: str,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """A real number (not NaN; ``inf`` only with ``allow_inf``) within the given bounds.

    Example:
        >>> check_float(0.5, "alpha", min=0, max=1, min_open=True, max_open=True)
        0.5
        >>> check_float(float("nan"), "eps", min=0)
        Traceback (most recent call last):
        ...
        ValueError: eps must be a finite number >= 0, got nan
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    lo_ok = min is None or (v > min if min_open else v >= min)
    hi_ok = max is None or (v < max if max_open else v <= max)
    if math.isnan(v) or (math.isinf(v) and not allow_inf) or not (lo_ok and hi_ok):
        what = "a number" if allow_inf else "a finite number"
        bounds = []
        if min is not None:
            bounds.append(f"{'>' if min_open else '>='} {min:g}")
        if max is not None:
            bounds.append(f"{'<' if max_open else '<='} {max:g}")
        rng = (" " + " and ".join(bounds)) if bounds else ""
        raise ValueError(f"{name} must be {what}{rng}, got {value!r}")
    return v


def check_bool(value: Any, name: str) -> bool:
    """A ``bool`` (not a truthy object).

    Example:
        >>> check_bool(True, "per_param")
        True
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """One of ``choices``.

    Example:
        >>> check_choice("step", "measure", ("auto", "hook", "step"))
        'step'
    """
    choices = tuple(choices)
    try:
        ok = value in choices
    except TypeError:  # unhashable or odd comparisons
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_instance(value: Any, name: str, cls: type[T] | tuple[type, ...], what: str) -> T:
    """An instance of ``cls``; ``what`` describes it in the error.

    Example:
        >>> check_instance(1.0, "max_norm", float, "a float")
        1.0
    """
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def check_names(value: Any, name: str, *, allow_none: bool = False) -> tuple[str, ...] | None:
    """A string or an iterable of strings (parameter names or glob patterns), as a tuple.

    Example:
        >>> check_names("fc.*", "exclude")
        ('fc.*',)
    """
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        items = tuple(value)
        bad = [v for v in items if not isinstance(v, str)]
        if not bad:
            return items
    none = " or None" if allow_none else ""
    raise TypeError(f"{name} must be a string or a list of strings (names or glob patterns){none}, got {value!r}")


def check_callable_or_choice(value: Any, name: str, choices: Iterable[str]) -> str | Callable[..., Any]:
    """One of ``choices`` or a callable.

    Example:
        >>> check_callable_or_choice("warn", "action", ("warn", "raise"))
        'warn'
    """
    if callable(value):
        return value
    choices = tuple(choices)
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))} or a callable, got {value!r}")


def check_positive(value: Any, name: str) -> float:
    """A real number > 0, else ``TypeError``/``ValueError`` naming ``name``.

    Example:
        >>> check_positive(0.5, "eps")
        0.5
    """
    return check_float(value, name, min=0, min_open=True)


def match_names(patterns: Iterable[str], names: Sequence[str], name: str, hint: str = "") -> list[int]:
    """The indices of ``names`` matched by any of the glob ``patterns`` (``fnmatch``, case-sensitive), sorted.

    Raises:
        ValueError: a pattern matches no name (the message shows the first names and ``hint``).

    Example:
        >>> match_names(["*.bias"], ["fc.weight", "fc.bias"], "exclude")
        [1]
    """
    idx: set[int] = set()
    for pattern in patterns:
        hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            shown = f"{list(names)[:8]}{' ...' if len(names) > 8 else ''}"
            raise ValueError(f"{name} entry {pattern!r} matches no parameter name; names are {shown}{hint}")
        idx.update(hits)
    return sorted(idx)


def check_list_of(value: Any, name: str, cls: type | tuple[type, ...], what: str) -> list:
    """A list of ``cls`` instances from an iterable (not a string), else ``TypeError`` naming ``name``.

    Example:
        >>> check_list_of((1, 2), "xs", int, "integers")
        [1, 2]
    """
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of {what} (use () for none), got {value!r}")
    items = list(value)
    for x in items:
        if not isinstance(x, cls):
            raise TypeError(f"{name} must be {what}, got {type(x).__name__}")
    return items


def _range(lo: int | None, hi: int | None) -> str:
    return f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
