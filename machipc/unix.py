"""Linux transport, pure-Python implementation (the twin of ``_unix.pyx``).

AF_UNIX ``SOCK_SEQPACKET``: one packet is one machipc message. The server
socket has ``SO_PASSCRED`` set before ``listen()`` so every accepted
connection inherits it and every packet arrives with the kernel's
``SCM_CREDENTIALS`` (pid, uid, gid at send time).

Pinning the sender against pid reuse: at accept the transport takes a pidfd of
the connecting process (``SO_PEERPIDFD``). A packet whose credentials carry
that pid is from that process as long as the pidfd shows it alive (or a
zombie) *after* the packet was dequeued: it was alive from connect() to now,
so no other process could hold its pid when the packet was sent. That is one
``pidfd_send_signal(fd, 0)`` per packet instead of a new pidfd. A packet from
any other pid (the socket was passed on, or inherited by a child) turns on
``SO_PASSPIDFD`` for that connection, so later packets carry their own
``SCM_PIDFD``; the packet itself stays unpinned (pidfd -1), and so does one
that arrives after the pinned process died.

Both implementations expose the same classes and hand up the same records:
``Conn.recv(timeout)`` and ``ServerTransport.recv(timeout)`` return ``None`` on
timeout, else a :class:`machipc.received.Received` whose ``pidfd`` is

* ``>= 0``: a new pidfd the caller now owns,
* ``-1``: the kernel sent none (old kernel, or the sender is already reaped),
* ``SAME_PEER`` (-2): same process as the previous packet on this connection
  (the duplicate pidfd was closed; reuse the Peer made for that packet).
"""

from __future__ import annotations

import array
import errno
import fcntl
import functools
import itertools
import os
import signal
import select
import socket
import struct
import threading
import time
from collections import deque
from typing import Optional, Union

from .deadline import deadline_of, remaining
from .errors import IPCError, IPCTimeoutError, MessageTooLarge, PeerGone, error_from_errno
from . import arena
from ._closer import close_all_received, close_later, connection_owner
from .budget import Account, ConnLimits
from .outbox import REPLY_QUEUE_BYTES, Outbox
from .payload import MAX_PAYLOAD, Untaken, map_sealed
from .peer import OVERFLOW_GID, OVERFLOW_UID
from .message import Message as _Message
from .received import SAME_PEER, Received, take_many
from .wire import (
    ARENA_REF_SIZE,
    BATCH_ITEM_SIZE,
    CLIENT_ACCEPTS,
    HEADER_SIZE,
    INLINE_MAX,
    PACKET_MAX,
    SERVER_ACCEPTS,
    VERSION,
    Drop,
    Flag,
    Kind,
    Limits,
    batch_count,
    batch_room,
    check_header,
    pack_batch,
    pack_header,
    split_batch,
    unpack_hello,
)

__all__ = ["Conn", "ServerTransport", "SO_PASSPIDFD", "SCM_PIDFD", "IMPLEMENTATION"]

IMPLEMENTATION = "py"
#: The Message type this transport's fast path builds (the server builds the same for the rest).
Message = _Message
_COUNTED = object()  # a packet a cached admission rejected and counted (ServerTransport.recv)

SO_PASSPIDFD = 76
SO_PEERPIDFD = 77
#: Seconds the listener is left alone after accept ran out of fds.
ACCEPT_PAUSE = 0.1
SCM_PIDFD = 4
ARENA_PACKET = HEADER_SIZE + ARENA_REF_SIZE
_UCRED = struct.Struct("=iII")
#: Room for credentials, a pidfd and up to 253 unexpected fds (so they can be closed).
CMSG_SPACE = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(4) + socket.CMSG_SPACE(253 * 4)
_PEEK_CMSG = socket.CMSG_SPACE(_UCRED.size)
_ids = itertools.count(1)
_POLL_EVERY = 64  # poll epoll at least this often while connections stay ready


def _sealable(fd: int) -> bool:
    """A memfd (shmem or hugetlbfs): the only kind of fd the protocol sends, and one whose close cannot block."""
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return True


def _send_failed(exc: OSError) -> IPCError:
    """The error a failed ``sendmsg`` raises: PeerGone once the peer or our socket is gone."""
    if isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionRefusedError)):
        return PeerGone(f"send: the peer closed the connection ({exc.strerror})")
    if exc.errno == errno.EBADF:
        return PeerGone("send: the connection is closed")
    return error_from_errno(exc.errno, "send")


class Conn:
    """One connected SEQPACKET socket: a client's, or one accepted by a server.

    The socket is closed when the last reference goes, so a reply can never
    reach a different client that got the same fd number later.
    """

    def __init__(self, sock: socket.socket, server_side: bool, pidfs: bool) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.id = next(_ids)
        self.fd = sock.fileno()
        self._server_side = server_side
        self._busy = 0  # threads inside a call on the socket (see close())
        self._close_pending = False
        self._busy_lock = threading.Lock()
        self._accepted = SERVER_ACCEPTS if server_side else CLIENT_ACCEPTS
        self._pidfs = pidfs
        self._last: Optional[tuple[int, int, int, int]] = None  # pid, uid, gid, pidfd inode
        #: Largest memfd payload this side maps (bigger ones are dropped as OVERSIZE).
        self.max_payload = MAX_PAYLOAD
        self.arenas: dict = {}  # the peer's arenas: id -> mapping
        #: The server's limits from its HELLO (client side; None until it is read).
        self.peer_limits: Optional[Limits] = None
        #: Largest BATCH body the server takes (wire.batch_room of its HELLO); 0: send no batches.
        self.batch_room = 0
        #: Server side: replies waiting for the peer to read (machipc.outbox); None on clients.
        self.outbox: Optional[Outbox] = None
        #: Server side: the MappedBudget payloads and arenas are charged to (None: no limit),
        #: and this connection's account in it.
        self.budget = None
        self.account = Account()
        #: Server side: the uid that connected (SO_PEERCRED): owner of the fds it leaves to close.
        self.peer_uid = -1
        # The process that connected, pinned at accept (see the module doc).
        self._peer_pid = 0
        self._peer_pidfd = -1
        self._peer_ino = 0
        self._pidfd_per_packet_on = False
        # Server side: the cached admission of the connection's last sender (cache_admission).
        self._admit_peer = None
        self._admit_decision = None
        self._admit_allowed = False
        self._admit_epoch = 0
        self._reject_budget = -1
        self.fast_rejected = 0  # counted by the fast path, not yet taken (ServerTransport.take_rejected)

    def send(self, kind: int, request_id: int, payload: bytes, timeout: Optional[float], version: int = VERSION) -> None:
        """Send one packet, waiting up to ``timeout`` while the peer's queue is full
        (``version``: the header's, for an ERROR answering another version).

        Server side, unless ``timeout`` is 0: never waits; a packet the peer's
        socket has no room for waits in ``outbox`` (may raise UnreadReplies).
        """
        size = len(payload) if type(payload) is bytes else memoryview(payload).nbytes
        header = pack_header(kind, request_id, size, 0, version)
        if self.outbox is not None and timeout != 0:
            self.outbox.send(self, header, payload)
            return
        self._sendmsg([header, payload], [], timeout)

    def send_many(self, payloads: list, timeout: Optional[float], start: int = 0, limit: int = INLINE_MAX) -> int:
        """Send one-way messages ``payloads[start:]`` in order, up to the first that is not
        ``bytes`` of at most ``limit`` bytes (``limit`` is capped at INLINE_MAX).

        Returns the index of the first message not sent: that one, or
        ``len(payloads)`` when all went. Once the server's HELLO announced
        FEATURE_BATCH, as many messages as fit go in one BATCH packet
        (docs/protocol.md §5.4), else one packet each (the Cython twin sends
        several packets per ``sendmmsg``). Waits up to ``timeout`` seconds
        (for the whole call; None: no limit) while the server's queue is full,
        then raises IPCTimeoutError saying how many went; ``timeout`` 0 never
        waits and returns at the first packet that found the queue full.
        Raises PeerGone when the connection is gone.
        """
        limit = min(limit, INLINE_MAX)
        end, count = start, len(payloads)
        while end < count and type(payloads[end]) is bytes and len(payloads[end]) <= limit:
            end += 1
        deadline = deadline_of(timeout)
        done = start
        for items in _batches(payloads, start, end, self.batch_room):
            if len(items) == 1:
                buffers = [pack_header(Kind.MESSAGE, 0, len(items[0])), items[0]]
            else:
                body = pack_batch(items)
                buffers = [pack_header(Kind.MESSAGE, 0, len(body), Flag.BATCH), body]
            try:
                self._sendmsg(buffers, [], remaining(deadline))
            except IPCTimeoutError:
                if timeout == 0:
                    return done
                raise IPCTimeoutError(f"send_many: the peer's queue stayed full for {timeout} s ({done - start} of {end - start} sent)") from None
            done += len(items)
        return end

    def send_fd(
        self, kind: int, request_id: int, length: int, fd: int, timeout: Optional[float],
        flags: int = Flag.PAYLOAD_FD, body: bytes = b"",
    ) -> None:
        """Send a header for an out-of-band payload of ``length`` bytes, with ``body``
        and, when ``fd`` >= 0, the fd attached (a sealed memfd, or a new arena)."""
        header = pack_header(kind, request_id, length, flags)
        if self.outbox is not None and timeout != 0:
            self.outbox.send(self, header, body, fd, length if fd >= 0 else 0)
            return
        self._sendmsg([header, body], _rights(fd), timeout)

    def try_send(self, header: bytes, body, fd: int = -1) -> bool:
        """One non-blocking send of a packet (``fd`` attached if >= 0); False when the socket is full."""
        self._enter()
        try:
            self.sock.sendmsg([header, body], _rights(fd))
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _send_failed(exc) from None
        finally:
            self._leave()

    def _enter(self) -> None:
        """Claim the socket for a call that may block; pair with _leave() (see close())."""
        with self._busy_lock:
            if self._close_pending or self.sock.fileno() < 0:
                raise PeerGone("the connection is closed")
            self._busy += 1

    def _leave(self) -> None:
        with self._busy_lock:
            self._busy -= 1
            if self._busy or not self._close_pending:
                return
        self._release_fd()

    def _release_fd(self) -> None:
        """Close the socket. A server's end goes to the closer: its queue may hold a
        peer's fds, whose release would run (and may block) in the closing thread."""
        if not self._server_side:
            self.sock.close()
            return
        try:
            fd = self.sock.detach()
        except OSError:
            return
        if fd >= 0:
            close_later(fd, connection_owner(self.peer_uid))

    def _sendmsg(self, buffers: list, ancdata: list, timeout: Optional[float]) -> None:
        self._enter()
        try:
            self._sendmsg_claimed(buffers, ancdata, timeout)
        finally:
            self._leave()

    def _sendmsg_claimed(self, buffers: list, ancdata: list, timeout: Optional[float]) -> None:
        deadline = deadline_of(timeout)
        while True:
            try:
                self.sock.sendmsg(buffers, ancdata)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _send_failed(exc) from None
            left = remaining(deadline)
            if left == 0.0:
                raise IPCTimeoutError(f"send: the peer's queue stayed full for {timeout} s")
            poller = select.poll()
            poller.register(self.fd, select.POLLOUT)
            poller.poll(None if left is None else max(1, int(left * 1000)))

    def recv_nowait(self) -> Optional[Received]:
        """Receive one packet if one is queued (None if not); see the module doc."""
        try:
            self._enter()
        except PeerGone:
            return Received(Drop.CLOSED, self)
        try:
            return self._recv_claimed()
        finally:
            self._leave()

    def _recv_claimed(self) -> Optional[Received]:
        while True:
            try:
                data, anc, msg_flags, _ = self.sock.recvmsg(PACKET_MAX, CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return None
            except (ConnectionResetError, BrokenPipeError):
                # The peer left with our replies unread: the error is reported once, ahead
                # of the packets it sent before leaving. Read on; EOF comes after them.
                continue
            if not data and not anc:
                return Received(Drop.CLOSED, self)
            got = self._parse(data, anc, msg_flags)
            if got.status == Drop.OK and got.kind == Kind.HELLO:  # only a client accepts HELLO
                self.peer_limits = limits = unpack_hello(got.payload)  # kept on the connection, not handed on
                self.batch_room = batch_room(limits)
                continue
            return got

    def call(self, request_id: int, payload: bytes, timeout: Optional[float]) -> Union[Received, bytes, None]:
        """Client side: send a REQUEST of inline ``payload``, then wait for the next packet.

        ``timeout`` (seconds, None: no limit) bounds the send and the wait
        together. Returns the reply's payload (``bytes``) when the next packet
        is a valid inline REPLY to ``request_id``, the common case; else what
        ``recv`` returns (None when the time ran out), for the caller to match:
        a late reply to an earlier request, an error, a large reply, or the
        connection's end.
        """
        deadline = deadline_of(timeout)
        size = len(payload) if type(payload) is bytes else memoryview(payload).nbytes
        if size > INLINE_MAX:
            raise MessageTooLarge(f"call: {size} bytes do not fit inline")
        self._sendmsg([pack_header(Kind.REQUEST, request_id, size), payload], [], timeout)
        got = self._recv_until(deadline)
        if (got is not None and got.status == Drop.OK and got.kind == Kind.REPLY and got.request_id == request_id
                and got.flags == 0 and got.pidfd < 0 and type(got.payload) is bytes):
            return got.payload
        return got

    def recv(self, timeout: Optional[float]) -> Optional[Received]:
        """Wait up to ``timeout`` for one packet (None on timeout)."""
        return self._recv_until(deadline_of(timeout))

    def _recv_until(self, deadline: Optional[float]) -> Optional[Received]:
        try:
            self._enter()
        except PeerGone:
            return Received(Drop.CLOSED, self)
        try:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            while True:
                got = self._recv_claimed()
                if got is not None:
                    return got
                left = remaining(deadline)
                if left == 0.0:
                    return None
                poller.poll(None if left is None else max(1, int(left * 1000)))
        finally:
            self._leave()

    def _parse(self, data: bytes, anc: list, msg_flags: int) -> Received:
        pid = uid = gid = 0
        pidfd = -1
        fds: list[int] = []
        status = Drop.OK
        creds = False
        for level, kind, cdata in anc:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_CREDENTIALS and len(cdata) >= _UCRED.size:
                pid, uid, gid = _UCRED.unpack_from(cdata)
                creds = True
            elif kind == SCM_PIDFD and len(cdata) >= 4 and pidfd == -1:
                pidfd = struct.unpack_from("i", cdata)[0]
            elif kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(cdata[: len(cdata) - len(cdata) % received.itemsize])
                fds.extend(fd for fd in received if fd >= 0)
        if pidfd < -1:
            pidfd = -1  # the kernel reports a failed pidfd as a negative errno
        if msg_flags & socket.MSG_CTRUNC:
            status = Drop.CTRUNC
        elif msg_flags & socket.MSG_TRUNC:
            status = Drop.TRUNCATED
        elif self._server_side and (not creds or (pid == 0 and uid == OVERFLOW_UID and gid == OVERFLOW_GID)):
            # pid 0 with real ids is a sender in a pid namespace we cannot see (its ids
            # are sound); pid 0 with the overflow ids is a packet sent without credentials.
            status = Drop.NO_CREDENTIALS
        hstatus, header = check_header(data, self._accepted)
        if status == Drop.OK:
            status = hstatus
        kind = flags = request_id = 0
        payload = data[HEADER_SIZE:]
        if header is not None:
            kind, flags, request_id = header.kind, header.flags, header.request_id
        if status == Drop.OK:
            status, payload = self._payload(header, data, fds, payload)
        if fds:  # every fd we did not take is closed (without blocking on it)
            close_all_received(fds, self.peer_uid)
        if status != Drop.OK and header is not None and header.flags & Flag.ARENA and len(data) == ARENA_PACKET and status != Drop.BAD_VERSION:
            # Whatever the outcome the sender may reuse the region; a packet handed up
            # (Untaken) is released when it is taken or discarded.
            arena.release_ref(self.arenas, data[HEADER_SIZE:])
        if status != Drop.OK:
            if pidfd >= 0:
                os.close(pidfd)
            return Received(status, self, kind, flags, request_id, b"", pid, uid, gid)
        if self._server_side:
            pidfd = self._identify(pid, uid, gid, pidfd)
        return Received(status, self, kind, flags, request_id, payload, pid, uid, gid, pidfd)

    def _identify(self, pid: int, uid: int, gid: int, pidfd: int) -> int:
        """The pidfd for a valid packet (or -1, or SAME_PEER); see the module doc."""
        if pid == 0:  # another pid namespace: no process of ours to pin
            if pidfd >= 0:
                os.close(pidfd)
            return -1
        if pidfd >= 0:
            if not self._pidfs:
                return pidfd
            ino = os.fstat(pidfd).st_ino
        elif self._peer_pidfd >= 0 and pid == self._peer_pid:
            try:
                signal.pidfd_send_signal(self._peer_pidfd, 0)
            except PermissionError:
                pass  # alive, just not ours to signal
            except OSError:
                self._new_last(None)  # the process that connected is gone: nothing pins this packet
                return -1
            ino = self._peer_ino
        else:
            if not self._pidfd_per_packet_on and self._peer_pidfd >= 0:
                self._pidfd_per_packet()
            return -1
        ident = (pid, uid, gid, ino)
        if self._pidfs and ident == self._last:
            if pidfd >= 0:
                os.close(pidfd)
            return SAME_PEER
        if pidfd < 0:
            try:
                pidfd = fcntl.fcntl(self._peer_pidfd, fcntl.F_DUPFD_CLOEXEC, 0)
            except OSError:
                self._new_last(None)
                return -1
        self._new_last(ident)
        return pidfd

    def _new_last(self, ident: Optional[tuple[int, int, int, int]]) -> None:
        """The last sender changes (or is no longer known, None): the cached admission was
        made for the one before, so it stands for nobody now; the server makes the next one."""
        self._last = ident
        self._admit_epoch = -1  # (never the transport's epoch: see _admitted)

    def forget_sender(self) -> None:
        """Server side: the last packet's sender was refused without being judged (a uid's
        cool-down). Its next packet is identified afresh, never as ``SAME_PEER`` (which the
        server would resolve to the sender it judged before), and the cached admission goes."""
        self._new_last(None)

    def cache_admission(self, peer, decision, allowed: bool, epoch: int, reject_budget: int = -1) -> None:
        """Server side: what later packets of ``peer``'s process on this connection get.

        While the transport's ``epoch`` stays ``epoch``, a valid packet from the
        same process as the last one (``SAME_PEER``) is, without the server:

        * ``allowed``: made into a Message (``sender`` ``peer``, ``decision``)
          when it is inline, within the transport's ``max_payload``, and nobody
          has read ``peer``'s executable or cgroup (those are re-checked by the
          server per packet, in case of an ``execve()`` or a move);
        * not ``allowed``: counted and dropped (a memfd closed unmapped) when it
          is one-way and not an arena packet, at most ``reject_budget`` times
          (-1: no limit); the server takes the counts with ``take_rejected``.

        Anything else goes to the server as a Received. ``peer`` None: forget it.
        """
        self._admit_peer = peer
        self._admit_decision = decision
        self._admit_allowed = allowed
        self._admit_epoch = epoch
        self._reject_budget = reject_budget

    def _admitted(self, got: Received, st: "ServerTransport"):
        """``got``'s fate under the cached admission: a Message (or a BATCH packet's list of
        them), _COUNTED (rejected and counted), or None: the server must see it."""
        if got.pidfd != SAME_PEER or self._admit_epoch != st.epoch:
            return None
        payload, flags = got.payload, got.flags
        if not self._admit_allowed:
            if got.kind == Kind.REQUEST or flags & Flag.ARENA or self._reject_budget == 0:
                return None
            if payload.__class__ is Untaken:
                payload.discard()  # closed unmapped
            if self._reject_budget > 0:
                self._reject_budget -= 1
            n = len(payload) if flags & Flag.BATCH else 1
            with st._count_lock:  # take_rejected may run on another thread (Server.stats)
                if not self.fast_rejected:
                    st._rejected_conns.append(self)
                self.fast_rejected += n
                st.rejected_pending += n
            return _COUNTED
        peer = self._admit_peer
        # Large payloads are taken by the server; a read exe or cgroup is re-checked there per packet.
        if flags & (Flag.ARENA | Flag.PAYLOAD_FD) or peer._exe_id is not None or peer._cgroup is not None:
            return None
        limit, timeout, decision = st.max_payload, st.reply_max_age, self._admit_decision
        if flags & Flag.BATCH:
            if limit < INLINE_MAX:  # an item may be over max_size: the server drops those
                return None
            return [_Message(data, peer, 0, self, timeout, decision, limit) for data in payload.items()]
        if len(payload) > limit:
            return None
        return _Message(payload, peer, got.request_id if got.kind == Kind.REQUEST else 0, self, timeout, decision, limit)

    def _pidfd_per_packet(self) -> None:
        self._pidfd_per_packet_on = True
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
        except OSError:
            pass

    def _pin_peer(self) -> None:
        """At accept: pin the connecting process (SO_PEERCRED + SO_PEERPIDFD)."""
        try:
            pid, _uid, _gid = _UCRED.unpack(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            pidfd = self.sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:
            self._pidfd_per_packet()  # no pin (old kernel, or the peer already left)
            return
        if pid <= 0:  # connected from a pid namespace we cannot see: nothing to pin
            os.close(pidfd)
            return
        self._peer_pid, self._peer_pidfd, self._peer_ino = pid, pidfd, os.fstat(pidfd).st_ino

    def __del__(self) -> None:
        if self._peer_pidfd >= 0:
            os.close(self._peer_pidfd)
            self._peer_pidfd = -1
        if self._server_side and self.sock.fileno() >= 0:
            self._release_fd()

    def _payload(self, header, data: bytes, fds: list[int], inline: bytes) -> tuple[int, object]:
        """The payload of a valid packet: inline bytes, or an :class:`Untaken` large one.

        A server hands large payloads up untaken, so its policy decides before
        anything is mapped or copied; a client takes them at once. The one fd
        a PAYLOAD_FD packet may carry must be sealable (a memfd: its close
        cannot block); any other fd is UNEXPECTED_FDS. Takes the fd it keeps
        out of ``fds``; the caller closes the rest.
        """
        flags = header.flags
        fd = -1
        if fds:
            if not (flags & Flag.PAYLOAD_FD and len(fds) == 1 and _sealable(fds[0])):
                return Drop.UNEXPECTED_FDS, b""
            fd = fds.pop()
        elif flags & Flag.PAYLOAD_FD:
            return Drop.BAD_PAYLOAD_FD, b""  # the flag promised an fd that did not come
        if flags & Flag.BATCH:
            count = batch_count(inline)
            return (Drop.OK, Batch(inline, count)) if count else (Drop.BAD_BATCH, b"")
        if not flags & (Flag.ARENA | Flag.PAYLOAD_FD):
            return Drop.OK, inline
        untaken = Untaken(self, flags, header.length, fd, data[HEADER_SIZE:] if flags & Flag.ARENA else None)
        if self._server_side:
            return Drop.OK, untaken
        return self.take(untaken)

    def take(self, untaken: Untaken) -> tuple[int, object]:
        """Map (sealed memfd) or copy out (arena region) an untaken payload of this
        connection: ``(Drop.OK, memoryview)`` or ``(reason, None)``; closes its fd and
        releases its arena region, whatever the outcome."""
        fd, untaken.fd = untaken.fd, -1
        ref, untaken.ref = untaken.ref, None
        if ref is None:
            return map_sealed(fd, untaken.length, self.max_payload, self.budget, self.account)
        length = untaken.length
        try:
            status, mapping, start, _position = arena.locate(self.arenas, ref, length, fd, self.max_payload, self.budget, self.account)
            if status != Drop.OK:
                return status, None
            try:
                payload = mapping[start : start + length]  # the copy-out
            except MemoryError:
                return Drop.UNMAPPABLE, None
        finally:
            arena.release_ref(self.arenas, ref)
        return Drop.OK, memoryview(payload)

    def copy_into(self, dst, offset: int, src) -> None:
        """Copy the bytes of buffer ``src`` into writable buffer ``dst`` from byte ``offset``
        on (the sender's copy into an arena region); ValueError if they do not fit."""
        src = memoryview(src).cast("B")  # any buffer, counted in bytes
        dst = memoryview(dst)
        if offset < 0 or offset + src.nbytes > dst.nbytes:
            raise ValueError(f"copy_into: {src.nbytes} bytes at {offset} do not fit in {dst.nbytes}")
        dst[offset : offset + src.nbytes] = src

    def _hello(self, max_payload: int) -> None:
        """Server side, at accept: send HELLO, the first packet on every connection. Never
        waits (a fresh socket's queue is empty); a client already gone is noticed later."""
        try:
            self.send(Kind.HELLO, 0, arena.hello(max_payload), 0)
        except (PeerGone, IPCTimeoutError):
            pass

    def shutdown(self) -> None:
        """Tell the peer we are gone (EOF on its side); the fd stays open until released."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket; if other threads are using it, once the last one is done
        (a shutdown wakes them), so no call ever reaches a reused fd number."""
        with self._busy_lock:
            if self._busy:
                self._close_pending = True
                self.shutdown()
                return
        self._release_fd()


def _gone(sock: socket.socket) -> bool:
    """True if the client of a just-accepted socket already closed it and left
    nothing to read (EOF: 0 bytes and no control data, §1 of docs/protocol.md).

    Such connections (a connect flood) are closed at once instead of being
    counted against their uid until their EOF is read.
    """
    try:
        data, anc, _flags, _addr = sock.recvmsg(1, _PEEK_CMSG, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:  # nothing queued (EAGAIN): a live client
        return False
    return not data and not anc


class Batch:
    """The payload a BATCH packet is handed up as: its one-way messages, one sender.

    ``len(batch)`` is the number of messages (counted when the packet was
    checked); ``items()`` splits the body into their payloads (a list of
    bytes, in order) only when called, so a sender the policy refuses costs no
    per-item copies.
    """

    __slots__ = ("_body", "_count")

    def __init__(self, body: bytes, count: int) -> None:
        self._body = body
        self._count = count

    def __len__(self) -> int:
        return self._count

    def items(self) -> list:
        return split_batch(self._body)


def _batches(payloads: list, start: int, end: int, room: int):
    """``payloads[start:end]`` (bytes) in groups that go as one packet each: as many as fit
    in a BATCH body of ``room`` bytes (4 + size each), one by one when ``room`` is 0."""
    group: list = []
    used = 0
    for i in range(start, end):
        data = payloads[i]
        need = BATCH_ITEM_SIZE + len(data)
        if group and used + need > room:
            yield group
            group, used = [], 0
        group.append(data)
        used += need
    if group:
        yield group


def _rights(fd: int) -> list:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd >= 0 else []


class ServerTransport:
    """Accepts connections and returns the next packet from any of them.

    Replies a client has no room for wait in its connection's ``outbox`` and
    are sent from ``recv`` when its socket turns writable (machipc.outbox).
    """

    #: Set for an adopted (socket-activated) listener: turn SO_PASSCRED on
    #: each accepted socket too (connections queued before the listener had them lack them).
    pass_on_accept = False

    def __init__(self, listener: socket.socket, pidfs: bool) -> None:
        listener.setblocking(False)
        self._listener = listener
        self._pidfs = pidfs
        #: Largest memfd payload accepted connections map (Server sets it from max_size).
        self.max_payload = MAX_PAYLOAD
        #: Bytes of replies a connection may leave unread, and seconds one may wait (Server sets them).
        self.reply_queue_bytes = REPLY_QUEUE_BYTES
        self.reply_max_age: Optional[float] = None
        #: MappedBudget for accepted connections' payloads and arenas (Server sets it; None: none).
        self.budget = None
        #: Per-uid caps checked at accept (Server sets them).
        self.limits = ConnLimits()
        self._refused: deque[Received] = deque()  # connections refused at accept, reported by recv
        self._accept_paused_until = 0.0  # out of fds: the listener is off epoll until then
        self._ep = select.epoll()
        self._readable = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR  # (Linux-only names)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ep.register(listener.fileno(), select.EPOLLIN)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._conns: dict[int, Conn] = {}
        self._ready: deque[Conn] = deque()
        self._burst = 0  # packets served from _ready since the last epoll poll
        #: Server bumps it to void every connection's cached admission (Conn.cache_admission).
        self.epoch = 0
        #: Packets the cached admissions rejected and counted, not yet taken (take_rejected).
        self.rejected_pending = 0
        self._rejected_conns: list[Conn] = []
        self._count_lock = threading.Lock()

    @property
    def connections(self) -> int:
        return len(self._conns)

    def fileno(self) -> int:
        """The epoll fd: readable when ``recv(0)`` has work (for ``loop.add_reader``)."""
        return self._ep.fileno()

    def recv(self, timeout: Optional[float]) -> Optional[Received]:
        """Next packet or connection event from any client: a Received, or what a
        connection's cached admission let through (a Message, or a BATCH packet's list
        of them; see Conn.cache_admission).

        None when ``timeout`` passed or ``wakeup()`` was called. A connection
        refused at accept comes as ``(Drop.CONN_LIMIT or Drop.CLOSE_BUDGET,
        None, 0, 0, 0, b"", pid, uid, gid, -1)``.
        """
        deadline = deadline_of(timeout)
        counted = False  # a cached admission rejected a packet in this call
        while True:
            if self._refused:
                return self._refused.popleft()
            while self._ready and self._burst < _POLL_EVERY:
                conn = self._ready[0]
                got = conn.recv_nowait()
                if got is None:
                    self._ready.popleft()
                    continue
                self._ready.rotate(-1)  # one packet per connection per turn: fairness
                self._burst += 1
                if got.status == Drop.CLOSED:
                    self._drop(conn)
                elif conn._admit_peer is not None and got.status == Drop.OK:
                    fast = conn._admitted(got, self)
                    if fast is _COUNTED:
                        counted = True
                        continue
                    if fast is not None:
                        return fast
                return got
            # Re-poll even while connections stay ready: a flooding client must
            # not starve new connections and quieter clients.
            self._burst = 0
            left = 0.0 if self._ready else remaining(deadline)
            if self._accept_paused_until:
                if time.monotonic() >= self._accept_paused_until:
                    self._resume_accept()
                elif left is None or left > ACCEPT_PAUSE:
                    left = ACCEPT_PAUSE
            try:
                events = self._ep.poll(-1 if left is None else left)
            except InterruptedError:
                events = []
            woken = False
            for fd, mask in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 512)
                    except BlockingIOError:
                        pass
                    woken = True
                elif fd == self._listener.fileno():
                    self._accept()
                else:
                    conn = self._conns.get(fd)
                    if conn is None:
                        continue
                    if mask & select.EPOLLOUT:
                        conn.outbox.flush(conn)
                    if mask & self._readable and conn not in self._ready:
                        self._ready.append(conn)
            # A flood of rejected packets must not hold a caller past its deadline, nor
            # past a wakeup(): the ready connections are served on the next call.
            if woken or (left is not None and remaining(deadline) == 0.0 and (counted or not self._ready)):
                return None

    def recv_many(self, max_count: int, timeout: Optional[float]) -> list:
        """What ``recv`` returns, for up to ``max_count`` packets: waits up to ``timeout``
        only for the first, then takes what is already queued; a Received ends the list
        (machipc.received.take_many); [] when the time ran out or after ``wakeup()``."""
        return take_many(self.recv, max_count, timeout)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds: leave it queued, and stop watching the listener for a
                    # while (it stays readable: epoll would spin).
                    self._pause_accept()
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise
            if _gone(sock):
                sock.close()  # nothing queued, nothing in flight: this close cannot block
                continue
            if self.pass_on_accept:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            conn = Conn(sock, True, self._pidfs)
            pid, conn.peer_uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            status = self.limits.admit(conn.peer_uid)
            if status != Drop.OK:
                conn.shutdown()
                self._refused.append(Received(status, None, 0, 0, 0, b"", pid, conn.peer_uid, gid))
                continue  # the socket is closed when conn goes (on the closer: it may hold fds)
            conn._pin_peer()
            conn.max_payload = self.max_payload
            conn.budget = self.budget
            conn._hello(self.max_payload)
            conn.outbox = Outbox(self.reply_queue_bytes, self.reply_max_age, functools.partial(self._watch, conn.fd))
            self._conns[conn.fd] = conn
            self._ep.register(conn.fd, select.EPOLLIN)

    def _watch(self, fd: int, writable: bool) -> None:
        """Watch connection ``fd`` for EPOLLOUT too (while replies wait), or not (any thread)."""
        try:
            self._ep.modify(fd, select.EPOLLIN | select.EPOLLOUT if writable else select.EPOLLIN)
        except (OSError, ValueError):
            pass  # dropped meanwhile, or the transport is closed

    def _pause_accept(self) -> None:
        if not self._accept_paused_until:
            self._ep.unregister(self._listener.fileno())
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE

    def _resume_accept(self) -> None:
        if self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._ep.register(self._listener.fileno(), select.EPOLLIN)

    def _drop(self, conn: Conn) -> None:
        if self._conns.pop(conn.fd, None) is conn:
            self._ep.unregister(conn.fd)
            self.limits.left(conn.peer_uid)
            arena.forget(conn.arenas, conn.budget, conn.account)
        try:
            self._ready.remove(conn)
        except ValueError:
            pass
        conn.shutdown()
        if conn.outbox is not None:
            conn.outbox.close()
        self._resume_accept()  # a connection went: its fds may soon be free

    def take_rejected(self) -> list[tuple[int, int, int]]:
        """What the cached admissions rejected since the last call: ``[(conn id, uid, count)]``
        (uid: the rejected sender's), and the counts start again from 0."""
        out = []
        with self._count_lock:  # (the Cython twin needs none: the GIL is held throughout)
            for conn in self._rejected_conns:
                if conn.fast_rejected:
                    uid = conn._admit_peer.uid if conn._admit_peer is not None else conn.peer_uid
                    out.append((conn.id, uid, conn.fast_rejected))
                    conn.fast_rejected = 0
            self._rejected_conns = []
            self.rejected_pending = 0
        return out

    def waiting_conns(self) -> list:
        """Connections with replies waiting in their outbox (for a graceful stop)."""
        return [conn for conn in self._conns.values() if conn.outbox is not None and conn.outbox.waiting]

    def disconnect(self, conn: Conn) -> None:
        """Stop serving ``conn`` (e.g. a hostile peer); its fd closes when released."""
        self._drop(conn)

    def wakeup(self) -> None:
        """Make a blocked ``recv`` return None soon (safe from any thread or signal handler)."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Release everything; only call when no thread is inside ``recv``."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._ep.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1
        self._listener.close()
