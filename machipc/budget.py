"""A server's budgets for its peers: mapped bytes, connections per uid, deferred closes.

Bytes of peers' memory a server has mapped are counted per connection and in total.

Allowed senders' memfd payloads stay mapped while the handler holds the
message; their arenas stay mapped for the whole connection. Both are charged
here before mapping and refunded when the mapping goes, so one connection (or
all of them together) cannot make the server map more than its budget: a
payload over it is refused with ``Drop.OVER_BUDGET`` (error code
``OVER_BUDGET``), which a client may retry later.
"""

from __future__ import annotations

import threading
from typing import Optional

from . import _closer
from .wire import Drop

__all__ = ["Account", "MappedBudget", "ConnLimits"]


class Account:
    """One connection's share of a :class:`MappedBudget` (bytes mapped now)."""

    __slots__ = ("used",)

    def __init__(self) -> None:
        self.used = 0


class MappedBudget:
    """At most ``per_connection`` bytes mapped for one connection's account and
    ``total`` bytes for all of them; None means no limit."""

    def __init__(self, per_connection, total) -> None:
        for name, value in (("per_connection", per_connection), ("total", total)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, not {value}")
        self.per_connection = per_connection
        self.total = total
        self.used = 0  #: bytes mapped now, all connections
        self._lock = threading.Lock()  # refunds come from whichever thread frees a view

    def charge(self, account: Account, nbytes: int) -> bool:
        """Reserve ``nbytes`` for ``account``; False (nothing reserved) when over a limit."""
        with self._lock:
            if self.per_connection is not None and account.used + nbytes > self.per_connection:
                return False
            if self.total is not None and self.used + nbytes > self.total:
                return False
            account.used += nbytes
            self.used += nbytes
            return True

    def refund(self, account: Account, nbytes: int) -> None:
        with self._lock:
            account.used -= nbytes
            self.used -= nbytes


class ConnLimits:
    """Per-uid caps applied when a server transport accepts a connection.

    ``per_uid``: connections one uid may hold open (None: no cap).
    ``deferred_closes``: a uid with this many fds still queued or stuck on a
    closer thread (machipc._closer, counted by uid) may not connect (None:
    no cap). Both transports call :meth:`admit` at accept and :meth:`left`
    when a connection they admitted goes.
    """

    def __init__(self) -> None:
        self.per_uid: Optional[int] = None
        self.deferred_closes: Optional[int] = None
        self._count: dict[int, int] = {}

    def admit(self, uid: int) -> int:
        """Drop.OK (and counted) or the reason the connection is refused."""
        if self.deferred_closes is not None and _closer.outstanding(uid) >= self.deferred_closes:
            return Drop.CLOSE_BUDGET
        n = self._count.get(uid, 0)
        if self.per_uid is not None and n >= self.per_uid:
            return Drop.CONN_LIMIT
        self._count[uid] = n + 1
        return Drop.OK

    def left(self, uid: int) -> None:
        n = self._count.get(uid, 0) - 1
        if n > 0:
            self._count[uid] = n
        else:
            self._count.pop(uid, None)

    def of(self, uid: int) -> int:
        """Connections ``uid`` holds now."""
        return self._count.get(uid, 0)
