"""Deadlines: a timeout in seconds turned into a point on the monotonic clock, and back.

Every blocking call of machipc takes ``timeout`` in seconds (None: no limit),
turns it into a deadline once, and waits for what is left of it at each step.
"""

from __future__ import annotations

import time
from typing import Optional

from .args import timeout_arg

__all__ = ["deadline_of", "remaining"]


def deadline_of(timeout: Optional[float]) -> Optional[float]:
    """Absolute monotonic deadline for a timeout in seconds (None: forever).

    Raises InvalidArgument for a negative, NaN or non-numeric timeout.
    """
    if timeout is None:
        return None
    if type(timeout) is not float or not timeout >= 0:  # the common case: one check
        timeout = timeout_arg(timeout)
    return time.monotonic() + timeout


def remaining(deadline: Optional[float]) -> Optional[float]:
    """Seconds left until ``deadline`` (never negative; None: forever)."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())
