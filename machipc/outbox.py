"""Replies waiting for a slow reader: a bounded queue per server-side connection.

A server must never wait for one client to read. Before this, each reply to a
client whose socket was full blocked the serve loop (or a worker) in ``send``
for up to ``reply_timeout``, and a client that reconnected for free could keep
every well-behaved request waiting that long. Now a reply that does not fit
in the peer's socket right away waits here, and the transport's epoll loop
sends it when the socket turns writable (``EPOLLOUT``, armed only while
something waits, so a quiet connection costs nothing).

What a peer may hold unread is bounded by ``limit`` bytes, counting

* replies queued here (packet bytes plus ``ENTRY_COST`` each), and
* sealed-memfd payloads already in its socket that it has not read: each
  keeps the server-written shmem pages alive while it sits in the peer's
  receive queue, so a client that never reads could otherwise hold any
  number of them (issue 12 item 9: +960 MiB after 30 requests). They count
  until ``SIOCOUTQ`` (``unix_outq_len``: bytes of our packets the peer has not
  read) is seen at 0 again, which is conservative: memfds the peer already
  took count until it has read everything we sent.

A send that would go over the bound, or that finds the oldest queued reply
older than ``max_age`` seconds, raises :class:`~machipc.errors.UnreadReplies`
and empties the queue; the server then disconnects the peer (see
``Server._answer``). Replies keep no order between each other (a client
matches them by request id); queued ones go out in order.

Used by both transports (``machipc/unix.py``, ``machipc/_unix.pyx``): a
connection provides ``fd`` and ``try_send(header, body, fd) -> bool`` (one
non-blocking ``sendmsg``; False when the socket is full).
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import threading
import time
from collections import deque
from typing import Callable, Optional

from .errors import PeerGone, UnreadReplies

__all__ = ["Outbox", "ENTRY_COST", "REPLY_QUEUE_BYTES", "unread_bytes"]

#: Default bound on the reply bytes one connection may leave unread (``Server(reply_queue_bytes=)``
#: defaults to the larger of this and twice ``max_size``).
REPLY_QUEUE_BYTES = 128 * 1024 * 1024
#: Bytes charged per queued reply on top of its size (the queue entry's own memory).
ENTRY_COST = 256
_INT = struct.Struct("i")


def unread_bytes(fd: int) -> int:
    """Bytes of packets sent on socket ``fd`` that the peer has not read (SIOCOUTQ)."""
    return _INT.unpack(fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * _INT.size))[0]


class Outbox:
    """The replies one peer has not taken yet (see the module doc). Thread-safe.

    ``limit``: bytes a peer may leave unread; ``max_age``: seconds a queued
    reply may wait (None: no age limit); ``watch(True/False)``: start/stop
    the transport's EPOLLOUT watch of this connection.
    """

    def __init__(self, limit: int, max_age: Optional[float], watch: Callable[[bool], None]) -> None:
        self.limit = limit
        self.max_age = max_age
        self._watch = watch
        self._queue: deque = deque()  # (header, body, fd, held bytes, cost, queued at)
        self.queued = 0  #: bytes charged for replies waiting here
        self.in_flight = 0  #: memfd payload bytes in the peer's socket, maybe unread
        self.closed = False
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Replies queued here."""
        return len(self._queue)

    def send(self, conn, header: bytes, body, fd: int = -1, held: int = 0) -> None:
        """Send now, or queue until the socket is writable. ``held``: memfd bytes ``fd`` keeps alive.

        ``fd`` stays the caller's (a queued reply keeps a duplicate). Raises
        UnreadReplies over the bound, PeerGone once closed, and what
        ``conn.try_send`` raises for a broken connection.
        """
        with self._lock:
            if self.closed:
                raise PeerGone("the connection is closed")
            queue = self._queue
            if queue and self.max_age is not None and time.monotonic() - queue[0][5] > self.max_age:
                self._overflow(f"a reply has waited over {self.max_age} s for the peer to read")
            if held:
                self._refresh(conn)
            if not queue:
                if self.in_flight + held > self.limit:
                    self._overflow(f"{self.in_flight + held} bytes of unread reply payloads, over the {self.limit}-byte limit")
                if conn.try_send(header, body, fd):
                    self.in_flight += held
                    return
            body = bytes(body)
            cost = len(header) + len(body) + held + ENTRY_COST
            if self.queued + self.in_flight + cost > self.limit:
                self._overflow(f"{self.queued + self.in_flight + cost} bytes of unread replies, over the {self.limit}-byte limit")
            if fd >= 0:
                fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
            queue.append((header, body, fd, held, cost, time.monotonic()))
            self.queued += cost
            if len(queue) == 1:
                self._watch(True)

    def check(self, conn, held: int) -> None:
        """Raise UnreadReplies now if a memfd reply of ``held`` bytes would be over the bound,
        before the server spends memory writing it (``payload.send`` asks first)."""
        with self._lock:
            if self.closed:
                raise PeerGone("the connection is closed")
            self._refresh(conn)
            if self.queued + self.in_flight + held > self.limit:
                self._overflow(f"{self.queued + self.in_flight + held} bytes of unread replies, over the {self.limit}-byte limit")

    def flush(self, conn) -> None:
        """Send what waits, until the socket is full again (the transport calls this on EPOLLOUT)."""
        with self._lock:
            queue = self._queue
            while queue:
                header, body, fd, held, cost, _ = queue[0]
                try:
                    if not conn.try_send(header, body, fd):
                        return  # full again: the watch stays on
                except Exception:  # the connection broke: the receive path will see it end
                    self._clear()
                    break
                queue.popleft()
                self.queued -= cost
                self.in_flight += held
                if fd >= 0:
                    os.close(fd)
            self._watch(False)

    def close(self) -> None:
        """Drop what waits (the connection is gone); later sends raise PeerGone."""
        with self._lock:
            self.closed = True
            self._clear()

    def _refresh(self, conn) -> None:
        if self.in_flight:
            try:
                if unread_bytes(conn.fd) == 0:
                    self.in_flight = 0
            except OSError:
                pass

    def _overflow(self, why: str) -> None:
        self.closed = True
        self._clear()
        self._watch(False)
        raise UnreadReplies(f"the client does not read its replies: {why}")

    def _clear(self) -> None:
        for entry in self._queue:
            if entry[2] >= 0:
                os.close(entry[2])
        self._queue.clear()
        self.queued = 0
