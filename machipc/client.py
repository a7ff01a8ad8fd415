"""``Client``: finds a server by service name, sends messages and makes requests."""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Iterable, Optional, Union

from . import transport
from .errors import (
    IPCError,
    IPCTimeoutError,
    MessageTooLarge,
    NotPermitted,
    PeerGone,
    ProtocolError,
    Rejected,
    RemoteError,
    ServerBusy,
)
from .args import DEFAULT, int_arg, timeout_arg
from .peer import Peer
from .received import Received
from .policies import Allowlist, PolicyLike, as_policy, evaluate
from .deadline import deadline_of, remaining
from . import arena, forking, payload
from .wire import DROP_TEXT, INLINE_MAX, Drop, ErrorCode, Kind, Limits, unpack_error

_MESSAGE = int(Kind.MESSAGE)  # a plain int: an IntEnum costs a conversion per send
_UNKNOWN = object()  # Client._room_limits before the server's limits are known

__all__ = ["Client", "Buffer"]

log = logging.getLogger("machipc")

Buffer = Union[bytes, bytearray, memoryview, payload.LoanBuffer]
#: What ``request`` returns: bytes up to ``wire.INLINE_MAX``, a read-only memoryview above.
Reply = Union[bytes, memoryview]
_DEFAULT = DEFAULT
_CHUNK = 256  # messages of an iterator (not a list) send_many takes at once


class _Pending:
    """One request waiting for its answer."""

    __slots__ = ("result", "error", "event")

    def __init__(self) -> None:
        self.result: Optional[Reply] = None
        self.error: Optional[IPCError] = None
        self.event: Optional[threading.Event] = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def finish(self, result: Optional[Reply], error: Optional[IPCError] = None) -> None:
        self.result, self.error = result, error
        event = self.event
        if event is not None:
            event.set()


_ERRORS = {
    ErrorCode.REJECTED: Rejected,
    ErrorCode.HANDLER_FAILED: RemoteError,
    ErrorCode.MALFORMED: ProtocolError,
    ErrorCode.TOO_LARGE: MessageTooLarge,
    ErrorCode.SHUTTING_DOWN: PeerGone,
    ErrorCode.NO_MEMORY: ServerBusy,
    ErrorCode.OVER_BUDGET: ServerBusy,
}


def decode_reply(name: str, got: Received, server_policy=None) -> tuple[int, Optional[Reply], Optional[IPCError]]:
    """``(request_id, payload, error)`` of a packet a client received from ``name``.

    ``request_id`` is -1 when the packet is the connection's end (``error`` says so).
    On macOS every reply carries its sender's Peer (from the kernel's audit
    trailer): ``server_policy`` is checked against it, and an answer from an
    untrusted process is NotPermitted. (A bootstrap name is not owned like a
    socket file: a dynamic name belongs to whoever checked it in first.)
    """
    status, kind, rid, payload = got.status, got.kind, got.request_id, got.payload
    if status == Drop.CLOSED:
        return -1, None, PeerGone(f"server {name!r} closed the connection")
    if status != Drop.OK:
        text = DROP_TEXT.get(Drop(status), Drop(status).name)
        log.warning("malformed reply from %r: %s", name, text)
        return rid, None, ProtocolError(f"malformed reply from the server: {text}")
    sender = got.peer
    if server_policy is not None and sender is not None:
        decision = evaluate(server_policy, sender)
        if not decision.allowed:
            log.warning("reply from an untrusted server of %r (pid %d, uid %d): %s", name, sender.pid, sender.uid,
                        decision.reason)
            return rid, None, NotPermitted(
                f"server of {name!r} (pid {sender.pid}, uid {sender.uid}) is not trusted: {decision.reason}")
    if kind == Kind.REPLY:
        return rid, payload, None
    code, text = unpack_error(payload)
    return rid, None, _ERRORS.get(code, RemoteError)(text)


def check_size(size: int, max_size: int, limits: Optional[Limits]) -> None:
    """MessageTooLarge when ``size`` bytes are over ``max_size`` or the server's announced
    limit (``limits``: its HELLO, None while unknown), so a payload is refused before the transfer."""
    if size > max_size:
        raise MessageTooLarge(f"payload of {size} bytes is over the {max_size}-byte limit")
    if limits is not None and size > limits.max_size:
        raise MessageTooLarge(f"payload of {size} bytes is over the server's limit of {limits.max_size} bytes")


def chunks(messages: Iterable) -> Iterable[list]:
    """``messages`` in lists for the transport's send_many: a list as it is; another
    iterable in lists of up to 256, each ending early after a message that is not
    inline ``bytes`` (so a stream of large payloads is not held at once)."""
    if type(messages) is list:
        yield messages
        return
    chunk: list = []
    for data in messages:
        chunk.append(data)
        if len(chunk) == _CHUNK or type(data) is not bytes or len(data) > INLINE_MAX:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Client:
    """A connection to the server of service ``name``.

    ``timeout`` (seconds, None for no limit) is the default for every call
    that can block. A Client may be shared by threads: concurrent requests
    each get their own reply, and one thread's one-way messages keep their
    order. ``server_policy`` (default: the server runs as root or as this
    user) is checked against the listening process's kernel identity at
    connect (on macOS: against the sender of every reply), so a squatted name
    cannot impersonate a daemon. With the default, the socket file must also be
    owned by root or by this user; an explicit ``server_policy`` alone governs
    (a client in a container sees the owner as the overflow uid, and the
    server as pid 0).

    Connecting waits up to ``connect_timeout`` (default: ``timeout``) while the
    server's listen backlog is full (a connect flood; :mod:`machipc.connecting`);
    ``connect_timeout=0`` tries once and raises IPCTimeoutError.

    Parameters: ``name`` (a service name; looked up as :mod:`machipc.naming`
    says, or in ``directory`` alone); ``timeout`` and ``connect_timeout``
    (seconds, float or None for no limit; default 10.0 and ``timeout``);
    ``impl`` (``"c"``, ``"py"`` or None); ``server_policy``; ``max_size``
    (bytes, default 64 MiB); ``arenas`` (reuse a shared ring for payloads over
    64 KiB, default True).

    Raises ServiceNotFound when nobody serves the name, NotPermitted when the
    socket or its directory is someone else's or the server is not trusted,
    IPCTimeoutError when the backlog stays full, InvalidArgument for a bad
    argument. After ``fork()`` the child's first call connects anew.
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
        connect_timeout: Optional[float] = _DEFAULT,  # type: ignore[assignment]
    ) -> None:
        self.name = name
        self._room_limits: object = _UNKNOWN  # see _refresh_room
        self.max_size = int_arg(max_size, "max_size")
        timeout = timeout_arg(timeout)
        if connect_timeout is not _DEFAULT:
            connect_timeout = timeout_arg(connect_timeout, "connect_timeout")
        # Who may answer: by default a server running as root or as this user,
        # checked on the connected socket's kernel identity (peer_of).
        self.server_policy = as_policy(server_policy) if server_policy is not None else Allowlist(uids={0, os.geteuid()})
        self._explicit_server_policy = server_policy is not None
        self.server_peer: Optional[Peer] = None
        self.timeout = timeout
        self._where = (directory, impl, self.timeout if connect_timeout is _DEFAULT else connect_timeout, arenas)
        self._ids = itertools.count(1)
        self._closed = False  # close() was called
        self._open()

    def _open(self) -> None:
        """Connect, with fresh per-connection state (at init, and in a fork()ed child)."""
        directory, impl, connect_timeout, arenas = self._where
        backend = transport.backend(impl)  # chosen there (machipc.transport)
        self.implementation: str = backend.implementation
        #: the socket connected to (machipc.naming's lookup order); on macOS the bootstrap name
        self._conn, self.path, self.server_peer = backend.open_client(
            self.name, directory=directory, timeout=self.timeout, connect_timeout=connect_timeout,
            server_policy=self.server_policy, explicit_policy=self._explicit_server_policy, max_size=self.max_size,
        )
        #: Large payloads go through a reused arena (machipc/arena.py); None: sealed memfds only.
        self._arenas = arena.ArenaSender() if arenas and hasattr(self._conn, "send_fd") else None
        self._pending: dict[int, _Pending] = {}
        self._recv_lock = threading.Lock()
        self._dead: Optional[IPCError] = None
        self._fork_generation = forking.generation
        self._room = 0  # largest message send() passes straight to the transport (_refresh_room)
        self._room_limits = _UNKNOWN

    @property
    def max_size(self) -> int:
        """Largest payload sent or accepted in a reply (bytes); larger sends raise MessageTooLarge."""
        return self._max_size

    @max_size.setter
    def max_size(self, value: int) -> None:
        self._max_size = value
        self._room_limits = _UNKNOWN  # send()'s fast path asks again

    def _refresh_room(self) -> None:
        """Once the server's limits are known (its HELLO was read; on macOS at once),
        remember the largest message ``send`` may pass straight to the transport, and
        for which limits (``send`` takes the long way when they change)."""
        limits = getattr(self._conn, "peer_limits", 0)
        if limits is not None:
            self._room = self._inline_limit()
            self._room_limits = limits

    def _forget_inherited(self) -> None:
        """In a fork()ed child: let go of the parent's connection without touching it.

        No shutdown (that would end the parent's connection too) and no lock (a
        parent thread may have held one at fork): dropping the last reference
        closes the child's copy of the fd; the arena's mapping is the parent's
        ring, so it is unmapped here, never written.
        """
        self._fork_generation = forking.generation
        self._conn = None
        inherited = self._arenas.arena if self._arenas is not None else None
        self._arenas = None
        if inherited is not None:
            try:
                inherited.close()
            except (BufferError, OSError):
                pass
        if self.server_peer is not None:
            self.server_peer.close()

    def _reconnect_after_fork(self) -> None:
        """First use in a fork()ed child: a connection of its own (see machipc.forking)."""
        self._forget_inherited()
        log.debug("client of %r used in a fork()ed child (pid %d): connecting anew", self.name, os.getpid())
        self._open()

    def _timeout(self, timeout) -> Optional[float]:
        return self.timeout if timeout is _DEFAULT else timeout

    @property
    def server_limits(self) -> Optional[Limits]:
        """The limits the server announced in its HELLO: None until a packet from the
        server has been read (the HELLO comes first), and on macOS."""
        return getattr(self._conn, "peer_limits", None)

    def _check(self, data: Buffer) -> None:
        if self._fork_generation != forking.generation and not self._closed:
            self._reconnect_after_fork()
        if self._dead is not None:
            raise type(self._dead)(*self._dead.args)
        self._check_size(len(data) if type(data) is bytes else payload.size_of(data))

    def _inline(self, data: Buffer) -> bool:
        """True when ``data`` is bytes that go out inline with no check failing (the hot path)."""
        if type(data) is not bytes or self._dead is not None or self._fork_generation != forking.generation:
            return False  # (a fork()ed child's first call reconnects in _check)
        size = len(data)
        if size > INLINE_MAX or size > self.max_size:
            return False
        limits = getattr(self._conn, "peer_limits", None)
        return limits is None or size <= limits.max_size

    def _learn_limits(self) -> None:
        """Before a one-way send while the server's limits are unknown: read its HELLO
        if it has come (one non-blocking read), so a message over the server's limit
        is refused here. No reply would ever tell a one-way sender; a request learns
        the limits from the HELLO that comes before its reply."""
        if self._fork_generation != forking.generation or not self._recv_lock.acquire(blocking=False):
            return  # the parent's connection (the call reconnects first), or a reader will see it
        try:
            got = self._conn.recv_nowait()  # the transport keeps a HELLO and reads on
            if got is not None:
                self._deliver(got)  # a reply or the end: whoever waits for it is told
        finally:
            self._recv_lock.release()
            self._wake_followers()  # a request that found the lock taken must not wait for us

    def _check_size(self, size: int) -> None:
        check_size(size, self.max_size, self.server_limits)

    def buffer(self, size: int) -> payload.LoanBuffer:
        """A writable ``size``-byte buffer to build a payload in place.

        ``with cli.buffer(n) as buf: fill(buf); cli.send(buf)`` sends it with no
        copy (the memory is sealed and handed to the server); it can be sent
        once, after every memoryview of it has been released.
        """
        return payload.loan(size, self.max_size)

    def send(self, data: Buffer, timeout: Optional[float] = _DEFAULT) -> None:  # type: ignore[assignment]
        """Send a one-way message; blocks up to ``timeout`` while the server's queue is full.

        ``data`` is bytes-like (or a :meth:`buffer`); ``timeout`` in seconds
        (None: no limit; default the client's). Raises IPCTimeoutError when the
        queue stays full, MessageTooLarge over ``max_size`` or the server's
        limit (from its HELLO, once the server has accepted the connection),
        PeerGone when the server left or the client was closed,
        InvalidArgument for a payload that is not bytes-like.
        """
        conn = self._conn
        if not (type(data) is bytes and len(data) <= self._room and self._dead is None
                and self._fork_generation == forking.generation and getattr(conn, "peer_limits", 0) is self._room_limits):
            # Not the hot path (bytes within the size checked for the limits known now): learn
            # the server's limits, check, or send out of band.
            if getattr(conn, "peer_limits", 0) is None:
                self._learn_limits()
            if not self._inline(data):
                self._check(data)
                try:
                    payload.send(self._conn, Kind.MESSAGE, 0, data, self._timeout(timeout), self.max_size, self._arenas)
                except PeerGone as exc:
                    raise self._gone(exc) from None
                return
            self._refresh_room()
        try:
            conn.send(_MESSAGE, 0, data, self.timeout if timeout is _DEFAULT else timeout)
        except PeerGone as exc:
            raise self._gone(exc) from None

    def send_many(self, messages: Iterable[Buffer], timeout: Optional[float] = _DEFAULT) -> int:  # type: ignore[assignment]
        """Send one-way messages in order; returns how many.

        Runs of ``bytes`` that fit inline go to the transport at once: several
        to a packet when the server's HELLO announced batches (BATCH packets,
        docs/protocol.md §5.4; the server hands each on as its own Message),
        else one packet each, ``sendmmsg`` in the Cython transport. Any other
        message (a bytearray, a memoryview, a :meth:`buffer`, a payload over
        64 KiB) goes as :meth:`send` would send it, in its place, so order is
        kept. ``timeout`` (seconds, None: no limit; default the client's)
        bounds each wait for queue space. Errors as :meth:`send`; a message
        that cannot be sent raises after the ones before it went out.
        """
        timeout = self._timeout(timeout)
        if self._fork_generation != forking.generation and not self._closed:
            self._reconnect_after_fork()
        if getattr(self._conn, "peer_limits", 0) is None:
            self._learn_limits()
        if self._dead is not None:
            raise type(self._dead)(*self._dead.args)
        send_many = getattr(self._conn, "send_many", None)  # (Mach has none: one by one)
        sent = 0
        for chunk in chunks(messages):
            done, count = 0, len(chunk)
            while done < count:
                if send_many is not None:
                    try:
                        done = send_many(chunk, timeout, done, self._inline_limit())
                    except PeerGone as exc:
                        raise self._gone(exc) from None
                    if done == count:
                        break
                self.send(chunk[done], timeout)  # not plain inline bytes: sent the way send() would
                done += 1
            sent += count
        return sent

    def _inline_limit(self) -> int:
        """Largest inline message allowed now (bytes): INLINE_MAX, our max_size, the server's."""
        limits = getattr(self._conn, "peer_limits", None)
        return min(INLINE_MAX, self.max_size, INLINE_MAX if limits is None else limits.max_size)

    def request(self, data: Buffer, timeout: Optional[float] = _DEFAULT) -> Reply:  # type: ignore[assignment]
        """Send a request and return the reply's payload.

        The reply is ``bytes`` up to 64 KiB (``wire.INLINE_MAX``); above, a
        read-only ``memoryview`` of the sealed memory the server sent (no copy;
        ``bytes(reply)`` copies it). ``timeout`` is in seconds (None: no limit;
        default the client's ``timeout``).

        Raises IPCTimeoutError if no reply comes within ``timeout``, Rejected if
        the server's policy refused us, RemoteError if its handler failed,
        PeerGone if the server went away, MessageTooLarge if ``data`` is over
        ``max_size``, InvalidArgument for a payload that is not bytes-like or a
        bad timeout.
        """
        timeout = self._timeout(timeout)
        if self._inline(data) and self._recv_lock.acquire(blocking=False):
            return self._call(data, timeout)
        self._check(data)
        deadline = deadline_of(timeout)
        rid = next(self._ids)
        slot = self._pending[rid] = _Pending()
        try:
            payload.send(self._conn, Kind.REQUEST, rid, data, timeout, self.max_size, self._arenas)
            self._wait(slot, deadline, timeout)
        except PeerGone as exc:
            raise self._gone(exc) from None
        finally:
            self._pending.pop(rid, None)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _call(self, data: bytes, timeout: Optional[float]) -> Reply:
        """A request's round trip in one transport call (``Conn.call``), the receive lock held.

        While we hold the lock no other thread reads, so the reply can only come
        to us: the request is registered in ``_pending`` only if another packet
        (a late reply, the connection's end) comes first.
        """
        rid = next(self._ids)
        slot: Optional[_Pending] = None
        try:
            try:
                deadline = deadline_of(timeout)  # InvalidArgument for a bad timeout: the lock is released
                got = self._conn.call(rid, data, timeout)
                if got.__class__ is bytes:  # the reply to this request, checked by the transport
                    return got
                while True:
                    if got is None:
                        raise IPCTimeoutError(f"no reply from {self.name!r} within {timeout} s")
                    decoded = decode_reply(self.name, got, self.server_policy)
                    if decoded[0] == rid:
                        if decoded[2] is not None:
                            raise decoded[2]
                        return decoded[1]  # type: ignore[return-value]
                    if slot is None:
                        slot = self._pending[rid] = _Pending()
                    self._finish(decoded)
                    if slot.done:
                        if slot.error is not None:
                            raise slot.error
                        return slot.result  # type: ignore[return-value]
                    got = self._conn.recv(remaining(deadline))
            except PeerGone as exc:
                raise self._gone(exc) from None
        finally:
            if slot is not None:
                self._pending.pop(rid, None)
            self._recv_lock.release()
            if self._pending:  # (a request registers before it tries the lock: none is missed)
                self._wake_followers()
            if self._closed:  # close() came while we were reading: release the socket now
                self._release()

    def _wait(self, slot: _Pending, deadline: Optional[float], timeout: Optional[float]) -> None:
        """Leader/follower: whoever holds the receive lock reads for everyone."""
        while not slot.done:
            if self._recv_lock.acquire(blocking=False):
                try:
                    while not slot.done:
                        got = self._conn.recv(remaining(deadline))
                        if got is None:
                            raise IPCTimeoutError(f"no reply from {self.name!r} within {timeout} s")
                        self._deliver(got)
                finally:
                    self._recv_lock.release()
                    self._wake_followers()
                    if self._closed:  # close() came while we were reading: release the socket now
                        self._release()
                return
            if slot.event is None:
                slot.event = threading.Event()
                if slot.done:
                    return
            if not slot.event.wait(remaining(deadline)):
                if not slot.done:
                    raise IPCTimeoutError(f"no reply from {self.name!r} within {timeout} s")
            slot.event.clear()

    def _wake_followers(self) -> None:
        # The leader left: let a waiting thread take over reading.
        for pending in list(self._pending.values()):
            if pending.event is not None and not pending.done:
                pending.event.set()

    def _deliver(self, got: Received) -> None:
        self._finish(decode_reply(self.name, got, self.server_policy))

    def _finish(self, decoded: tuple) -> None:
        """Hand a decoded packet (decode_reply) to the request waiting for it."""
        rid, result, error = decoded
        if rid < 0:  # the connection ended: every waiting request fails
            if not self._closed:  # else our own close() ended it, and _dead says so
                self._dead = error
            for pending in list(self._pending.values()):
                pending.finish(None, PeerGone(*self._dead.args))
            return
        slot = self._pending.get(rid)
        if slot is None:
            log.debug("late reply %d discarded (its request timed out)", rid)
            return
        slot.finish(result, error)

    def close(self) -> None:
        """Disconnect and release the socket (idempotent; safe from any thread).

        Calls blocked in other threads (``request``, ``send`` into a full queue)
        and every later call raise PeerGone saying the client was closed.
        """
        self._closed = True
        if self._fork_generation != forking.generation:  # the connection is the parent's
            self._forget_inherited()
            self._dead = PeerGone(f"the client was closed (service {self.name!r})")
            return
        if self._dead is None:
            self._dead = PeerGone(f"the client was closed (service {self.name!r})")
        self._conn.shutdown()  # wakes any thread blocked on it (they see EOF or PeerGone)
        self._release()
        if self.server_peer is not None:
            self.server_peer.close()  # its pidfd
        if self._arenas is not None:
            self._arenas.close()

    def _release(self) -> None:
        """Close the connection unless a thread is reading (that one calls this on its way out).

        (The Mach port set must not go while a thread waits on it; on Linux the
        fd itself closes once no thread is inside a call on it.)
        """
        if self._recv_lock.acquire(blocking=False):
            try:
                self._conn.close()
            finally:
                self._recv_lock.release()
                self._wake_followers()  # a request that found the lock taken: it reads the end itself

    def _gone(self, exc: PeerGone) -> PeerGone:
        """What a call that saw ``exc`` raises: "the client was closed" when it was."""
        return PeerGone(*self._dead.args) if self._closed and self._dead is not None else exc

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<machipc.Client {self.name!r} at {self.path} ({self.implementation})>"
