"""Repeat offenders: uids refused for a while after misbehaving more than once.

Disconnecting a client that never reads its replies costs it nothing: it
reconnects. :class:`Cooldown` counts such offences per uid (the kernel's, so
they cannot be spread over made-up identities) and, once a uid reaches
``strikes`` offences within ``cooldown`` seconds, refuses it for ``cooldown``
seconds (``Server`` disconnects its connections at their next packet).

A refused uid is refused as a whole: with the default ``SameUser`` policy the
offender runs as the server's own user, so the other clients of that user are
refused with it until the cool-down ends. Memory: at most ``max_uids``
entries; expired ones are dropped first, then the oldest.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

__all__ = ["Cooldown", "STRIKES", "COOLDOWN"]

#: Offences within ``COOLDOWN`` seconds that get a uid refused (default).
STRIKES = 3
#: Seconds a repeat offender is refused, and the window its offences are counted in (default).
COOLDOWN = 60.0


class Cooldown:
    """Offence counts per uid and the uids refused now (see the module doc). Thread-safe."""

    def __init__(
        self, strikes: int = STRIKES, cooldown: float = COOLDOWN, max_uids: int = 4096, clock: Optional[Callable[[], float]] = None
    ) -> None:
        if strikes < 1 or cooldown < 0 or max_uids < 1:
            raise ValueError(f"need strikes >= 1, cooldown >= 0, max_uids >= 1; not {strikes}, {cooldown}, {max_uids}")
        self.strikes = strikes
        self.cooldown = cooldown
        self.max_uids = max_uids
        self._clock = clock or time.monotonic
        self._offences: dict[int, list[float]] = {}  # uid -> times of recent offences
        self._refused: dict[int, float] = {}  # uid -> refused until
        self._lock = threading.Lock()

    def strike(self, uid: int) -> bool:
        """Count an offence of ``uid``; True when it is refused from now on."""
        now = self._clock()
        with self._lock:
            times = [t for t in self._offences.pop(uid, ()) if now - t < self.cooldown]
            times.append(now)
            if len(times) >= self.strikes:
                self._refused.pop(uid, None)
                self._refused[uid] = now + self.cooldown
                self._trim(self._refused, lambda until: until <= now)
                return True
            self._offences[uid] = times
            self._trim(self._offences, lambda ts: now - ts[-1] >= self.cooldown)
            return False

    def refused(self, uid: int) -> bool:
        """True while ``uid`` is in its cool-down (one dict lookup when nobody is)."""
        until = self._refused.get(uid)
        if until is None:
            return False
        if self._clock() < until:
            return True
        with self._lock:
            if self._refused.get(uid) == until:
                del self._refused[uid]
        return False

    def _trim(self, table: dict, expired: Callable) -> None:
        if len(table) <= self.max_uids:
            return
        for key in [k for k, v in table.items() if expired(v)]:
            del table[key]
        while len(table) > self.max_uids:
            del table[next(iter(table))]
