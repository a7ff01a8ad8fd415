"""Checks of public arguments: a bad one is an InvalidArgument naming it, never a
TypeError or ValueError from deep inside."""

from __future__ import annotations

import math
from typing import Optional

from .errors import InvalidArgument

__all__ = ["timeout_arg", "int_arg", "DEFAULT"]


class _Default:
    """The default of a per-call ``timeout``: the object's own ``timeout`` attribute."""

    __slots__ = ()

    def __repr__(self) -> str:  # what help() shows: send(data, timeout=self.timeout)
        return "self.timeout"


DEFAULT = _Default()


def timeout_arg(timeout, what: str = "timeout") -> Optional[float]:
    """``timeout`` as float seconds, or None (no limit).

    Raises InvalidArgument unless it is None or a real number >= 0 (bools,
    strings and NaN are refused).
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgument(f"{what} must be a number of seconds or None, not {type(timeout).__name__} {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise InvalidArgument(f"{what} must be >= 0 seconds or None, not {timeout!r}")
    return float(timeout)


def int_arg(value, what: str, minimum: int = 0) -> int:
    """``value`` if it is an int >= ``minimum`` (not a bool), else raise InvalidArgument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be an int, not {type(value).__name__} {value!r}")
    if value < minimum:
        raise InvalidArgument(f"{what} must be >= {minimum}, not {value}")
    return value
