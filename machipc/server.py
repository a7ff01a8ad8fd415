"""``Server``: listens under a service name and hands allowed messages on."""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from . import activation, cooldown, forking, outbox, transport
from .args import int_arg, timeout_arg
from .errors import InvalidArgument, IPCTimeoutError, MessageTooLarge, ServerClosed, UnreadReplies
from ._printable import printable
from .message import Message

try:
    from ._message import dispatch_batch
except ImportError:  # not built: the pure twin's loop (Server._dispatch_each)
    dispatch_batch = None
from .peer import Peer
from .policies import Decision, DecisionCache, PolicyLike, SameUser, as_policy
from .ratelog import RateLimitedLog
from .deadline import deadline_of, remaining
from .received import SAME_PEER, Received
from .budget import MappedBudget
from .payload import MAX_PAYLOAD, Untaken, size_of as payload_size
from .wire import DROP_ERROR, DROP_TEXT, INLINE_MAX, VERSION, VERSION_ERROR_VERSION, Drop, ErrorCode, Flag, Kind, pack_error

__all__ = ["Server", "ServerStats", "Handler"]

log = logging.getLogger("machipc")

# Plain ints for the per-message path (enum attribute lookups cost more than the check).
_OK, _CLOSED, _REQUEST = int(Drop.OK), int(Drop.CLOSED), int(Kind.REQUEST)
_BATCH = int(Flag.BATCH)
_SERVE_BATCH = 32  # messages serve() takes per receive (those already queued, never waiting for more)
MiB = 1024 * 1024

Handler = Callable[[Message], Union[bytes, bytearray, memoryview, None]]


@dataclass
class ServerStats:
    """Counters of what the server saw (``Server.stats``). Every packet not handed on is counted.

    Fields (all counts since the server was made; each message of a BATCH
    packet counts in ``received``, ``rejected``, ``unknown``, ``would_reject``
    and ``too_large``, a malformed one once in ``dropped``): ``received`` messages
    handed on; ``rejected`` refused by the policy, ``unknown`` of those because
    it could not tell; ``would_reject`` denied but let through
    (``enforce=False``); ``too_large`` over ``max_size``; ``dropped`` malformed
    packets by :class:`machipc.wire.Drop` name (``dropped_total`` their sum);
    ``handler_errors`` handlers that raised or returned no valid reply;
    ``reply_errors`` replies that could not be delivered; ``unread_replies``
    clients disconnected for leaving replies unread; ``cooled_down`` packets
    refused during a uid's cool-down.
    """

    received: int = 0  #: messages handed to the caller / handler
    rejected: int = 0  #: refused by the policy
    unknown: int = 0  #: of those, refused because the policy could not tell (Decision.unknown)
    would_reject: int = 0  #: denied by the policy but let through (enforce=False)
    too_large: int = 0  #: over ``max_size`` (Drop.OVERSIZE)
    #: packets not handed on and connections refused at accept, by Drop name (wire.DROP_TEXT)
    dropped: Counter = field(default_factory=Counter)
    #: connections the server hung up on, by reason ("unexpected fds", "rejected")
    disconnected: Counter = field(default_factory=Counter)
    handler_errors: int = 0  #: handler raised
    reply_errors: int = 0  #: a reply could not be delivered
    unread_replies: int = 0  #: clients disconnected for leaving too many replies unread
    cooled_down: int = 0  #: packets refused because their uid is in a cool-down (repeat offender)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class Server:
    """A machipc server listening under ``name``.

    ``policy(peer) -> Decision`` is asked about every message before anything
    else looks at it; the default allows only the server's own uid
    (:class:`machipc.policies.SameUser`). With ``enforce=False`` the server only
    logs what it would reject (for rolling out a policy).

    The socket is connectable by every local user who can reach the runtime
    directory (``mode``, default 0o666): the policy, not the file mode, is the
    gate, so a root daemon can hear every user and decide per sender.

    Replies never make the server wait for a client (machipc.outbox): one the
    client's socket has no room for waits in a per-connection queue and goes
    out when the socket is writable. A client may leave at most
    ``reply_queue_bytes`` unread (queued replies plus memfd payloads in its
    socket; default the larger of 128 MiB and ``2 * max_size``), and a queued
    reply waits at most ``reply_timeout`` s; over either, the client is
    disconnected (``stats.unread_replies``). A uid disconnected so
    ``offender_strikes`` times within ``offender_cooldown`` s is refused for
    ``offender_cooldown`` s (``stats.cooled_down``; machipc.cooldown).
    ``reply_timeout=0`` sends replies now or never (no queue).

    Order of work for every packet: the kernel's identity of the sender, the
    policy's decision (cached per process), and only for an allowed sender (or
    with ``enforce=False``) the payload: a rejected sender's memfd is closed
    unmapped and its arena never mapped. Budgets (docs/security.md; None
    turns one off), each refusal counted in ``stats`` and logged (rate-limited per uid):

    * ``max_connections_per_uid`` (256): connections one uid may hold; more
      are refused at accept (``stats.dropped["CONN_LIMIT"]``).
    * ``max_mapped_per_connection`` (640 MiB) and ``max_mapped`` (2 GiB):
      bytes of peers' memfd payloads and arenas mapped at once, per
      connection and in total; a payload over either is refused with error
      code OVER_BUDGET (``stats.dropped["OVER_BUDGET"]``).
    * ``max_deferred_closes`` (256): a uid with this many of its fds still
      waiting on the closer threads (machipc._closer; their close() may
      block) may not connect (``stats.dropped["CLOSE_BUDGET"]``).
    * ``max_rejections`` (16): a connection on which no sender was ever
      allowed is hung up on after this many rejected packets (a BATCH
      packet counts once; ``stats.rejected`` counts its every message)
      (``stats.disconnected["rejected"]``).

    A packet carrying any fd other than the protocol's one memfd breaks the
    protocol: the fds are closed and the sender is hung up on
    (``stats.disconnected["unexpected fds"]``).

    Parameters (all but ``name`` and ``policy`` by keyword):

    * ``name``: the service name (1-100 of ``[A-Za-z0-9._-]``); on Linux the
      socket goes in the directory :mod:`machipc.naming` gives (``directory``
      overrides it), on macOS it is a bootstrap name.
    * ``policy``: a :class:`machipc.Policy` or a callable ``peer -> Decision``
      (default ``SameUser()``); ``enforce`` (default True).
    * ``mode``: the socket file's mode (int, default ``0o666``).
    * ``max_size``: largest payload accepted, bytes (default 64 MiB); larger
      ones are dropped and counted, a request gets MessageTooLarge.
    * ``reply_timeout``: seconds a reply may wait for a slow client (float or
      None for no limit, default 5.0); ``reply_queue_bytes``: bytes, see above.
    * ``offender_strikes`` (int), ``offender_cooldown`` (seconds).
    * ``backlog``: the listen backlog (connections, default 128).
    * ``max_connections_per_uid``, ``max_deferred_closes``, ``max_rejections``
      (int >= 1 or None), ``max_mapped_per_connection``, ``max_mapped`` (bytes,
      int or None): the budgets above.
    * ``impl``: ``"c"``, ``"py"`` or None (the default transport).
    * ``listener``: an already listening AF_UNIX SOCK_SEQPACKET socket to
      adopt (socket activation does that by itself; see ``from_systemd``).

    Raises InvalidArgument for a bad argument (wrong type or value),
    ServiceInUse when a live server holds the name, NotPermitted when the
    runtime directory or an existing socket file is someone else's (or
    unsafe), and IPCError for other failures of the system calls. ``stats``
    is a :class:`ServerStats`.
    """

    def __init__(
        self,
        name: str,
        policy: Optional[PolicyLike] = None,
        *,
        enforce: bool = True,
        mode: int = 0o666,
        max_size: int = MAX_PAYLOAD,
        reply_timeout: Optional[float] = 5.0,
        reply_queue_bytes: Optional[int] = None,
        offender_strikes: int = cooldown.STRIKES,
        offender_cooldown: float = cooldown.COOLDOWN,
        backlog: int = 128,
        directory: Optional[str] = None,
        impl: Optional[str] = None,
        listener: Optional[socket.socket] = None,
        max_connections_per_uid: Optional[int] = 256,
        max_mapped_per_connection: Optional[int] = 640 * MiB,
        max_mapped: Optional[int] = 2048 * MiB,
        max_deferred_closes: Optional[int] = 256,
        max_rejections: Optional[int] = 16,
    ) -> None:
        max_size = int_arg(max_size, "max_size")
        mode = int_arg(mode, "mode")
        backlog = int_arg(backlog, "backlog")
        reply_timeout = timeout_arg(reply_timeout, "reply_timeout")
        for knob, value in (("max_connections_per_uid", max_connections_per_uid), ("max_deferred_closes", max_deferred_closes),
                            ("max_rejections", max_rejections)):
            if value is not None:
                int_arg(value, knob, 1)
        for knob, value in (("max_mapped_per_connection", max_mapped_per_connection), ("max_mapped", max_mapped)):
            if value is not None:
                int_arg(value, knob)
        self.max_rejections = max_rejections
        self._rejections: dict[int, int] = {}  # conn id -> packets rejected, while none was allowed
        self._allowed: set[int] = set()  # conn ids on which a sender was allowed
        self.name = name
        self.policy = as_policy(policy) if policy is not None else SameUser()
        self._decisions = DecisionCache(self.policy)  # one decision per sending process
        self.enforce = enforce
        self.max_size = max_size
        self.reply_timeout = reply_timeout
        if reply_queue_bytes is None:
            reply_queue_bytes = max(outbox.REPLY_QUEUE_BYTES, 2 * max_size)
        self.reply_queue_bytes = int_arg(reply_queue_bytes, "reply_queue_bytes")
        self.offenders = cooldown.Cooldown(int_arg(offender_strikes, "offender_strikes", 1), timeout_arg(offender_cooldown, "offender_cooldown") or 0.0)
        self._stats = ServerStats()
        self._rejected_lock = threading.Lock()  # stats.rejected: counted here and by _take_rejected on any thread
        #: Rejection and drop warnings, at most a few per (uid, reason) every 10 s (machipc.ratelog).
        self.rate_log = RateLimitedLog(log)
        self._peers: dict[int, tuple[Peer, Decision]] = {}  # conn id -> last sender
        #: Messages of a BATCH packet beyond what the last receive() / receive_many() took.
        self._unbatched: deque[Message] = deque()
        self._closed = False
        self._stop_serving = False
        self._owner = os.getpid()  # the process that made it (see _check_not_forked)
        self._fork_generation = forking.generation
        self._recv_lock = threading.Lock()
        self._receiver: Optional[int] = None  # thread ident inside receive()
        self._backend = transport.backend(impl)  #: the transport (machipc.transport), chosen there
        self.implementation: str = self._backend.implementation
        self._message_type = self._backend.message_type  # built by the transport's fast path too
        #: serve()'s loop over a batch: the Cython one with the Cython Message, else _dispatch_each.
        self._dispatch_batch = dispatch_batch if self._message_type is not Message and dispatch_batch else Server._dispatch_each
        opened = self._backend.open_server(
            name, directory=directory, mode=mode, backlog=backlog, listener=listener,
            max_size=max_size, reply_queue_bytes=reply_queue_bytes, reply_timeout=reply_timeout,
            budget=MappedBudget(max_mapped_per_connection, max_mapped),
            max_connections_per_uid=max_connections_per_uid, max_deferred_closes=max_deferred_closes,
        )
        self._transport = opened.transport
        self.path = opened.path  #: the socket file (or, on macOS, the bootstrap name)
        self.activated = opened.activated  #: the socket came from the service manager
        self.pidfd_guard = opened.pidfd_guard  #: how senders are pinned against pid reuse
        self._inode = opened.inode  # the socket file's, None when it is not ours to unlink
        self._listen_fd = opened.listen_fd  # -1: no listening socket (Mach)

    # -- setup ---------------------------------------------------------------

    @classmethod
    def from_systemd(cls, name: str, policy: Optional[PolicyLike] = None, **kwargs) -> "Server":
        """A server on the listening socket systemd passed for ``name``.

        The fd is picked by ``LISTEN_FDNAMES`` (``FileDescriptorName=name`` or
        ``name.socket``), else the only one; raises IPCError when there is none.
        (``Server(name)`` adopts it automatically too; this insists on it.)
        """
        listener = activation.take_listener(name, required=True)
        return cls(name, policy, listener=listener, **kwargs)

    # -- receiving -----------------------------------------------------------

    @property
    def stats(self) -> ServerStats:
        """Counters of what the server saw (:class:`ServerStats`), up to date."""
        self._take_rejected()
        return self._stats

    @property
    def connections(self) -> int:
        """Number of clients connected now."""
        transport = self._transport
        return 0 if transport is None else transport.connections

    @property
    def closed(self) -> bool:
        return self._closed

    def receive(self, timeout: Optional[float] = None) -> Message:
        """Return the next message whose sender the policy allows.

        Raises IPCTimeoutError when ``timeout`` seconds pass, ServerClosed once
        the server is closed. Rejected and malformed packets are logged,
        counted in ``stats`` and never returned.
        """
        return self._receive(timeout, 1)[0]

    def receive_many(self, max_count: int = 64, timeout: Optional[float] = None) -> list[Message]:
        """Like ``receive``, then also take what is already queued, up to ``max_count``.

        Waits (up to ``timeout``) only for the first message; per-sender order
        is kept and every message is policy-checked like ``receive``. It looks
        at no more than ``max_count`` packets after the first message (refused
        ones count), so a flood of refused packets cannot hold that one back.
        A BATCH packet (``Client.send_many``, docs/protocol.md §5.4) is one
        packet of several messages, each handed out as its own Message; those
        over ``max_count`` come first in the next ``receive`` or ``receive_many``.
        """
        int_arg(max_count, "max_count", 1)
        return self._receive(timeout, max_count)

    def _check_not_forked(self) -> None:
        """A fork()ed child shares the parent's listener and connections: serving from
        both would split clients' messages between them, so the child may not."""
        if self._fork_generation != forking.generation:
            raise ServerClosed(
                f"this Server of {self.name!r} belongs to pid {self._owner}; a fork()ed child cannot "
                "receive on it (make a Server in the child, or fork before making it)"
            )

    def _receive(self, timeout: Optional[float], max_count: int, inline_only: bool = False,
                 queued_only: bool = False) -> list[Message]:
        """Up to ``max_count`` messages (see receive_many). ``inline_only``: a message whose
        payload came out of line (a mapped memfd or a copied arena region) ends the batch, so
        large payloads are not held all at once (the copies' memory pool could not reuse them).
        ``queued_only``: take only what is already queued, never wait (may return [])."""
        self._check_not_forked()
        deadline = deadline_of(timeout)
        batch: list[Message] = []
        looked = 0  # packets taken since the first message: refused ones count too
        with self._recv_lock:
            self._receiver = threading.get_ident()
            try:
                while True:
                    if self._closed or self._stop_serving:
                        if batch:
                            return batch
                        raise ServerClosed(f"server {self.name!r} is closed")
                    if self._unbatched:  # what a BATCH packet left over comes first
                        batch.extend(_take(self._unbatched, max_count - len(batch)))
                        if len(batch) == max_count:
                            return batch
                    room = max_count - len(batch)
                    items = self._transport.recv_many(room, 0.0 if batch or queued_only else remaining(deadline))
                    if not items:
                        if batch or queued_only:
                            return batch
                        if deadline is not None and remaining(deadline) == 0.0:
                            raise IPCTimeoutError(f"no message within {timeout} s")
                        continue
                    self._take_all(items, batch)
                    taken = len(items)
                    del items  # (they hold closed connections' Conns, and so their fds, while we block)
                    if len(batch) >= max_count:
                        self._unbatched.extend(batch[max_count:])  # what does not fit waits, in order
                        del batch[max_count:]
                        return batch
                    if inline_only and batch and batch[-1].data.__class__ is not bytes:
                        return batch  # a large payload ends the batch (recv_many stopped there too)
                    if batch or queued_only:
                        # Bounded by packets, not messages: under a flood of refused packets the
                        # messages already taken must not wait for max_count allowed ones.
                        looked += taken
                        if looked >= max_count:
                            return batch
            finally:
                self._receiver = None
                if self._transport is not None and self._transport.rejected_pending:
                    self._take_rejected()
                if self._closed:
                    self._teardown()

    def _take_all(self, items: list, batch) -> None:
        """What becomes of ``items`` (what ``transport.recv``/``recv_many`` handed up): their
        messages appended to ``batch`` (a list or deque) in order. A Message or a list of
        them (a BATCH packet) was let through by its connection's cached admission (see
        _cache_admission) and is only counted; anything else is a Received for _admit,
        which counts and logs what it refuses or drops."""
        mtype = self._message_type
        ready = 0
        for got in items:
            cls = got.__class__
            if cls is mtype:
                batch.append(got)
                ready += 1
            elif cls is list:  # a BATCH packet's messages, made by the transport
                batch.extend(got)
                ready += len(got)
            else:
                msg = self._admit(got)
                if msg.__class__ is list:
                    batch.extend(msg)
                elif msg is not None:
                    batch.append(msg)
        self._stats.received += ready

    def _admit(self, got: Received) -> "Message | list[Message] | None":
        """The message of one received packet (None: refused or dropped, counted and logged),
        or for a BATCH packet the list of its messages in order (possibly empty)."""
        status, conn, kind, flags, request_id, payload, pid, uid = (
            got.status, got.conn, got.kind, got.flags, got.request_id, got.payload, got.pid, got.uid)
        if status != _OK:
            if status == _CLOSED:
                self._forget(conn)
            else:
                self._drop(conn, status, kind, request_id, pid, uid)
            return None
        # Read before the cool-down check: a cool-down starting from here on (_cut_off, on a
        # worker thread) must void what is cached below, as it voids what was cached before.
        epoch = self._transport.epoch
        if self.offenders.refused(uid):  # a repeat offender in its cool-down: no service at all
            if payload.__class__ is Untaken:
                payload.discard()
            if got.pidfd >= 0:  # (nobody takes it: no Peer is made)
                os.close(got.pidfd)
            self._stats.cooled_down += 1
            self.rate_log.warning(uid, "cooled down", "disconnected pid %d uid %d: its uid is in a cool-down", pid, uid)
            # Refused unjudged, so neither the server nor the transport knows this sender: what
            # they kept describes whoever sent before it, and must not stand for its next packets.
            self._peers.pop(conn.id, None)
            forget = getattr(conn, "forget_sender", None)  # (Mach: nothing is kept per connection)
            if forget is not None:
                forget()
            _hang_up(conn)
            return None
        # Identity and decision first; a large payload is still untaken here.
        peer, decision = self._identify(got)
        if not decision.allowed:
            if self.enforce:
                if payload.__class__ is Untaken:
                    payload.discard()  # closed unmapped; no arena is mapped for this sender
                logged = self._reject(conn, kind, request_id, pid, uid, peer, decision, len(payload) if flags & _BATCH else 1)
                # Counted by the transport alone once the rate-limited log has its lines.
                self._cache_admission(conn, peer, decision, epoch, not logged)
                return None
            self._stats.would_reject += len(payload) if flags & _BATCH else 1
            self.rate_log.warning(uid, "would reject", "would reject pid %d uid %d (enforce=False): %s", pid, uid, printable(decision.reason))
        elif conn.id not in self._allowed:
            self._allowed.add(conn.id)
        self._cache_admission(conn, peer, decision, epoch)
        if payload.__class__ is Untaken:
            status, payload = payload.take()
            if status != _OK:
                self._drop(conn, status, kind, request_id, pid, uid)
                return None
        elif flags & _BATCH:
            return self._unbatch(payload, peer, decision, conn, pid, uid)
        elif len(payload) > self.max_size:
            self._stats.too_large += 1
            self.rate_log.warning(uid, "too large", "dropped %d-byte message from pid %d uid %d: over max_size %d", len(payload), pid, uid, self.max_size)
            if kind == _REQUEST:
                self._answer_error(conn, request_id, ErrorCode.TOO_LARGE, f"over the server's limit of {self.max_size} bytes")
            return None
        self._stats.received += 1
        return self._message_type(payload, peer, request_id if kind == _REQUEST else 0, conn, self.reply_timeout, decision, self.max_size)

    def _unbatch(self, batch, peer: Peer, decision: Decision, conn, pid: int, uid: int) -> list[Message]:
        """The messages of an allowed BATCH packet (the transport's Batch: ``len()`` items,
        ``items()`` their payloads), in order; one over ``max_size`` is counted in
        ``too_large`` and left out, the others are delivered."""
        limit, timeout = self.max_size, self.reply_timeout
        items = batch.items()
        if limit < INLINE_MAX:  # (no item of a packet is larger than INLINE_MAX)
            items = [data for data in items if len(data) <= limit]
        make = self._message_type
        msgs = [make(data, peer, 0, conn, timeout, decision, limit) for data in items]
        over = len(batch) - len(msgs)
        if over:
            self._stats.too_large += over
            self.rate_log.warning(uid, "too large", "dropped %d messages of a batch from pid %d uid %d: over max_size %d", over, pid, uid, limit)
        self._stats.received += len(msgs)
        return msgs

    def _cache_admission(self, conn, peer: Peer, decision: Decision, epoch: int, cacheable: bool = True) -> None:
        """Let the transport deal with this sender's later packets on ``conn`` by itself
        (``Conn.cache_admission``: allowed ones become Messages, rejected ones are counted)
        when nothing the decision rests on can change between packets; else make it forget.

        Not cached: volatile policies (exe, cgroup, label: re-read per packet), a Peer
        whose exe or cgroup somebody read (re-checked per packet for an exec or a move),
        an unknown decision, a sender that is not pinned, ``enforce=False``, and
        what the caller says is not ``cacheable``.
        ``epoch``: the transport's when the packet was first looked at (before the cool-down
        check); bumping it voids them all (a uid's cool-down starting: _cut_off)."""
        cache = getattr(conn, "cache_admission", None)
        if cache is None:  # Mach: every message brings its own audit token and is judged
            return
        self._take_rejected()  # the counts so far belong to the sender cached until now
        entry = self._peers.get(conn.id)
        if (not cacheable or entry is None or entry[0] is not peer or self._decisions.volatile or not decision.known
                or peer._exe_id is not None or peer._cgroup is not None or not (decision.allowed or self.enforce)):
            cache(None, None, False, 0)
            return
        budget = -1  # rejected packets it may count before the server must see one (max_rejections)
        if not decision.allowed and self.max_rejections is not None and conn.id not in self._allowed:
            budget = max(0, self.max_rejections - self._rejections.get(conn.id, 0) - 1)
        cache(peer, decision, decision.allowed, epoch, budget)

    def _take_rejected(self) -> None:
        """Count, and fold into the rate-limited log, what cached admissions rejected."""
        transport = self._transport
        if transport is None or not transport.rejected_pending:
            return
        with self._rejected_lock:  # Server.stats runs this on any thread
            for conn_id, uid, count in transport.take_rejected():
                self._stats.rejected += count
                self.rate_log.count(uid, "rejected", count)
                if conn_id in self._rejections:
                    self._rejections[conn_id] += count

    def _reject(self, conn, kind: int, request_id: int, pid: int, uid: int, peer: Peer, decision: Decision, items: int = 1) -> bool:
        """Count and log a packet the policy refused (``items`` messages: a BATCH packet's
        count); answer a request; hang up after ``max_rejections`` packets, none allowed.
        True if a log line was written (the rate-limited log had room for it)."""
        self._take_rejected()  # (max_rejections counts those too)
        with self._rejected_lock:
            self._stats.rejected += items
        # The reason is escaped only if the line is written (most are not: rate-limited).
        logged = self.rate_log.warning(uid, "rejected", "rejected %s from pid %d uid %d: %s", _kind_name(kind), pid, uid, _Printable(decision.reason))
        if not decision.known:
            self._stats.unknown += items
        if kind == _REQUEST:
            self._answer_error(conn, request_id, ErrorCode.REJECTED, _rejection_text(peer, decision))
        if self.max_rejections is not None and conn.id not in self._allowed:
            count = self._rejections.get(conn.id, 0) + 1
            self._rejections[conn.id] = count
            if count >= self.max_rejections:
                self._disconnect(conn, "rejected", f"{count} packets rejected, none allowed", uid)
        return logged

    def _disconnect(self, conn, reason: str, why: str, uid: int) -> None:
        """Hang up on a connection (its fds close on the closer thread, see machipc._closer)."""
        self._stats.disconnected[reason] += 1
        self.rate_log.warning(uid, f"disconnected: {reason}", "disconnecting a client of uid %d: %s", uid, why)
        self._forget(conn)
        disconnect = getattr(self._transport, "disconnect", None)
        if disconnect is not None:
            disconnect(conn)

    def _forget(self, conn) -> None:
        """A connection ended: drop what the server kept about it."""
        self._peers.pop(conn.id, None)
        self._rejections.pop(conn.id, None)
        self._allowed.discard(conn.id)

    def _identify(self, got: Received) -> tuple[Peer, Decision]:
        """The Peer for this packet and the policy's decision, reused per process."""
        if got.peer is not None:
            # Mach: the backend built the Peer from this message's audit token. Nothing is
            # kept per conn: each request has its own reply conn (a new id every time),
            # so entries would pile up forever; the DecisionCache keeps one per process.
            return got.peer, self._decisions.decide(got.peer)
        conn, pidfd = got.conn, got.pidfd
        entry = self._peers.get(conn.id) if pidfd == SAME_PEER else None
        if entry is not None:
            peer = entry[0]
            # execve() and a cgroup move keep pid, pidfd and the connection. Only what
            # somebody has read can be stale: one stat / pread each, then only if so.
            # (The slots are read directly: properties cost more than the rest of this path.)
            if peer._exe_id is None and peer._cgroup is None:
                if self._decisions.volatile:  # e.g. a new label: re-check
                    entry = self._peers[conn.id] = (peer, self._decisions.decide(peer))
                return entry
            held, held_cgroup = peer.exe_snapshot, peer.cgroup_snapshot
            now = None if held is None else peer.running_exe_id()
            now_cgroup = None if held_cgroup is None else peer.running_cgroup()
            if now == held and now_cgroup == held_cgroup:
                if self._decisions.volatile:  # e.g. a new label: re-check
                    entry = self._peers[conn.id] = (peer, self._decisions.decide(peer, now, now_cgroup))
                return entry
            # Another program or cgroup (or the process is gone): handlers get a Peer describing
            # it, messages already handed out keep theirs, and every policy is asked again.
            self._decisions.forget(peer)
            peer = peer.successor()
        else:
            pid = got.pid
            if pidfd == SAME_PEER:  # the same as a sender the server forgot (see _admit): not pinned now
                pidfd = -1
            if pidfd < 0 and pid > 0 and self.pidfd_guard == "pidfd_open":
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:
                    pidfd = -1
            # The packet's pid is the sender's claim (SCM_CREDENTIALS): attributed only
            # where the sender could not have chosen it (Peer.pin_problem says why not).
            peer = Peer.from_pidfd(pid, got.uid, got.gid, pidfd, claimed=True)
        decision = self._decisions.decide(peer)
        entry = (peer, decision)
        if peer.guard is not None:
            self._peers[conn.id] = entry
        return entry

    def _drop(self, conn, status: int, kind: int, request_id: int, pid: int, uid: int) -> None:
        reason = Drop(status)
        text = DROP_TEXT.get(reason, reason.name)
        code = DROP_ERROR.get(reason, ErrorCode.MALFORMED)
        version = VERSION
        if reason == Drop.OVERSIZE:  # a memfd or arena payload over max_size, refused before mapping
            self._stats.too_large += 1
            text = f"over the server's limit of {self.max_size} bytes"
        else:
            self._stats.dropped[reason.name] += 1
        if reason == Drop.BAD_VERSION:  # answered in a header every client version reads
            version, text = VERSION_ERROR_VERSION, f"{text}: this server speaks version {VERSION}"
        self.rate_log.warning(uid, f"dropped: {reason.name}", "dropped packet from pid %d uid %d: %s", pid, uid, text)
        if conn is None:  # a connection refused at accept: nothing to answer
            return
        if kind == Kind.REQUEST and request_id and status != Drop.BAD_MAGIC:
            self._answer_error(conn, request_id, code, text, version)
        if reason == Drop.UNEXPECTED_FDS:
            self._disconnect(conn, "unexpected fds", "it sent file descriptors the protocol does not carry", uid)

    def _answer_error(self, conn, request_id: int, code: int, text: str, version: int = VERSION) -> None:
        # On the receive thread, for senders that broke the rules or were refused: never
        # wait for them (timeout 0); one whose queue is full is hung up on at once.
        try:
            conn.send(Kind.ERROR, request_id, pack_error(code, text), 0, version)
        except Exception as exc:
            self._stats.reply_errors += 1
            log.info("could not send error reply: %s", exc)
            if isinstance(exc, IPCTimeoutError):
                _hang_up(conn)

    # -- serving -------------------------------------------------------------

    def serve(
        self,
        handler: Handler,
        workers: Optional[int] = None,
        *,
        ordered: bool = False,
        queue_size: Optional[int] = None,
        drain_timeout: Optional[float] = 10.0,
    ) -> None:
        """Receive messages and call ``handler(msg)`` for each, until closed or signalled.

        For a request, the handler's return value (bytes, or None for an empty
        reply) is sent back unless the handler already called ``msg.reply``.
        A handler that raises is logged and its requester gets a RemoteError;
        the server goes on.

        ``workers=N`` runs handlers on N threads (:mod:`machipc.workers`) while
        this thread keeps receiving; ``ordered=True`` keeps each connection's
        messages in order; at most ``queue_size`` (default 4*N) messages wait.

        SIGINT and SIGTERM (when called from the main thread) and ``stop()``
        stop gracefully: no new connections, the requests already sent are
        answered (for up to ``drain_timeout`` s), the workers finish, then the
        server is closed and its socket file removed. ``close()`` is abrupt,
        and so is a second SIGINT or SIGTERM during the graceful stop: the
        server is closed and KeyboardInterrupt raised from where the main
        thread was (a running handler included).
        Under systemd, READY=1 and STOPPING=1 go to ``$NOTIFY_SOCKET``.
        """
        drain_timeout = timeout_arg(drain_timeout, "drain_timeout")
        self._check_not_forked()
        self._stop_serving = False
        restore = self._install_signal_handlers()
        pool = None
        if workers:
            from .workers import WorkerPool

            pool = WorkerPool(self._dispatch, handler, workers, ordered=ordered, queue_size=queue_size)
        graceful = False
        activation.notify("READY=1")
        queued = False  # the last batch had messages: take what is queued, without waiting
        try:
            while True:
                try:
                    # A message that had to be waited for is handled at once, before asking for
                    # more (a request's reply must not wait for that question's system calls);
                    # after it, what is queued is taken in one go: the receive lock, deadline and
                    # list are set up once per batch, not once per message. With workers, one at
                    # a time: the pool's bounded queue is the back-pressure.
                    batch = self._receive(None, _SERVE_BATCH if queued else 1, True, queued)
                except ServerClosed:
                    graceful = not self._closed
                    break
                if pool is None:
                    self._dispatch_batch(self, handler, batch)
                else:
                    for msg in batch:
                        if self._closed:  # close() from a handler: the rest is not handled
                            break
                        pool.submit(msg)
                queued = pool is None and bool(batch)
                batch = msg = None  # drop the last connections' references so their fds can close
            if graceful:
                deadline = deadline_of(drain_timeout)
                self._drain(handler, pool, deadline)
                if pool is not None:
                    pool.close(remaining(deadline))
                    pool = None
                self._flush_replies_until(deadline)
        finally:
            if pool is not None:
                pool.close(1.0, discard=True)
            for signum, previous in restore:
                signal.signal(signum, previous)
            self._stop_serving = False
            if graceful:
                self.close()

    def _flush_replies_until(self, deadline: Optional[float]) -> None:
        """Graceful stop: let replies queued for slow readers go out, until ``deadline``
        (no drain timeout: ``reply_timeout``); what still waits then is dropped with the connection."""
        if deadline is None:
            deadline = deadline_of(self.reply_timeout or 0.0)
        while self._flush_replies(min(0.1, remaining(deadline))) and remaining(deadline) != 0.0:
            pass

    def _flush_replies(self, wait: float) -> bool:
        """Send queued replies the clients have room for, first waiting up to ``wait`` s
        for one to have room; True while some still wait (machipc.outbox)."""
        waiting_conns = getattr(self._transport, "waiting_conns", None)
        conns = waiting_conns() if waiting_conns is not None else []
        if not conns:
            return False
        if wait > 0:
            poller = select.poll()
            for conn in conns:
                poller.register(conn.fd, select.POLLOUT)
            poller.poll(int(wait * 1000) + 1)
        for conn in conns:
            conn.outbox.flush(conn)
        return True

    def _drain(self, handler: Handler, pool, deadline: Optional[float]) -> None:
        """After a stop: handle what clients already sent, accepting nobody new."""
        activation.notify("STOPPING=1")
        self._stop_accepting()
        with self._recv_lock:
            # Handlers run here with the lock held: mark this thread as the receiver so a
            # close() from a handler (or a signal handler) defers instead of deadlocking.
            self._receiver = threading.get_ident()
            try:
                self._drain_locked(handler, pool, deadline)
            finally:
                self._receiver = None
                if self._closed:
                    self._teardown()

    def _drain_locked(self, handler: Handler, pool, deadline: Optional[float]) -> None:
        drained = empty = 0
        queued = self._unbatched  # messages of a batch an earlier receive left go first
        while not self._closed and self._transport is not None:
            if queued:
                msg = queued.popleft()
                drained += 1
                if pool is None:
                    self._dispatch(handler, msg)
                else:
                    pool.submit(msg)
                del msg
            else:
                got = self._transport.recv(0.0)
                if got is None:
                    empty += 1  # twice: a pending wakeup() can make one recv(0) come back empty
                    if empty == 2:
                        break
                    continue
                empty = 0
                self._take_all([got], queued)
                del got
            if deadline is not None and remaining(deadline) == 0.0:
                log.warning("stopping: drain timeout reached; closing with messages still queued")
                break
        log.info("stopping: handled %d queued messages", drained)

    def _stop_accepting(self) -> None:
        """New clients cannot connect; those already connected are still heard."""
        if self._inode is not None:
            # Our own socket: remove the name so new clients fail fast (ServiceNotFound).
            try:
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
            self._inode = None
            return
        if self._listen_fd < 0:
            # Mach: there is no listener to take out (and select.epoll does not exist on
            # macOS); the bootstrap name goes when close() destroys the receive right.
            return
        # Socket activation: the manager still holds the listener, so connections
        # queued now are kept for the next start; stop accepting them here by
        # taking the listener out of the transport's epoll set (through a dup of
        # the epoll fd, so the transport's own fd stays as it is).
        transport = self._transport
        fileno = getattr(transport, "fileno", None)
        if fileno is None:
            return
        try:
            ep = select.epoll.fromfd(os.dup(fileno()))
        except (OSError, ValueError):
            return
        try:
            ep.unregister(self._listen_fd)
        except OSError:
            pass
        finally:
            ep.close()

    def _dispatch(self, handler: Handler, msg: Message) -> None:
        """``handler(msg)``, and for a request its reply (machipc._message.dispatch_batch
        is the Cython loop doing the same for a batch)."""
        try:
            result = handler(msg)
        except Exception as exc:
            self._handler_failed(msg, exc)
            return
        if msg.request_id and not msg._answered:  # (the slots: properties cost more than the check)
            self._answer_result(msg, result)

    def _dispatch_each(self, handler: Handler, batch: list) -> None:
        """serve()'s loop over one batch of messages (machipc._message.dispatch_batch's twin)."""
        for msg in batch:
            if self._closed:  # close() from a handler: the rest is not handled
                return
            self._dispatch(handler, msg)

    def _handler_failed(self, msg: Message, exc: Exception) -> None:
        """A handler raised: counted and logged; its requester gets a RemoteError."""
        if isinstance(exc, UnreadReplies):  # the handler's own msg.reply() found the client over its bound
            self._cut_off(msg, exc)
            return
        self._stats.handler_errors += 1
        log.exception("handler failed on %r", msg, exc_info=exc)
        if msg.expects_reply and not msg.answered:
            self._answer(msg.fail, f"handler raised {type(exc).__name__}")

    def _answer_result(self, msg: Message, result) -> None:
        """Send the handler's return value as the reply to an unanswered request."""
        if result is None or type(result) is bytes:  # the common case: no need to ask refuse_result
            self._answer(msg.reply, b"" if result is None else result, msg)
            return
        wrong = refuse_result(self._stats, msg, result)
        if wrong is not None:
            self._answer(msg.fail, wrong)
            return
        self._answer(msg.reply, result, msg)

    def _answer(self, answer: Callable, arg, msg: Optional[Message] = None) -> None:
        """Send a reply (or error); a reply that cannot be sent becomes an error reply."""
        try:
            answer(arg)
        except MessageTooLarge as exc:
            self._stats.handler_errors += 1
            log.warning("handler's reply is unsendable: %s", exc)
            if msg is not None:
                self._answer(msg.fail, str(exc))
        except UnreadReplies as exc:
            self._cut_off(getattr(answer, "__self__"), exc)
        except Exception as exc:
            self._reply_failed(getattr(answer, "__self__", None), exc)
            if isinstance(exc, IPCTimeoutError):
                _hang_up(getattr(getattr(answer, "__self__", None), "_conn", None))

    def _reply_failed(self, msg: Optional[Message], exc: Exception) -> None:
        """Count a reply that could not be delivered; log it (rate-limited per uid)."""
        self._stats.reply_errors += 1
        uid = msg.sender.uid if msg is not None else -1
        self.rate_log.warning(uid, "reply failed", "could not answer request: %s", exc)

    def _cut_off(self, msg: Message, exc: UnreadReplies) -> None:
        """Disconnect the client of ``msg``, which left too many replies unread; count a strike on its uid."""
        self._stats.unread_replies += 1
        uid = msg.sender.uid
        refused = self.offenders.strike(uid)
        if refused and self._transport is not None:
            self._transport.epoch += 1  # the uid's connections must now be refused: no cached admission holds
        self.rate_log.warning(
            uid, "unread replies", "disconnected pid %d uid %d: %s%s", msg.sender.pid, uid, exc,
            f"; uid {uid} refused for {self.offenders.cooldown:g} s" if refused else "",
        )
        _hang_up(msg._conn)

    def _install_signal_handlers(self) -> list:
        if threading.current_thread() is not threading.main_thread():
            return []
        restore = []

        def stop(signum, frame):
            if self._stop_serving:  # a second signal: the graceful stop is taking too long
                log.warning("signal %d again: closing at once", signum)
                self.close()
                raise KeyboardInterrupt
            log.info("signal %d: stopping serve() (again to stop at once)", signum)
            self.stop()

        for signum in (signal.SIGINT, signal.SIGTERM):
            restore.append((signum, signal.signal(signum, stop)))
        return restore

    def stop(self) -> None:
        """Make a running ``serve`` return (safe from signal handlers and other threads)."""
        self._stop_serving = True
        transport = self._transport
        if transport is not None and self._fork_generation == forking.generation:
            transport.wakeup()

    # -- shutdown ------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, disconnect clients and remove the socket file.

        Safe from any thread, and idempotent. A thread blocked in ``receive``
        wakes up with ServerClosed. In a fork()ed child it only lets go of the
        inherited fds: the parent's server, socket file and clients are untouched.
        """
        if self._closed:
            return
        self._closed = True
        if self._fork_generation != forking.generation:
            # In a fork()ed child: the listener, the socket file and the connections are
            # the parent's. Dropping the references closes the child's copies of the fds,
            # with no shutdown and no unlink (and no lock: a parent thread may have held it).
            self._transport, self._inode = None, None
            self._peers.clear()
            self._unbatched.clear()
            return
        transport = self._transport
        if transport is not None:
            transport.wakeup()
        if self._receiver == threading.get_ident():
            return  # called inside receive (a signal handler): receive tears down on its way out
        with self._recv_lock:
            self._teardown()

    def _teardown(self) -> None:
        if self._transport is None:
            return
        transport, self._transport = self._transport, None
        transport.close()
        self._peers.clear()
        self._unbatched.clear()
        self._rejections.clear()
        self._allowed.clear()
        try:
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", self.path, exc)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.connections} connections"
        return f"<machipc.Server {self.name!r} at {self.path} ({self.implementation}, {state})>"


def refuse_result(stats: ServerStats, msg: Message, result) -> Optional[str]:
    """The error text for the requester when a handler's return value cannot be the
    reply (counted and logged with pid and request id), else None.

    A reply is None (empty) or bytes-like; a str, int, dict or list is not.
    """
    if result is None or type(result) is bytes:
        return None
    try:
        payload_size(result)
        return None
    except InvalidArgument as exc:
        wrong = str(exc)
    stats.handler_errors += 1
    log.error("handler's return value for request %d from pid %d is no reply: %s", msg.request_id, msg.sender.pid, wrong)
    return f"the handler returned no valid reply: {wrong}"


def _take(queue: deque, count: int) -> list:
    """Up to ``count`` items from the left of ``queue``."""
    return [queue.popleft() for _ in range(min(count, len(queue)))]


def _hang_up(conn) -> None:
    """Disconnect a client (it does not read its replies, or its uid is in a cool-down).

    Only shutdown(): safe from worker threads; the receive loop sees EOF and
    drops the connection. The caller logs why.
    """
    shutdown = getattr(conn, "shutdown", None)
    if shutdown is not None:
        shutdown()


#: Error text for a request whose sending process could not be pinned (see _rejection_text).
UNPINNED_TEXT = (
    "rejected: the server could not pin the process that sent this request (one of the first packets of a "
    "process other than the one that connected, e.g. a forked child); send it again: later packets "
    "on this connection carry their own pidfd"
)


def _rejection_text(peer: Peer, decision: Decision) -> str:
    """What a rejected requester is told: nothing of the policy, except when sending again helps."""
    if not decision.known and peer.guard is None and peer.pid > 0 and peer.pin_problem is None:
        return UNPINNED_TEXT
    return "rejected by the server's policy"


class _Printable:
    """``printable(text)`` when formatted: a log argument escaped only if the line is written."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return printable(self.text)


def _kind_name(kind: int) -> str:
    return "request" if kind == _REQUEST else "message"
