"""What an `autograd.Function.backward` returns, written by name.

backward must return one value per argument of forward; most of ours are settings (floats,
strings, flags) that take no gradient. `InputGradients(Function.forward)(logits=g)`
returns g in the place of forward's `logits` argument and None everywhere else, so no
backward counts Nones by hand. The names are read once, when the module defines it.
"""

from __future__ import annotations

import inspect


class InputGradients:
    """Builds backward's return tuple for `forward` (its arguments after ctx)."""

    def __init__(self, forward):
        self.names = tuple(inspect.signature(forward).parameters)[1:]

    def __call__(self, **gradients) -> tuple:
        for name in gradients:
            if name not in self.names:
                raise TypeError(f"forward has no argument {name!r}; it takes {self.names}")
        return tuple(gradients.get(name) for name in self.names)
