"""Small argument checks shared by the host-side modules."""

from __future__ import annotations

import math
import operator
from typing import Any


def as_int(name: str, value: Any, *, minimum: int | None) -> int:
    """`value` as an int >= `minimum` (any int with None), or ValueError naming `name`.

    Accepts anything with ``__index__`` (numpy and torch integer scalars) but not bools
    or floats: a budget of 8192.5 tokens or a period of ``True`` is a configuration bug.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got bool {value!r}")
    try:
        as_integer = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if minimum is not None and as_integer < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {as_integer}")
    return as_integer


# A share of something (top-p's probability mass, vLLM's part of the device memory): more
# than none, at most all of it.
FRACTION_DOMAIN = "in (0, 1]"


def is_fraction(value) -> bool:
    # Not a bool: True == 1 would pass as "all of it" where a flag was given by mistake.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


# A size, a rate, a number of seconds or steps: more than nothing, and finite (an infinite
# cache size or learning rate only fails later, deep inside, or trains on NaN).
POSITIVE_DOMAIN = "a finite number > 0"


def is_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
