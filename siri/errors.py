"""The error type of a problem with what the user gave.

`UserError` marks a bad config key, file or argument: the `siri` command prints its message
on one line and exits with code 2. Any other exception is a fault of siri itself and keeps
its traceback. It subclasses ValueError, so code that catches ValueError still catches it.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A bad config key, file or command-line argument; the message names it."""
