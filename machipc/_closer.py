"""Closing file descriptors a peer sent us without letting it stall the receiver.

``close()`` can block for as long as the file on the other end likes: a TCP
socket with ``SO_LINGER`` and a FIN that is never acknowledged, a file on a
FUSE mount whose FLUSH never returns. The kernel runs the final release of a
file in the thread that dropped the last reference (``fput`` -> task work on
return to user space), and releasing a socket releases the files still in
flight inside it, so closing any peer's fd -- or our end of a peer's
connection, whose queue may hold fds -- can block. Only fds known to close at
once (sealable shmem or hugetlbfs files: memfds, payloads, arenas) are closed
in place; every other one goes to a closer thread.

Every deferred close has an owner: the server uses the peer's uid for the
fds a peer sent, and :func:`connection_owner` of it for the server's ends of
that uid's connections. One owner's fds are closed in order by at most one
thread at a time, so a close that never returns holds up its owner's queue
and one thread, never another owner's fds. Threads start on demand, up to
``MAX_THREADS``. ``outstanding(owner)`` counts the owner's closes not done
yet; the server refuses a uid's connections while its count is over
``max_deferred_closes`` (see ``Server``), which bounds the fds one uid can
leave in the server's table by sending them.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from collections import deque
from typing import Hashable, Optional

__all__ = ["close_received", "close_all_received", "close_later", "close_all_later", "connection_owner", "outstanding", "flush", "MAX_THREADS"]

#: Closer threads at most; each serves one owner at a time.
MAX_THREADS = 16

_cond = threading.Condition()
_queues: dict = {}  # owner -> deque of fds not yet closed
_ready: deque = deque()  # owners with queued fds and no thread on them
_busy: set = set()  # owners a thread is closing for
_outstanding: dict = {}  # owner -> closes queued or in progress
_threads = 0
_idle = 0


def close_received(fd: int, owner: Optional[Hashable] = None) -> None:
    """Close an fd that came from a peer: now if it is a shmem file, else on a closer thread."""
    close_all_received((fd,), owner)


def close_all_received(fds, owner: Optional[Hashable] = None) -> None:
    """``close_received`` for each of ``fds``, the deferred ones handed over in one batch."""
    later = []
    for fd in fds:
        try:
            fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            later.append(fd)
            continue
        os.close(fd)
    if later:
        close_all_later(later, owner)


def close_later(fd: int, owner: Optional[Hashable] = None) -> None:
    """Close ``fd`` on a closer thread, after ``owner``'s earlier ones."""
    close_all_later((fd,), owner)


def close_all_later(fds, owner: Optional[Hashable] = None) -> None:
    """Close every fd of ``fds`` on a closer thread, in order, after ``owner``'s earlier ones.

    While the interpreter exits no thread can start (one would never run):
    the fds are closed here.
    """
    global _threads
    if sys.is_finalizing():
        for fd in fds:
            os.close(fd)
        return
    with _cond:
        queue = _queues.get(owner)
        waiting = queue is not None
        if queue is None:
            queue = _queues[owner] = deque()
        queue.extend(fds)
        _outstanding[owner] = _outstanding.get(owner, 0) + len(fds)
        if owner in _busy or waiting:
            return  # a thread is on it, or it is already waiting in _ready
        _ready.append(owner)
        if _idle:
            _cond.notify()
            return
        if _threads >= MAX_THREADS:
            return  # every thread is busy (some may be stuck): the first one free takes it
        _threads += 1
    threading.Thread(target=_run, name="machipc-fd-closer", daemon=True).start()


def connection_owner(uid: int) -> tuple:
    """The owner for closing the server's ends of ``uid``'s connections: a queue of
    its own, so connection churn never counts as fds the uid sent (nor waits behind them)."""
    return ("connection", uid)


def outstanding(owner: Optional[Hashable]) -> int:
    """How many of ``owner``'s deferred closes have not returned yet."""
    return _outstanding.get(owner, 0)


def flush(timeout: float = 5.0) -> bool:
    """Wait until every deferred close has returned (for fd-leak checks); False on timeout."""
    with _cond:
        return _cond.wait_for(lambda: not _outstanding, timeout)


def _run() -> None:
    global _idle
    with _cond:
        while True:
            while not _ready:
                _idle += 1
                _cond.wait()
                _idle -= 1
            owner = _ready.popleft()
            _busy.add(owner)
            queue = _queues[owner]
            while queue:
                batch = list(queue)  # one lock round trip per batch, not per fd
                queue.clear()
                _cond.release()
                try:
                    for fd in batch:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                finally:
                    _cond.acquire()
                left = _outstanding[owner] - len(batch)
                if left:
                    _outstanding[owner] = left
                else:
                    del _outstanding[owner]
                    _cond.notify_all()  # flush() waiters
            _busy.discard(owner)
            del _queues[owner]


def _after_fork_in_child() -> None:
    global _cond, _queues, _ready, _busy, _outstanding, _threads, _idle
    # Threads do not survive fork(); the fds queued in the parent are the parent's business.
    _cond = threading.Condition()
    _queues, _ready, _busy, _outstanding = {}, deque(), set(), {}
    _threads = _idle = 0


os.register_at_fork(after_in_child=_after_fork_in_child)
