"""asyncio front: ``machipc.aio.Server`` and ``machipc.aio.Client``.

Same names, sockets, wire format and policies as :class:`machipc.Server` and
:class:`machipc.Client` (the asyncio classes wrap them: every packet goes
through the same ``Server._take_all``, so validation and the policy are the very
same code). Nothing blocks the loop and there is no thread per message:

* the server registers the transport's poll fd with ``loop.add_reader`` and
  pulls packets with ``transport.recv(0)`` when it is readable;
* the client registers its connection's fd and reads replies with
  ``recv_nowait()``;
* sends are non-blocking; a full peer queue is waited out with ``add_writer``.

Cancellation and timeouts work the asyncio way (``asyncio.wait_for``,
``asyncio.timeout``, ``task.cancel()``); ``timeout=`` arguments raise
:class:`machipc.IPCTimeoutError` (a ``TimeoutError``).

A 20-line daemon::

    import asyncio, machipc
    from machipc import aio, policies

    async def handle(msg):
        return b"hello " + msg.data

    async def main():
        async with aio.Server("org.example.hello", policies.SameUser()) as srv:
            await srv.serve(handle)       # SIGTERM: drain, answer, close

    asyncio.run(main())

Backend hook (macOS): a transport is usable here when its ``ServerTransport``
has ``fileno()`` -- an fd that polls readable whenever ``recv(0)`` has work --
and its client ``Conn`` has ``fd`` and ``recv_nowait()``. On Linux that fd is
the transport's epoll fd; the Mach backend provides a kqueue fd with
``EVFILT_MACHPORT`` on its port set (see :func:`reader_fd`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import os
import signal
import weakref
from collections import deque
from typing import Any, Awaitable, Callable, Iterable, Optional, Union

from . import activation, forking, payload, transport
from . import client as _client
from . import server as _server
from .errors import (
    IPCTimeoutError,
    MessageTooLarge,
    PeerGone,
    ServerClosed,
    UnreadReplies,
)
from .args import DEFAULT, int_arg, timeout_arg
from .message import Message
from .received import Received
from .policies import PolicyLike
from .deadline import deadline_of, remaining
from .wire import ErrorCode, Kind, pack_error

__all__ = ["Server", "Client", "reader_fd"]

log = logging.getLogger("machipc")

AsyncHandler = Callable[[Message], Union[Awaitable[Any], bytes, bytearray, memoryview, None]]
_DEFAULT: Any = DEFAULT
#: Packets taken per readable event before yielding to other tasks.
BATCH = 64


def reader_fd(source) -> int:
    """The fd to watch for a transport or a client connection (the backend hook).

    ``fileno()`` when it has one: the epoll fd of a Linux server transport, a
    kqueue with EVFILT_MACHPORT for the Mach transport and connections (macOS);
    otherwise a Linux connection's socket ``fd``.
    """
    fileno = getattr(source, "fileno", None)
    return fileno() if fileno is not None else source.fd


# -- non-blocking send -------------------------------------------------------

# loop -> fd -> futures waiting for that fd to become writable. One add_writer
# per fd, shared by every sender on it (add_writer would replace another's).
_writers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, list]]" = weakref.WeakKeyDictionary()


async def _writable(fd: int, timeout: Optional[float]) -> None:
    loop = asyncio.get_running_loop()
    waiting = _writers.setdefault(loop, {})
    fut = loop.create_future()
    futures = waiting.get(fd)
    if futures is None:
        futures = waiting[fd] = []

        def ready() -> None:
            loop.remove_writer(fd)
            for f in waiting.pop(fd, ()):
                if not f.done():
                    f.set_result(None)

        loop.add_writer(fd, ready)
    futures.append(fut)
    try:
        await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        if fut in futures:
            futures.remove(fut)
        if not futures and waiting.get(fd) is futures:
            del waiting[fd]
            loop.remove_writer(fd)


async def _send(conn, kind: int, request_id: int, data, timeout: Optional[float], limit: int = payload.MAX_PAYLOAD) -> None:
    """``payload.send`` without blocking the loop: try now, else wait until writable."""
    deadline = deadline_of(timeout)
    length, fd = payload.prepare(data, limit) if hasattr(conn, "send_fd") else (0, -1)
    try:
        while True:
            try:
                if fd < 0:
                    conn.send(kind, request_id, data, 0)
                else:
                    conn.send_fd(kind, request_id, length, fd, 0)
                return
            except IPCTimeoutError:  # the peer's queue is full right now
                pass
            left = remaining(deadline)
            if left == 0.0:
                raise IPCTimeoutError(f"send: the peer's queue stayed full for {timeout} s")
            sock_fd = getattr(conn, "fd", None)
            if sock_fd is None:  # Mach: no fd turns writable when a full queue drains; poll gently
                await asyncio.sleep(min(left, 0.001) if left is not None else 0.001)
            else:
                await _writable(sock_fd, left)
    finally:
        if fd >= 0:
            os.close(fd)


# -- server ------------------------------------------------------------------


class Server:
    """An asyncio machipc server; takes the same arguments as :class:`machipc.Server`.

    ``max_queue`` bounds the messages read ahead of ``receive()``; when it is
    reached the server stops reading and the kernel queues (then the clients)
    wait. Use it from one event loop.
    """

    def __init__(self, name: str, policy=None, *, max_queue: int = 256, server: Optional[_server.Server] = None, **kwargs) -> None:
        int_arg(max_queue, "max_queue", 1)
        self.sync: _server.Server = server if server is not None else _server.Server(name, policy, **kwargs)
        self.max_queue = max_queue
        self._queue: deque[Message] = deque()
        self._waiters: deque[asyncio.Future] = deque()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._fd = -1
        self._reading = False
        self._stopping = False
        self._serving: Optional[asyncio.Task] = None  # the task inside serve()
        self._interrupted = False  # a second signal cancelled serve()
        self._error: Optional[BaseException] = None

    @classmethod
    def from_systemd(cls, name: str, policy=None, *, max_queue: int = 256, **kwargs) -> "Server":
        """Serve the socket systemd passed for ``name`` (see ``machipc.Server.from_systemd``)."""
        return cls(name, max_queue=max_queue, server=_server.Server.from_systemd(name, policy, **kwargs))

    # -- properties of the wrapped server
    name = property(lambda self: self.sync.name)
    path = property(lambda self: self.sync.path)
    stats = property(lambda self: self.sync.stats)
    policy = property(lambda self: self.sync.policy)
    activated = property(lambda self: self.sync.activated)
    connections = property(lambda self: self.sync.connections)
    implementation = property(lambda self: self.sync.implementation)

    @property
    def closed(self) -> bool:
        return self.sync.closed

    # -- reading

    def _bind(self) -> asyncio.AbstractEventLoop:
        self.sync._check_not_forked()  # ServerClosed in a fork()ed child: the sockets are the parent's
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this machipc.aio.Server is used from another event loop")
        return loop

    def _start_reading(self) -> None:
        if self._reading or self.sync.closed or self.sync._transport is None:
            return
        self._fd = reader_fd(self.sync._transport)
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _pull(self, limit: int, settle: int = 1) -> int:
        """Move admitted messages from the transport to the queue until ``limit`` are taken
        (a packet refused or dropped counts as one; a BATCH packet's messages all go, so
        the queue may pass ``max_queue`` by one packet's worth); returns how many.

        Stops after ``settle`` empty polls in a row (the reader callback needs one:
        the fd is level-triggered; draining uses two, as a stray ``wakeup()`` can
        make one ``recv(0)`` come back empty).
        """
        srv = self.sync
        transport = srv._transport
        if transport is None:
            return 0
        taken = empty = 0
        while taken < limit:
            got = transport.recv(0.0)
            if got is None:
                empty += 1
                if empty >= settle:
                    break
                continue
            empty = 0
            queued = len(self._queue)
            srv._take_all([got], self._queue)
            taken += max(len(self._queue) - queued, 1)  # a BATCH packet: each of its messages counts
            del got
        srv._take_rejected()  # what the connections' cached admissions rejected: counted and logged
        return taken

    def _on_readable(self) -> None:
        try:
            self._pull(min(BATCH, self.max_queue - len(self._queue)))
        except Exception as exc:  # the transport failed: hand it to receive()
            log.exception("machipc.aio: receiving failed")
            self._error = exc
            self._stop_reading()
        if len(self._queue) >= self.max_queue:
            self._stop_reading()  # backpressure: resumes when receive() takes messages
        self._wake()

    def _wake(self) -> None:
        n = len(self._queue) if not (self._stopping or self.sync.closed or self._error) else len(self._waiters)
        while n > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    async def receive(self, timeout: Optional[float] = None) -> Message:
        """The next message the policy allowed.

        Raises IPCTimeoutError after ``timeout`` seconds, ServerClosed once the
        server is stopped or closed.
        """
        if timeout is None:
            return await self._receive()
        try:
            return await asyncio.wait_for(self._receive(), timeout)
        except asyncio.TimeoutError:
            raise IPCTimeoutError(f"no message within {timeout} s") from None

    async def _receive(self) -> Message:
        loop = self._bind()
        while True:
            if self._error is not None:
                raise self._error
            if self._stopping or self.sync.closed:
                raise ServerClosed(f"server {self.name!r} is closed")
            if self._queue:
                msg = self._queue.popleft()
                if len(self._queue) <= self.max_queue // 2:
                    self._start_reading()
                return msg
            self._start_reading()
            fut = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
                if fut.cancelled() and self._queue:
                    self._wake()  # hand our wake-up on to the next waiter

    def __aiter__(self) -> "Server":
        return self

    async def __anext__(self) -> Message:
        try:
            return await self._receive()
        except ServerClosed:
            raise StopAsyncIteration from None

    # -- answering

    async def reply(self, msg: Message, data=b"") -> None:
        """``msg.reply(data)`` without blocking the loop when the client's queue is full.

        On Linux that is ``msg.reply`` itself: a reply the client has no room
        for waits in its connection's outbox (machipc.outbox), flushed while
        the server reads. Raises UnreadReplies when the client is over its bound.
        """
        if getattr(msg._conn, "outbox", None) is not None:
            msg.reply(data)
            return
        msg._check_answerable()
        await _send(msg._conn, Kind.REPLY, msg.request_id, data, msg._reply_timeout, msg._limit)
        msg._answered = True

    async def fail(self, msg: Message, text: str, code: int = ErrorCode.HANDLER_FAILED) -> None:
        """``msg.fail(text)`` without blocking the loop."""
        if getattr(msg._conn, "outbox", None) is not None:
            msg.fail(text, code)
            return
        msg._check_answerable()
        msg._answered = True
        await _send(msg._conn, Kind.ERROR, msg.request_id, pack_error(code, text), msg._reply_timeout)

    async def _handle(self, handler: AsyncHandler, msg: Message) -> None:
        stats = self.sync.stats
        try:
            result = handler(msg)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            if msg.expects_reply and not msg.answered:
                await self._try(self.fail(msg, "the server is shutting down", ErrorCode.SHUTTING_DOWN))
            raise
        except UnreadReplies as exc:  # the handler's own reply found the client over its bound
            self.sync._cut_off(msg, exc)
            return
        except Exception as exc:
            stats.handler_errors += 1
            log.exception("handler failed on %r", msg)
            if msg.expects_reply and not msg.answered:
                await self._try(self.fail(msg, f"handler raised {type(exc).__name__}"))
            return
        if msg.expects_reply and not msg.answered:
            wrong = _server.refuse_result(stats, msg, result)
            if wrong is not None:
                await self._try(self.fail(msg, wrong))
                return
            try:
                await self.reply(msg, b"" if result is None else result)
            except UnreadReplies as exc:
                self.sync._cut_off(msg, exc)
            except MessageTooLarge as exc:
                stats.handler_errors += 1
                log.warning("handler's reply is unsendable: %s", exc)
                msg._answered = False
                await self._try(self.fail(msg, str(exc)))
            except Exception as exc:
                self.sync._reply_failed(msg, exc)

    async def _try(self, answer: Awaitable) -> None:
        try:
            await answer
        except Exception as exc:
            self.sync.stats.reply_errors += 1
            log.info("could not send error reply: %s", exc)

    # -- serving

    async def serve(
        self,
        handler: AsyncHandler,
        *,
        concurrency: int = 64,
        drain_timeout: Optional[float] = 10.0,
        signals: bool = True,
    ) -> None:
        """Run ``handler(msg)`` (async or plain) in a task per message until stopped.

        The handler's return value is the reply to a request, as with the
        threaded server; an exception becomes an error reply and the server
        goes on. At most ``concurrency`` handlers run at once.

        ``stop()`` -- and SIGINT/SIGTERM when ``signals`` and in the main
        thread -- stops gracefully: no new connections, what clients already
        sent is handled, running handlers finish (up to ``drain_timeout`` s,
        then they are cancelled and their requesters told), then the server is
        closed. Cancelling the ``serve`` task is abrupt, and so is a second
        SIGINT/SIGTERM during the graceful stop: running handlers are
        cancelled, the server closed and KeyboardInterrupt raised.
        """
        int_arg(concurrency, "concurrency", 1)
        drain_timeout = timeout_arg(drain_timeout, "drain_timeout")
        loop = self._bind()
        restore = self._install_signal_handlers(loop) if signals else []
        slots = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task] = set()

        def spawn(msg: Message) -> None:
            task = loop.create_task(self._handle(handler, msg))
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))

        graceful = False
        self._serving, self._interrupted = asyncio.current_task(), False
        activation.notify("READY=1")
        try:
            while True:
                await slots.acquire()
                try:
                    msg = await self._receive()
                except ServerClosed:
                    slots.release()
                    graceful = self._stopping and not self.sync.closed
                    break
                spawn(msg)
                del msg
            if graceful:
                await self._drain(spawn, slots, tasks, deadline_of(drain_timeout))
        except asyncio.CancelledError:
            if not self._interrupted:
                raise
            graceful = True  # closed below
            raise KeyboardInterrupt from None
        finally:
            self._serving = None
            for signum, previous in restore:
                loop.remove_signal_handler(signum)
                signal.signal(signum, previous)
            if tasks:
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if graceful:
                self.close()

    async def _drain(self, spawn, slots: asyncio.Semaphore, tasks: set, deadline: Optional[float]) -> None:
        activation.notify("STOPPING=1")
        self._stop_reading()
        self.sync._stop_accepting()
        drained = 0
        while True:
            if deadline is not None and remaining(deadline) == 0.0:
                log.warning("stopping: drain timeout reached with %d handlers running", len(tasks))
                return
            self._pull(1 << 30, settle=2)
            while self._queue:
                await slots.acquire()
                spawn(self._queue.popleft())
                drained += 1
            if not tasks:
                break
            await asyncio.wait(set(tasks), timeout=remaining(deadline), return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping: handled %d queued messages", drained)
        if deadline is None:
            deadline = deadline_of(self.sync.reply_timeout or 0.0)
        while self.sync._flush_replies(0) and remaining(deadline) != 0.0:  # replies queued for slow readers
            await asyncio.sleep(0.01)

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> list:
        restore = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous = signal.getsignal(signum)
                loop.add_signal_handler(signum, self._on_signal, signum)
            except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
                continue
            restore.append((signum, previous))
        return restore

    def _on_signal(self, signum: int) -> None:
        if self._stopping and self._serving is not None:  # a second signal: stop at once
            log.warning("signal %d again: closing at once", signum)
            self._interrupted = True
            self._serving.cancel()
            return
        log.info("signal %d: stopping serve() (again to stop at once)", signum)
        self.stop()

    def stop(self) -> None:
        """Make ``serve`` stop gracefully and ``receive`` raise ServerClosed (from the loop's thread)."""
        self._stopping = True
        if self._loop is not None:
            self._wake()

    def close(self) -> None:
        """Stop listening, disconnect clients, remove the socket file (idempotent).

        In a fork()ed child it only lets go of the inherited fds (see Server.close).
        """
        if self.sync._fork_generation != forking.generation:
            self._reading = False  # the inherited loop's epoll set is the parent's too: leave it
        self._stop_reading()
        self._stopping = True
        self.sync.close()
        self._queue.clear()
        self._wake()

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<machipc.aio.Server wrapping {self.sync!r}>"


# -- client ------------------------------------------------------------------


class Client:
    """An asyncio connection to the server of service ``name``.

    Arguments as for :class:`machipc.Client` (``timeout`` in seconds, None for
    no limit; ``max_size`` in bytes; ``server_policy``; ``arenas``, accepted for
    parity: asyncio sends large payloads as sealed memfds, which never make the
    loop wait for ring space). Connecting to a local socket does not block, except while the server's listen backlog is full (a connect
    flood): then the constructor returns at once and the first ``await``
    (``async with``, ``send``, ``request``) finishes connecting, waiting up to
    ``timeout`` on a thread of the loop's default executor. Many tasks may
    ``request`` at once; each gets its own reply.
    """

    def __init__(
        self,
        name: str,
        *,
        timeout: Optional[float] = 10.0,
        directory: Optional[str] = None,
        impl: Optional[str] = None,
        server_policy: Optional[PolicyLike] = None,
        max_size: int = payload.MAX_PAYLOAD,
        arenas: bool = True,
    ) -> None:
        self.name = name
        self.timeout = timeout_arg(timeout)
        #: Largest payload sent or accepted in a reply (bytes); larger sends raise MessageTooLarge.
        self.max_size = int_arg(max_size, "max_size")
        self._connect_args = dict(
            timeout=timeout, directory=directory, impl=impl, server_policy=server_policy, max_size=max_size, arenas=False
        )
        self.arenas = arenas
        self._connecting: Optional[asyncio.Future] = None
        try:
            self._connected(_client.Client(name, connect_timeout=0, **self._connect_args))
        except IPCTimeoutError:  # the backlog is full: wait for a slot in _connect, off the loop
            self.sync = None  # type: ignore[assignment]
            self._conn = None
            self.path = ""  # known once connected
            self.implementation = transport.backend(impl).implementation
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._reading = False
        self._dead: Optional[Exception] = None

    def _connected(self, sync: _client.Client) -> None:
        self.sync = sync
        self.path = sync.path
        self.implementation = sync.implementation
        self._conn = sync._conn

    async def _connect(self) -> None:
        """Finish a connect that found the backlog full (one attempt shared by every caller)."""
        if self._connecting is None:
            loop = asyncio.get_running_loop()
            make = functools.partial(_client.Client, self.name, **self._connect_args)
            self._connecting = loop.run_in_executor(None, make)
        sync = await asyncio.shield(self._connecting)
        if self.sync is None:
            if self._dead is not None:  # closed while connecting
                sync.close()
            else:
                self._connected(sync)

    async def _bind(self) -> asyncio.AbstractEventLoop:
        if self.sync is None:
            await self._connect()
        elif self.sync._fork_generation != forking.generation and self._dead is None:
            self._after_fork()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this machipc.aio.Client is used from another event loop")
        if self._dead is not None:
            raise type(self._dead)(*self._dead.args)
        if not self._reading:
            loop.add_reader(reader_fd(self._conn), self._on_readable)
            self._reading = True
        return loop

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(reader_fd(self._conn))

    def _after_fork(self) -> None:
        """First use in a fork()ed child: the sync client connects anew, and this one
        forgets the parent's loop and requests (see machipc.forking)."""
        self.sync._reconnect_after_fork()
        self._connected(self.sync)
        self._loop, self._reading, self._pending = None, False, {}

    def _check(self, data) -> None:
        if self._dead is not None:
            raise type(self._dead)(*self._dead.args)
        # The server's limit is known once connected and its HELLO is read.
        _client.check_size(payload.size_of(data), self.max_size, None if self.sync is None else self.sync.server_limits)

    def _on_readable(self) -> None:
        for _ in range(BATCH):
            try:
                got = self._conn.recv_nowait()
            except Exception as exc:
                self._gone(PeerGone(f"receiving from {self.name!r} failed: {exc}"))
                return
            if got is None:
                return
            self._deliver(got)
            if not self._reading:
                return

    def _gone(self, error: Exception) -> None:
        self._dead = error
        self._stop_reading()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(type(error)(*error.args))

    def _deliver(self, got: Received) -> None:
        rid, result, error = _client.decode_reply(self.name, got, self.sync.server_policy)
        if rid < 0:
            self._gone(error)
            return
        fut = self._pending.get(rid)
        if fut is None or fut.done():
            log.debug("late reply %d discarded (its request timed out or was cancelled)", rid)
        elif error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def _timeout(self, timeout) -> Optional[float]:
        return self.timeout if timeout is _DEFAULT else timeout

    @property
    def server_policy(self):
        """Who may answer (as :attr:`machipc.Client.server_policy`); None until connected."""
        return None if self.sync is None else self.sync.server_policy

    def buffer(self, size: int) -> payload.LoanBuffer:
        """A writable ``size``-byte buffer to build a payload in place (as :meth:`machipc.Client.buffer`)."""
        return payload.loan(size, self.max_size)

    async def send(self, data, timeout: Optional[float] = _DEFAULT) -> None:
        """Send a one-way message; waits (without blocking the loop) while the server's queue is full.

        ``timeout`` in seconds (None: no limit; default the client's). Errors as
        :meth:`machipc.Client.send`.
        """
        self._check(data)
        await self._bind()
        await _send(self._conn, Kind.MESSAGE, 0, data, self._timeout(timeout), self.max_size)

    async def send_many(self, messages: Iterable, timeout: Optional[float] = _DEFAULT) -> int:
        """Send one-way messages in order; returns how many. As :meth:`machipc.Client.send_many`
        (runs of inline bytes batched), without blocking the loop: a run stops where the
        server's queue is full, and that message waits for room as :meth:`send` does.
        ``timeout`` bounds each wait for queue space."""
        timeout = self._timeout(timeout)
        sent = 0
        for chunk in _client.chunks(messages):
            done, count = 0, len(chunk)
            while done < count:
                await self._bind()
                send_many = getattr(self._conn, "send_many", None)  # (Mach has none: one by one)
                if send_many is not None and self._dead is None:
                    try:
                        done = send_many(chunk, 0, done, self.sync._inline_limit())
                    except PeerGone as exc:
                        self._gone(exc)
                    if done == count:
                        break
                await self.send(chunk[done], timeout)  # not plain inline bytes, or the queue was full
                done += 1
            sent += count
        return sent

    async def request(self, data, timeout: Optional[float] = _DEFAULT) -> _client.Reply:
        """Send a request and return the reply's payload (errors as :meth:`machipc.Client.request`)."""
        self._check(data)
        loop = await self._bind()
        timeout = self._timeout(timeout)
        deadline = deadline_of(timeout)
        rid = next(self._ids)
        fut = self._pending[rid] = loop.create_future()
        try:
            await _send(self._conn, Kind.REQUEST, rid, data, timeout, self.max_size)
            if timeout is None:
                return await fut
            try:
                return await asyncio.wait_for(fut, remaining(deadline))
            except asyncio.TimeoutError:
                raise IPCTimeoutError(f"no reply from {self.name!r} within {timeout} s") from None
        finally:
            self._pending.pop(rid, None)

    def close(self) -> None:
        """Disconnect (idempotent); requests still waiting get PeerGone."""
        if self._dead is None:
            self._gone(PeerGone("the client was closed"))
        self._stop_reading()
        if self.sync is not None:
            self.sync.close()

    async def __aenter__(self) -> "Client":
        if self.sync is None:
            await self._connect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<machipc.aio.Client {self.name!r} at {self.path} ({self.implementation})>"
