"""Closing file descriptors a peer sent us without letting it stall the receiver.

``close()`` can block for as long as the file on the other end likes: a TCP
socket with ``SO_LINGER`` and a FIN that is never acknowledged, a file on a
FUSE mount whose FLUSH never returns. Any local process may attach such an fd
to a packet, so only fds known to close at once (sealable shmem files:
memfds, our payloads and arenas) are closed in place; every other one goes
to a background thread.
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
from typing import Optional

__all__ = ["close_received", "close_later", "flush"]

_pending: "queue.SimpleQueue[int | threading.Event]" = queue.SimpleQueue()
_thread: Optional[threading.Thread] = None
_lock = threading.Lock()


def close_received(fd: int) -> None:
    """Close an fd that came from a peer: now if it is a shmem file, else in the background."""
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        close_later(fd)
        return
    os.close(fd)


def close_later(fd: int) -> None:
    """Close ``fd`` on the closer thread (started on first use)."""
    global _thread
    if _thread is None:
        with _lock:
            if _thread is None:
                _thread = threading.Thread(target=_run, name="machipc-fd-closer", daemon=True)
                _thread.start()
    _pending.put(fd)


def flush(timeout: float = 5.0) -> bool:
    """Wait until every close queued so far has been done (for fd-leak checks)."""
    if _thread is None:
        return True
    done = threading.Event()
    _pending.put(done)
    return done.wait(timeout)


def _run() -> None:
    while True:
        item = _pending.get()
        if isinstance(item, threading.Event):
            item.set()
            continue
        try:
            os.close(item)
        except OSError:
            pass


def _after_fork_in_child() -> None:
    global _thread, _pending
    _thread = None  # threads do not survive fork()
    _pending = queue.SimpleQueue()


os.register_at_fork(after_in_child=_after_fork_in_child)
