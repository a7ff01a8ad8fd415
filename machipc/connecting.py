"""Connecting to a listening SEQPACKET socket, waiting while its backlog is full.

A non-blocking AF_UNIX ``connect()`` to a listener whose backlog is full fails
with EAGAIN at once (never EINPROGRESS), and polling the socket tells nothing
(it is not connecting). So ``socket.settimeout(t); connect()`` gives up after
0 s, while blocking connectors (for instance someone flooding the server with
``connect()/close()``) wait in the kernel and take every slot accept() frees.

:func:`connect` waits the way they do: a blocking ``connect()`` bounded by
``SO_SNDTIMEO``, which sleeps on the listener's wait queue and is woken when
a slot frees (Linux ``net/unix/af_unix.c``: ``unix_stream_connect`` ->
``unix_wait_for_peer``; the send timeout is the connect timeout there), retried
on EAGAIN and EINTR until the deadline.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Optional

from .errors import IPCTimeoutError, NotPermitted, ServiceNotFound, error_from_errno
from .deadline import deadline_of, remaining
from .naming import container_advice, find_sockets
from .peer import Peer, peer_of
from .policies import Policy, evaluate

__all__ = ["connect", "open_service", "seqpacket_socket"]

_TIMEVAL = struct.Struct("@ll")
_MIN_WAIT = 1e-3  # SO_SNDTIMEO of 0 means "forever": never ask for less than this
# No limit is this many seconds, waited again. Never SO_SNDTIMEO 0: with no timeout the kernel
# restarts a connect() a signal interrupted under SA_RESTART, and the Python handler would not
# run until the wait ends (net/unix/af_unix.c waits with sock_sndtimeo; sock_intr_errno).
_FOREVER_SLICE = 3600.0


def seqpacket_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def connect(sock: socket.socket, path: str, timeout: Optional[float]) -> None:
    """Connect ``sock`` (a blocking AF_UNIX socket) to ``path`` within ``timeout`` s (None: no limit).

    Waits while the listener's backlog is full; ``timeout=0`` tries once.
    Raises IPCTimeoutError when the backlog stayed full, and the OSError of
    any other failure (ConnectionRefusedError, FileNotFoundError, ...) as is.
    ``sock`` is left blocking with no send timeout.
    """
    deadline = deadline_of(timeout)
    sock.setblocking(True)
    try:
        while True:
            left = remaining(deadline)
            if left is None:
                wait = _FOREVER_SLICE
            elif left == 0.0:
                wait = -1.0  # one non-blocking attempt
            else:
                wait = max(left, _MIN_WAIT)
            if _attempt(sock, path, wait):
                return
            if deadline is not None and remaining(deadline) == 0.0:
                raise IPCTimeoutError(f"connecting to {path}: the server's backlog stayed full for {timeout} s")
    finally:
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(0, 0))


def _attempt(sock: socket.socket, path: str, wait: float) -> bool:
    """One connect(): True when connected, False when the backlog was full (or a signal came)."""
    if wait < 0:
        sock.setblocking(False)
    else:
        secs = int(wait)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(secs, int((wait - secs) * 1e6)))
    try:
        sock.connect(path)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EINTR):
            return False
        raise
    finally:
        sock.setblocking(True)
    # CPython answers EINTR on a blocking connect by polling the socket and reading
    # SO_ERROR, which reports success for an AF_UNIX socket that never connected.
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return False
        raise
    return True


def open_service(
    name: str, directory: Optional[str], connect_timeout: Optional[float], server_policy: Policy, explicit_policy: bool,
) -> tuple[socket.socket, str, Peer]:
    """``(sock, path, server_peer)``: connected to the first live socket for service ``name``
    (machipc.naming's lookup order) whose listening process ``server_policy`` trusts.

    With ``explicit_policy`` the policy alone judges (sockets of any owner are
    tried): a client in a container sees the owner as the overflow uid.
    Raises ServiceNotFound (nobody listens), NotPermitted (an untrusted
    server), IPCTimeoutError (the backlog stayed full for ``connect_timeout`` s).
    """
    stale = []
    for path in find_sockets(name, directory, any_owner=explicit_policy):
        sock = _connect_to(name, path, connect_timeout)
        if sock is not None:
            return sock, path, _check_server(name, sock, server_policy, explicit_policy)
        stale.append(path)
    raise ServiceNotFound(f"no server is listening for {name!r} at {' or '.join(stale)} (stale socket)")


def _connect_to(name: str, path: str, connect_timeout: Optional[float]) -> Optional[socket.socket]:
    """A socket connected to ``path``, or None when nobody listens there."""
    sock = seqpacket_socket()
    try:
        connect(sock, path, connect_timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None
    except IPCTimeoutError:
        sock.close()
        raise IPCTimeoutError(f"connecting to {name!r}: the server's backlog stayed full for {connect_timeout} s") from None
    except OSError as exc:
        sock.close()
        raise error_from_errno(exc.errno, f"connect to {path}") from None
    except BaseException:  # a signal handler's exception
        sock.close()
        raise
    return sock


def _check_server(name: str, sock: socket.socket, server_policy: Policy, explicit_policy: bool) -> Peer:
    """The kernel's identity of the process listening on ``sock``, if ``server_policy`` trusts it
    (else ``sock`` is closed and NotPermitted raised)."""
    try:
        peer = peer_of(sock)
        try:
            decision = evaluate(server_policy, peer)
        finally:
            peer.close()  # the pidfd was only needed for the check
    except BaseException:
        sock.close()
        raise
    if not decision.allowed:
        sock.close()
        advice = "" if explicit_policy else container_advice(peer.uid, peer.pid)
        raise NotPermitted(
            f"server of {name!r} (pid {peer.pid or 'unknown'}, uid {peer.uid}) is not trusted: {decision.reason}{advice}"
        )
    return peer
