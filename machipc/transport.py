"""The transport contract, and the one place a transport is chosen.

``Server`` and ``Client`` talk to a transport only through what this module
describes; they never ask which operating system they run on.

* Linux: AF_UNIX ``SOCK_SEQPACKET`` sockets with kernel credentials, in
  Cython (``machipc._unix``) or its pure-Python twin (``machipc.unix``);
  :mod:`machipc._backend` picks one (``impl``, ``MACHIPC_PURE_PYTHON``).
  Service names are socket files (machipc.naming).
* macOS: Mach ports with audit trailers (``machipc.mach``). Service names
  are bootstrap (launchd) names.

What a receive hands up (``Conn.recv``, ``Conn.call``,
``ServerTransport.recv``) is None when the time ran out, else a
:class:`machipc.received.Received` record: the header's fields, the kernel's
credentials of the sender, and what pins the sender: on Linux ``pidfd`` (a
pidfd the caller owns, -1, or ``SAME_PEER``: the previous packet's process;
see the docstring of machipc/unix.py), on macOS ``peer``, the
:class:`machipc.Peer` built from the message's audit token.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import NamedTuple, Optional, Protocol, Union, runtime_checkable

from . import _backend, activation, listening
from .budget import MappedBudget
from .connecting import open_service
from .naming import service_path
from .peer import Peer, pidfs_available
from .policies import Policy
from .message import Message
from .received import Received

__all__ = ["Conn", "ServerTransport", "Backend", "Connected", "Listening", "backend"]


@runtime_checkable
class Conn(Protocol):
    """One connection: a client's to its server, or one a server accepted."""

    id: int  #: unique in this process, never reused

    def send(self, kind: int, request_id: int, payload, timeout: Optional[float]) -> None:
        """Send one packet, waiting up to ``timeout`` s while the peer's queue is full."""

    def call(self, request_id: int, payload: bytes, timeout: Optional[float]) -> Union[Received, bytes, None]:
        """Client side: send a REQUEST of inline ``payload``, then wait for the next packet
        (``timeout`` bounds both). A transport may return just the payload (``bytes``) when
        that packet is the valid inline REPLY to ``request_id`` from a sender it vouches for
        (Linux: the socket's, checked at connect); else the caller matches the request id."""

    def recv(self, timeout: Optional[float]) -> Optional[Received]:
        """The next packet (see the module doc), None after ``timeout`` s."""

    def shutdown(self) -> None:
        """Tell the peer we are gone; threads blocked on the connection wake up."""

    def close(self) -> None:
        """Release the connection (once no thread is inside a call on it)."""


@runtime_checkable
class ServerTransport(Protocol):
    """A server's side: accepts connections, hands up the next packet from any of them.

    Cached admission (Linux): the server may tell a connection what later
    packets of its last sender get (``Conn.cache_admission``, documented in
    machipc/unix.py); ``recv`` then hands such packets up as ready Messages
    (of the backend's ``message_type``), or counts rejected ones itself
    (``rejected_pending``, ``take_rejected``). The server voids every cached
    admission by bumping ``epoch``; a connection's own goes when its last sender
    changes, and with ``Conn.forget_sender()`` (a sender refused unjudged).
    The Mach transport caches nothing.
    """

    connections: int  #: connected clients now
    epoch: int  #: bumped by the server to void every cached admission
    rejected_pending: int  #: rejected packets counted by cached admissions, not yet taken

    def recv(self, timeout: Optional[float]) -> "Optional[Received | Message | list[Message]]":
        """The next packet or connection end from any client (module doc), or what a cached
        admission let through; None after ``timeout`` s or a ``wakeup()``."""

    def recv_many(self, max_count: int, timeout: Optional[float]) -> list:
        """What ``recv`` returns, for up to ``max_count`` packets: waits up to ``timeout`` only
        for the first, then takes what is queued; a Received (the server judges it, and takes
        a large payload, before more is read) ends the list."""

    def take_rejected(self) -> list[tuple[int, int, int]]:
        """``[(conn id, uid, count)]`` rejected by cached admissions since the last call."""

    def wakeup(self) -> None:
        """Make a blocked ``recv`` return soon (safe from any thread or signal handler)."""

    def close(self) -> None:
        """Disconnect every client and stop listening."""


class Connected(NamedTuple):
    """What :meth:`Backend.open_client` returns."""

    conn: Conn
    path: str  #: the socket file connected to; on macOS the bootstrap name
    server_peer: Optional[Peer]  #: the listening process as the kernel saw it (Linux), else None


class Listening(NamedTuple):
    """What :meth:`Backend.open_server` returns."""

    transport: ServerTransport
    path: str  #: the socket file (``@name``: abstract); on macOS the bootstrap name
    activated: bool  #: the listening socket came from the service manager
    pidfd_guard: str  #: how senders are pinned: "SO_PEERPIDFD", "pidfd_open" or "audit-token"
    inode: Optional[int]  #: the socket file's inode when it is ours to unlink, else None
    listen_fd: int  #: the listening socket's fd, -1 when there is none (Mach)


class Backend(Protocol):
    """Opens connections and listeners of one transport."""

    implementation: str  #: "c" or "py" (Linux), "mach" (macOS)
    message_type: type  #: the Message class this transport's server hands out

    def open_client(self, name: str, *, directory: Optional[str], timeout: Optional[float],
                    connect_timeout: Optional[float], server_policy: Policy, explicit_policy: bool,
                    max_size: int) -> Connected:
        """Connect to the server of ``name``; raises ServiceNotFound, NotPermitted (the
        server is not trusted), IPCTimeoutError (its backlog stayed full)."""

    def open_server(self, name: str, *, directory: Optional[str], mode: int, backlog: int, listener,
                    max_size: int, reply_queue_bytes: int, reply_timeout: Optional[float], budget: MappedBudget,
                    max_connections_per_uid: Optional[int], max_deferred_closes: Optional[int]) -> Listening:
        """Listen under ``name`` (``listener``: a socket the service manager passed);
        raises ServiceInUse when a live server holds the name. The limits are
        Server's (its docstring); a transport applies those it has."""


class _Unix:
    """Linux: ``module`` is ``machipc._unix`` or ``machipc.unix`` (the twins)."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.implementation: str = module.IMPLEMENTATION
        self.message_type: type = module.Message

    def open_client(self, name, *, directory, timeout, connect_timeout, server_policy, explicit_policy, max_size) -> Connected:
        sock, path, peer = open_service(name, directory, connect_timeout, server_policy, explicit_policy)
        conn = self.module.Conn(sock, False, False)
        conn.max_payload = max_size
        return Connected(conn, path, peer)

    def open_server(self, name, *, directory, mode, backlog, listener, max_size, reply_queue_bytes, reply_timeout, budget,
                    max_connections_per_uid, max_deferred_closes) -> Listening:
        if listener is None:  # systemd socket activation: LISTEN_FDS set for this pid
            listener = activation.take_listener(name)
        activated = listener is not None
        if activated:
            path = listening.socket_path(listener)
            guard = listening.adopt(listener)
            inode = None  # the manager owns the socket file: never unlink it
        else:
            path = service_path(name, create_dir=True, directory=directory)
            listener, guard = listening.listen(name, path, mode, backlog)
            inode = os.stat(path).st_ino
        transport = self.module.ServerTransport(listener, pidfs_available())
        transport.max_payload = max_size
        transport.reply_queue_bytes = reply_queue_bytes
        transport.reply_max_age = reply_timeout
        transport.budget = budget
        transport.limits.per_uid = max_connections_per_uid
        transport.limits.deferred_closes = max_deferred_closes
        if activated:  # connections queued before adopt() lack the options: set them per accept
            transport.pass_on_accept = True
        return Listening(transport, path, activated, guard, inode, listener.fileno())


class _Mach:
    """macOS: Mach ports (``machipc.mach``); names are bootstrap names."""

    def __init__(self) -> None:
        from . import mach  # imports the Mach extension: only ever on macOS

        self.implementation: str = mach.IMPLEMENTATION
        self.message_type: type = Message

    def open_client(self, name, *, directory, timeout, connect_timeout, server_policy, explicit_policy, max_size) -> Connected:
        from . import mach

        # The server's identity comes with every reply (its audit token): checked per reply.
        return Connected(mach.client_conn(name, timeout), name, None)

    def open_server(self, name, *, directory, mode, backlog, listener, max_size, reply_queue_bytes, reply_timeout, budget,
                    max_connections_per_uid, max_deferred_closes) -> Listening:
        from . import mach

        return Listening(mach.server_transport(name, queue_limit=1024), name, False, "audit-token", None, -1)


def backend(impl: Optional[str] = None) -> Backend:
    """The transport to use: Mach on macOS; on Linux the Cython one or its pure twin
    (``impl`` "c", "py", or None for machipc._backend's default).

    Raises InvalidArgument for another ``impl``, ImportError for "c" when it is not built.
    """
    if sys.platform == "darwin":
        return _Mach()
    return _Unix(_backend.transport(impl))
