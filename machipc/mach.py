"""macOS transport: machipc messages carried in Mach messages.

Provides the transport interface documented in ``machipc/unix.py`` on top of
the Cython primitives of ``machipc._mach`` (built on macOS only):

* :func:`server_transport` checks the service name in with the bootstrap
  server (a launchd ``MachServices`` name, or a fresh name in a plain process)
  and receives from it. Each request carries a send-once reply right
  (``MAKE_SEND_ONCE``); the ``conn`` handed out with it answers through that
  right (``MOVE_SEND_ONCE``), exactly once.
* :func:`client_conn` looks the name up and sends to it. Every outstanding
  request has its own reply port (kept in a port set, reused after its one
  answer), so when the server drops a reply right unanswered the kernel's
  ``MACH_NOTIFY_SEND_ONCE`` names the request that will never be answered and
  the caller gets an error instead of waiting for its timeout.

Every received message is validated by :func:`machipc.machmsg.parse` before
use, and its sender comes from the kernel's audit trailer (never cached per
connection): each received record's ``peer`` (machipc.received) is a ready-made
:class:`~machipc.peer.Peer` built by ``Peer.from_audit_token`` (pid, euid,
egid; ``guard`` = pidversion, ``guard_kind`` = ``"pidversion"``).
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Optional

from .errors import InvalidArgument, NotPermitted, PeerGone, ServiceInUse
from .machmsg import (
    BOOTSTRAP_NOT_PRIVILEGED,
    BOOTSTRAP_SERVICE_ACTIVE,
    MACH_MSG_TYPE_COPY_SEND,
    MACH_MSG_TYPE_MAKE_SEND_ONCE,
    MACH_MSG_TYPE_MOVE_SEND_ONCE,
    MACH_PORT_QLIMIT_MAX,
    OFF_WIRE_LENGTH,
    REJECT_DROP,
    AuditToken,
    Reject,
    SendInterrupted,
)
from .peer import Peer
from .received import Received, take_many
from .deadline import deadline_of, remaining
from .wire import (
    CLIENT_ACCEPTS,
    HEADER_SIZE,
    SERVER_ACCEPTS,
    VERSION,
    Drop,
    ErrorCode,
    Flag,
    Kind,
    check_header,
    pack_error,
    pack_header,
)

try:
    from . import _mach  # type: ignore[attr-defined]
except ImportError:  # not macOS, or the extension was not built
    _mach = None

__all__ = ["IMPLEMENTATION", "ServerTransport", "Conn", "server_transport", "client_conn", "peer_of"]

IMPLEMENTATION = "mach"
_ids = itertools.count(1)


def _need_mach():
    if _mach is None:
        raise ImportError("machipc._mach (the Mach transport) is not built: it exists on macOS only")
    return _mach


def peer_of(audit: AuditToken) -> Peer:
    """The Peer of a message's audit token: pid, euid, egid, guard = pidversion.

    ``exe`` and liveness go through ``proc_pidpath_audittoken`` (machipc.peer),
    which fails rather than answer for a later process reusing the pid.
    """
    return Peer.from_audit_token(tuple(audit))


def _split(inline: bytes, region, accepted: frozenset) -> tuple:
    """(status, kind, flags, request_id, payload) of a message machmsg.parse accepted."""
    if region is not None:
        # OOL: the inline part is the bare wire header; machmsg checked its length
        # against the descriptor, so check the rest with the length zeroed.
        hdr = bytearray(inline[:HEADER_SIZE])
        hdr[OFF_WIRE_LENGTH : OFF_WIRE_LENGTH + 8] = bytes(8)
        status, header = check_header(bytes(hdr), accepted)
        payload = memoryview(region) if status == Drop.OK else b""
    else:
        status, header = check_header(inline, accepted)
        payload = inline[HEADER_SIZE:]
    if header is None:
        return status, 0, 0, 0, b""
    if status == Drop.OK and header.flags & _LINUX_ONLY_FLAGS:
        # PAYLOAD_FD / ARENA describe an fd or an arena reference that a Mach message
        # cannot carry: taken as data they would hand the handler a wrong payload.
        status = Drop.BAD_FLAGS
    return status, header.kind, header.flags, header.request_id, payload if status == Drop.OK else b""


#: Wire flags of the Linux transport only (sealed memfds, arenas, batches: no Mach server announces
#: FEATURE_BATCH, having no HELLO): refused on Mach.
_LINUX_ONLY_FLAGS = int(Flag.PAYLOAD_FD | Flag.ARENA | Flag.BATCH)
#: One lock for every ReplyConn's take-the-right step (held for two attribute accesses).
_take_lock = threading.Lock()


def _settle(kq) -> None:
    """The port set is empty: let its kqueue fd go unreadable.

    A kqueue fd is readable while a knote is queued on it (``kq_count > 0``:
    filt_kqueue / kqueue_select, xnu bsd/kern/kern_event.c), and receiving the
    message with mach_msg does not dequeue the EVFILT_MACHPORT knote; only a
    kevent() on that kqueue does, where filt_machportprocess (xnu
    osfmk/ipc/ipc_pset.c) re-checks the set and drops the knote once it is empty
    (it stays if a message came meanwhile, so no wakeup is lost). Without this
    asyncio's level-triggered reader would be called forever: a busy loop.
    """
    if kq is not None:
        kq.drain()


class _OneWay:
    """The ``conn`` of one-way messages: there is no way back."""

    id = 0
    order_by_sender = True  # workers.connection_key: there is no per-client connection

    def send(self, kind, request_id, payload, timeout, version=VERSION) -> None:
        raise InvalidArgument("a one-way message (Client.send) has no reply path")

    def shutdown(self) -> None:
        pass

    def close(self) -> None:
        pass


ONE_WAY = _OneWay()


class ReplyConn:
    """The reply path of one request: a send-once right, used (or dropped) once.

    Dropping it unanswered (``close``, or garbage collection) makes the kernel
    send ``MACH_NOTIFY_SEND_ONCE`` to the client, which then fails the request.
    """

    __slots__ = ("id", "_port", "_gen", "__weakref__")
    order_by_sender = True  # a conn per request: workers.connection_key orders by sender instead

    def __init__(self, port: int) -> None:
        self.id = next(_ids)
        self._port = port
        self._gen = _mach.generation()

    def _take(self) -> int:
        """The right, now this caller's alone (two threads answering one request: one wins)."""
        with _take_lock:
            port, self._port = self._port, 0
        return port

    def send(self, kind: int, request_id: int, payload, timeout: Optional[float], version: int = VERSION) -> None:
        port = self._take()
        if not port:
            raise PeerGone("this request was already answered (its send-once reply right is used)")
        _mach.send(port, MACH_MSG_TYPE_MOVE_SEND_ONCE, 0, 0, pack_header(kind, request_id, len(payload), 0, version), payload,
                   timeout, gen=self._gen)

    def shutdown(self) -> None:
        self.close()

    def close(self) -> None:
        port = self._take()
        if port and self._gen == _mach.generation():
            _mach.deallocate(port)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


#: A name this process closed is retried this long on BOOTSTRAP_SERVICE_ACTIVE (seconds).
RECHECK_IN_SECONDS = 2.0
_closed_at: dict[str, float] = {}  # service name -> time.monotonic() this process closed it


def _check_in(m, name: str) -> int:
    """``bootstrap_check_in``, telling "already served" from "not allowed here".

    launchd answers BOOTSTRAP_NOT_PRIVILEGED both when another process holds the
    name ("tried to hijack the service", job_mig_check_in2 in the last open-source
    launchd) and in a dead login session's namespace; a look-up tells them apart:
    it succeeds only when someone serves the name. A name this process closed
    moments ago can still read as its own (BOOTSTRAP_SERVICE_ACTIVE) until launchd
    has processed the port's dead-name notification: that is retried briefly.
    """
    recheck_until = _closed_at.get(name, -RECHECK_IN_SECONDS) + RECHECK_IN_SECONDS
    while True:
        try:
            return _check_in_once(m, name)
        except ServiceInUse as exc:
            if getattr(exc, "kern_return", None) != BOOTSTRAP_SERVICE_ACTIVE or time.monotonic() >= recheck_until:
                raise
            time.sleep(0.01)


def _check_in_once(m, name: str) -> int:
    try:
        return m.check_in(name)
    except NotPermitted as exc:
        if getattr(exc, "kern_return", None) != BOOTSTRAP_NOT_PRIVILEGED:
            raise
        try:
            held = m.look_up(name)
        except Exception:
            raise exc from None
        m.deallocate(held)
        raise ServiceInUse(
            f"bootstrap_check_in({name!r}): BOOTSTRAP_NOT_PRIVILEGED and the name is served: another process "
            "(a second copy of this server?) has checked it in; stop it or choose another name. Under launchd "
            "only the job whose plist lists the name in MachServices may check it in"
        ) from None


class ServerTransport:
    """Receives every machipc message sent to a checked-in service name.

    Every message carries its own audit token and so is judged by the server:
    there are no connections to cache an admission on (machipc.transport).
    """

    #: What Server bumps to void cached admissions, and what they counted: none here.
    epoch = 0
    rejected_pending = 0

    def __init__(self, name: str, *, queue_limit: int = MACH_PORT_QLIMIT_MAX) -> None:
        m = _need_mach()
        if not 1 <= queue_limit <= MACH_PORT_QLIMIT_MAX:
            raise InvalidArgument(f"queue_limit must be between 1 and {MACH_PORT_QLIMIT_MAX}, not {queue_limit}")
        self.name = name
        self._gen = m.generation()
        self._port = _check_in(m, name)
        self._wake = self._set = 0
        self._kq = None
        try:
            m.set_queue_limit(self._port, queue_limit)
            self._wake = m.allocate_receive()
            m.make_send(self._wake)
            self._set = m.allocate_port_set()
            m.move_member(self._port, self._set)
            m.move_member(self._wake, self._set)
            self._rx = m.Receiver(self._wake)
        except BaseException:
            self.close()
            raise

    @property
    def connections(self) -> int:
        """Mach has no connections: always 0."""
        return 0

    def fileno(self) -> int:
        """A kqueue fd (EVFILT_MACHPORT) readable while a message waits: for ``loop.add_reader``."""
        if self._kq is None:
            self._kq = _mach.KQueue(self._set)
        return self._kq.fileno()

    def recv(self, timeout: Optional[float]) -> Optional[Received]:
        """Next message (see machipc/unix.py); None on timeout or after ``wakeup()``."""
        got = self._rx.recv(self._set, timeout, False)
        if got is None:
            _settle(self._kq)
            return None
        reason, parsed, inline, region, reply = got
        if reason == _mach.WOKEN:
            return None
        if reason == _mach.TOO_LARGE:
            return Received(Drop.TRUNCATED, ONE_WAY)
        audit = parsed.audit if parsed is not None else None
        pid, uid, gid = (audit.pid, audit.euid, audit.egid) if audit is not None else (0, 0, 0)
        if reason != Reject.OK:
            return Received(REJECT_DROP[Reject(reason)], ONE_WAY, 0, 0, 0, b"", pid, uid, gid)
        conn = ReplyConn(reply) if reply else ONE_WAY
        status, kind, flags, request_id, payload = _split(inline, region, SERVER_ACCEPTS)
        if status == Drop.OK and (kind == Kind.REQUEST) != bool(reply):
            status, payload = Drop.BAD_REQUEST_ID, b""  # a request without a reply right, or a message with one
            if kind != Kind.REQUEST:
                conn.close()
                conn = ONE_WAY
        if status != Drop.OK:
            if region is not None:
                payload = b""
                try:
                    region.release()
                except BufferError:
                    pass
            return Received(status, conn, kind, flags, request_id, b"", pid, uid, gid)
        return Received(Drop.OK, conn, kind, flags, request_id, payload, pid, uid, gid, peer=peer_of(audit))

    def disconnect(self, conn) -> None:
        """Drop ``conn``'s reply right (the client sees its request fail)."""
        conn.close()

    def recv_many(self, max_count: int, timeout: Optional[float]) -> list:
        """Up to ``max_count`` messages, waiting up to ``timeout`` only for the first (machipc.unix)."""
        return take_many(self.recv, max_count, timeout)

    def take_rejected(self) -> list:
        """Packets rejected without the server: none (see the class doc)."""
        return []

    def wakeup(self) -> None:
        """Make a blocked ``recv`` return None soon (safe from any thread or signal handler)."""
        if self._wake and self._gen == _mach.generation():
            _mach.send_wake(self._wake)

    def close(self) -> None:
        """Give the name back and release every right; only when no thread is inside ``recv``."""
        m = _mach
        if self._gen != m.generation():
            return  # inherited across fork(): these names mean nothing here
        if self._kq is not None:
            self._kq.close()
            self._kq = None
        if self._port:
            m.destroy_receive(self._port)
            self._port = 0
            _closed_at[self.name] = time.monotonic()
        if self._wake:
            m.deallocate(self._wake)  # our send right
            m.destroy_receive(self._wake)
            self._wake = 0
        if self._set:
            m.destroy_port_set(self._set)
            self._set = 0


class Conn:
    """A client's path to one service: requests, one-way messages, and their replies."""

    def __init__(self, name: str, timeout: Optional[float] = None) -> None:
        m = _need_mach()
        self.id = next(_ids)
        self.name = name
        self.timeout = timeout
        self._gen = m.generation()
        self._lock = threading.Lock()
        self._free: list[int] = []  # reply ports whose one right was answered: reusable
        self._waiting: dict[int, int] = {}  # reply port -> request id
        self._closed = False
        self._kq = None
        self._service = self._wake = self._set = 0
        self._service = m.look_up(name)
        try:
            self._set = m.allocate_port_set()
            self._wake = m.allocate_receive()
            m.make_send(self._wake)
            m.move_member(self._wake, self._set)
            self._rx = m.Receiver(self._wake)
        except BaseException:
            self.close()
            raise

    def _reply_port(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
        port = _mach.allocate_receive()
        _mach.move_member(port, self._set)
        return port

    def send(self, kind: int, request_id: int, payload, timeout: Optional[float]) -> None:
        """Send a MESSAGE, or a REQUEST with a fresh send-once reply right.

        A signal while waiting for queue space runs its handlers (MACH_SEND_INTERRUPT)
        and the send is tried again for the time left (PEP 475); a handler that
        raises ends it.
        """
        deadline = deadline_of(timeout)
        while True:
            try:
                return self._send(kind, request_id, payload, timeout)
            except SendInterrupted:
                timeout = remaining(deadline)

    def _send(self, kind: int, request_id: int, payload, timeout: Optional[float]) -> None:
        if self._closed:
            raise PeerGone(f"the connection to {self.name!r} is closed")
        header = pack_header(kind, request_id, len(payload))
        if kind != Kind.REQUEST:
            _mach.send(self._service, MACH_MSG_TYPE_COPY_SEND, 0, 0, header, payload, timeout, gen=self._gen)
            return
        port = self._reply_port()
        with self._lock:
            self._waiting[port] = request_id
        try:
            _mach.send(self._service, MACH_MSG_TYPE_COPY_SEND, port, MACH_MSG_TYPE_MAKE_SEND_ONCE, header, payload,
                       timeout, gen=self._gen)
        except BaseException:
            with self._lock:
                self._waiting.pop(port, None)
            _mach.destroy_receive(port)  # whatever became of the right, this port is not reused
            raise

    def call(self, request_id: int, payload, timeout: Optional[float]) -> Optional[Received]:
        """Send a REQUEST, then wait for the next reply (``timeout`` bounds both; see unix.Conn.call)."""
        deadline = deadline_of(timeout)
        self.send(Kind.REQUEST, request_id, payload, timeout)
        return self.recv(remaining(deadline))

    def recv(self, timeout: Optional[float]) -> Optional[Received]:
        """Next reply (see machipc/unix.py); None on timeout; ``Drop.CLOSED`` after ``shutdown``."""
        got = self._rx.recv(self._set, timeout, True)
        if got is None:
            _settle(self._kq)
            return None
        reason, parsed, inline, region, reply = got
        if reason == _mach.WOKEN:
            if self._closed:
                return Received(Drop.CLOSED, self)
            return None
        if reason == _mach.TOO_LARGE:
            return Received(Drop.TRUNCATED, self)
        rid = None
        if parsed is not None:
            with self._lock:
                rid = self._waiting.pop(parsed.local_port, None)
                if rid is not None:
                    self._free.append(parsed.local_port)  # its only right was just used up
        audit = parsed.audit if parsed is not None else None
        pid, uid, gid = (audit.pid, audit.euid, audit.egid) if audit is not None else (0, 0, 0)
        if reason != Reject.OK:
            return Received(REJECT_DROP[Reject(reason)], self, 0, 0, rid or 0, b"", pid, uid, gid)
        if parsed.notification:
            text = (
                f"the server of {self.name!r} dropped request {rid} without answering (MACH_NOTIFY_SEND_ONCE): "
                "it refused the message as malformed, its handler never replied, or it exited"
            )
            return Received(Drop.OK, self, Kind.ERROR, 0, rid or 0, pack_error(ErrorCode.SHUTTING_DOWN, text))
        if reply:
            _mach.deallocate(reply)  # a reply never carries a reply right of its own
        status, kind, flags, request_id, payload = _split(inline, region, CLIENT_ACCEPTS)
        if status == Drop.OK and rid is not None and request_id != rid:
            status, payload = Drop.BAD_REQUEST_ID, b""  # answered on another request's port
            request_id = rid
        return Received(status, self, kind, flags, request_id, payload, pid, uid, gid,
                        peer=peer_of(audit) if status == Drop.OK else None)

    def recv_nowait(self) -> Optional[Received]:
        """One reply if one is queued, else None (for asyncio readers)."""
        return self.recv(0)

    def fileno(self) -> int:
        """A kqueue fd (EVFILT_MACHPORT) readable while a reply waits: for ``loop.add_reader``."""
        if self._kq is None:
            self._kq = _mach.KQueue(self._set)
        return self._kq.fileno()

    def shutdown(self) -> None:
        """Stop: a thread blocked in ``recv`` returns ``Drop.CLOSED``; sends raise PeerGone."""
        self._closed = True
        if self._wake and self._gen == _mach.generation():
            _mach.send_wake(self._wake)

    def close(self) -> None:
        """Release every right (only when no thread is inside ``recv``)."""
        self._closed = True
        m = _mach
        if self._gen != m.generation():
            return
        if self._kq is not None:
            self._kq.close()
            self._kq = None
        with self._lock:
            ports = self._free + list(self._waiting)
            self._free, self._waiting = [], {}
        for port in ports:
            m.destroy_receive(port)
        if self._wake:
            m.deallocate(self._wake)
            m.destroy_receive(self._wake)
            self._wake = 0
        if self._set:
            m.destroy_port_set(self._set)
            self._set = 0
        if self._service:
            m.deallocate(self._service)
            self._service = 0


def server_transport(name: str, *, queue_limit: int = MACH_PORT_QLIMIT_MAX) -> ServerTransport:
    """Check ``name`` in and return its transport (what ``Server`` uses on macOS)."""
    return ServerTransport(name, queue_limit=queue_limit)


def client_conn(name: str, timeout: Optional[float]) -> Conn:
    """Look ``name`` up and return a connection (what ``Client`` uses on macOS).

    ``bootstrap_look_up`` does not block on the server, so ``timeout`` is only
    kept as the connection's default.
    """
    return Conn(name, timeout)

