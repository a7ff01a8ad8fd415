"""Rate-limited warnings about peers: a flood of rejected packets is a few log lines.

Any local user can make a server refuse tens of thousands of packets a second;
one WARNING each would fill the disk and use up journald's per-service burst,
after which the daemon's own messages are dropped. :class:`RateLimitedLog`
lets ``burst`` records per ``(uid, reason)`` through in each ``interval``
(default 5 per 10 s) and folds the rest into one summary line per key,
"N more from uid U in the last 10 s: reason", written when that key's window
has passed (checked on each later call, so a flood that stops is still
summed up by the next warning of any key). Counting every event is the
caller's job (``Server.stats``); this only decides what is written.

Memory: at most ``max_keys`` windows (default 1024); past that, new uids share
one overflow window per reason (reasons are the server's own few strings), so
many uids cannot grow the table.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

__all__ = ["RateLimitedLog", "INTERVAL", "BURST"]

#: Seconds per window (default).
INTERVAL = 10.0
#: Records let through per (uid, reason) and window (default).
BURST = 5
_ANY_UID = -1  # the overflow windows' uid


class _Window:
    __slots__ = ("start", "logged", "suppressed", "level")

    def __init__(self, start: float, level: int) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0
        self.level = level


class RateLimitedLog:
    """Write at most ``burst`` records per ``(uid, reason)`` each ``interval`` seconds.

    ``clock`` (default ``time.monotonic``) is for tests. Thread-safe.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = INTERVAL,
        burst: int = BURST,
        max_keys: int = 1024,
        clock: Optional[Callable[[], float]] = None,
    ) -> None:
        if interval <= 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"need interval > 0, burst >= 1, max_keys >= 1; not {interval}, {burst}, {max_keys}")
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock or time.monotonic
        self._windows: dict[tuple[int, str], _Window] = {}  # oldest window first
        self._lock = threading.Lock()

    def log(self, level: int, uid: int, reason: str, fmt: str, *args) -> bool:
        """Log ``fmt % args`` unless ``(uid, reason)`` used up its burst; True if written."""
        now = self._clock()
        with self._lock:
            summaries = self._expire(now)
            window = self._window(now, uid, reason, level)
            write = window.logged < self.burst
            if write:
                window.logged += 1
            else:
                window.suppressed += 1
        for args_ in summaries:
            self.logger.log(*args_)
        if write:
            self.logger.log(level, fmt, *args)
        return write

    def count(self, uid: int, reason: str, n: int, level: int = logging.WARNING) -> None:
        """Fold ``n`` events of ``(uid, reason)`` that were counted, not logged, into its
        next summary line (e.g. rejected packets the transport dropped by itself)."""
        now = self._clock()
        with self._lock:
            summaries = self._expire(now)
            self._window(now, uid, reason, level).suppressed += n
        for args_ in summaries:
            self.logger.log(*args_)

    def warning(self, uid: int, reason: str, fmt: str, *args) -> bool:
        return self.log(logging.WARNING, uid, reason, fmt, *args)

    def flush(self) -> None:
        """Write the summaries of every window now (e.g. at shutdown) and start afresh."""
        with self._lock:
            summaries = [self._summary(k, w) for k, w in self._windows.items() if w.suppressed]
            self._windows.clear()
        for args_ in summaries:
            self.logger.log(*args_)

    def _window(self, now: float, uid: int, reason: str, level: int) -> _Window:
        """The current window of ``(uid, reason)`` (the overflow one when the table is full)."""
        key = (uid, reason)
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self.max_keys:
                key = (_ANY_UID, reason)
                window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(now, level)
        return window

    def _expire(self, now: float) -> list:
        """Drop the windows older than ``interval``; the summaries to write for them."""
        out = []
        windows = self._windows
        while windows:
            key, window = next(iter(windows.items()))
            if now - window.start < self.interval:
                break  # insertion order is start order: the rest are younger
            del windows[key]
            if window.suppressed:
                out.append(self._summary(key, window))
        return out

    def _summary(self, key: tuple[int, str], window: _Window) -> tuple:
        uid, reason = key
        who = "other senders" if uid == _ANY_UID else f"uid {uid}"
        return (window.level, "%d more from %s in the last %g s: %s", window.suppressed, who, self.interval, reason)
