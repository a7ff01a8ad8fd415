"""A bounded worker pool for ``Server.serve(handler, workers=N)``.

The serving thread keeps receiving (the transport releases the GIL while it
waits) and hands each allowed message to one of N handler threads:

* unordered (default): one shared queue, any idle worker takes the next
  message, so a slow handler does not hold up other requests;
* ``ordered=True``: one queue per worker and each connection always goes to
  the same worker (``connection id % N``), so messages of one sender are
  handled in the order they were sent (a Client is one connection).

Queues are bounded: when they are full ``submit`` blocks, the serving thread
stops reading, the kernel's socket buffers fill and clients wait in ``send``
(backpressure instead of unbounded memory). A worker never waits for a
client to read its reply: one the client has no room for waits in that
connection's bounded outbox (machipc.outbox), so clients that never read
cannot take the workers away from the others.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Optional

from .args import int_arg
from .message import Message

__all__ = ["WorkerPool"]

log = logging.getLogger("machipc")

_STOP = object()


def connection_key(msg: Message) -> int:
    """What ``ordered=True`` keeps in order: the message's connection (one per client)."""
    conn = msg._conn
    # Mach hands out a reply conn per request (order_by_sender): order per sending process.
    key = None if getattr(conn, "order_by_sender", False) else getattr(conn, "id", None)
    if key is None:  # a backend without connection ids: order per sending process
        key = msg.sender.pid
    return key


class WorkerPool:
    """``workers`` threads calling ``run(handler, msg)`` for each submitted message.

    ``run`` must not raise (``Server._dispatch`` turns handler exceptions into
    error replies); anything that still escapes is logged and the worker goes on.
    """

    def __init__(
        self,
        run: Callable[[Callable, Message], None],
        handler: Callable,
        workers: int,
        *,
        ordered: bool = False,
        queue_size: Optional[int] = None,
        name: str = "machipc-worker",
    ) -> None:
        int_arg(workers, "workers", 1)
        if queue_size is None:
            queue_size = 4 * workers
        int_arg(queue_size, "queue_size", 1)
        self._run = run
        self._handler = handler
        self.ordered = ordered
        if ordered:
            per_worker = max(1, -(-queue_size // workers))
            self._queues = [queue.Queue(per_worker) for _ in range(workers)]
        else:
            self._queues = [queue.Queue(queue_size)]
        self._discard = False
        self._threads = []
        for i in range(workers):
            q = self._queues[i % len(self._queues)]
            t = threading.Thread(target=self._work, args=(q,), name=f"{name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def pending(self) -> int:
        """Messages waiting for a worker (not counting those being handled)."""
        return sum(q.qsize() for q in self._queues)

    def submit(self, msg: Message) -> None:
        """Queue ``msg`` for a worker; blocks while the queue is full (backpressure)."""
        queues = self._queues
        q = queues[0] if len(queues) == 1 else queues[connection_key(msg) % len(queues)]
        q.put(msg)

    def _work(self, q: queue.Queue) -> None:
        run, handler = self._run, self._handler
        while True:
            msg = q.get()
            if msg is _STOP:
                return
            try:
                if not self._discard:
                    run(handler, msg)
            except BaseException:  # never let a worker die: the pool would shrink silently
                log.exception("worker: unexpected error handling %r", msg)
            del msg  # the connection's fd closes with its last reference

    def close(self, timeout: Optional[float] = None, *, discard: bool = False) -> bool:
        """Let the workers finish what is queued (or drop it with ``discard``) and stop them.

        Waits up to ``timeout`` seconds (None: until done). Returns True when every
        worker has stopped; stragglers are daemon threads and do not block exit.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if discard:
            self._discard = True
            for q in self._queues:
                try:
                    while True:
                        q.get_nowait()
                except queue.Empty:
                    pass
        for i in range(len(self._threads)):
            q = self._queues[i % len(self._queues)]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                q.put(_STOP, timeout=left)
            except queue.Full:
                break
        done = True
        for t in self._threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(left)
            done = done and not t.is_alive()
        if not done:
            log.warning("worker pool: handlers still running after %s s; leaving them behind", timeout)
        return done
