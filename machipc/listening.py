"""A Linux server's listening socket: made and bound, or adopted from the service manager.

Either way ``SO_PASSCRED`` is on before any connection can be accepted, so
every packet arrives with the kernel's credentials (see machipc/unix.py).
"""

from __future__ import annotations

import errno
import logging
import os
import socket

from . import activation, connecting
from .errors import IPCTimeoutError, ServiceInUse, error_from_errno
from .naming import check_socket_owner
from .unix import SO_PASSPIDFD

__all__ = ["listen", "adopt", "pass_credentials", "socket_path"]

log = logging.getLogger("machipc")


def listen(name: str, path: str, mode: int, backlog: int) -> tuple[socket.socket, str]:
    """A SEQPACKET socket listening at ``path`` with file mode ``mode``, and the pid-reuse
    guard in use (:func:`pass_credentials`). A stale socket of ours is replaced; raises
    ServiceInUse when a live server (or someone else's file) is there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        # Both before listen(): accepted sockets inherit them, so no packet
        # can arrive without kernel credentials.
        guard = pass_credentials(sock)
        _clear_stale(name, path)
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServiceInUse(f"service {name!r} is already served at {path}") from None
            raise error_from_errno(exc.errno, f"bind {path}") from None
        # Not connectable before listen(), so the mode is right before anyone can use it.
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock, guard


def pass_credentials(sock: socket.socket) -> str:
    """Turn on SO_PASSCRED; returns the pid-reuse guard in use.

    Senders are pinned by the pidfd of the connecting process, taken at
    accept (SO_PEERPIDFD) and checked alive after each packet, and by a
    per-packet SCM_PIDFD on connections where another process sends
    (the transport turns SO_PASSPIDFD on for those). Both need Linux 6.5;
    the probe below finds out, leaving SO_PASSPIDFD off on the listener.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 0)
        return "SO_PEERPIDFD"
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
        log.info("kernel lacks pidfd socket options; senders are pinned with pidfd_open(pid)")
        return "pidfd_open"  # kernel < 6.5: pin by pid right after receipt


def adopt(sock: socket.socket) -> str:
    """Take over a listening socket made by someone else (systemd socket activation)."""
    activation.check_listener(sock)
    sock.set_inheritable(False)
    # Before the first accept(). DESIGN.md caveat: this listener was listen()ed
    # without us, and connections already queued (the one that triggered the
    # activation) did not inherit the options, so the transport also sets them
    # on each accepted socket (pass_on_accept; checked on 6.x: packets queued
    # before accept then carry credentials). A packet sent in the window between
    # accept() and that setsockopt arrives with pid 0 and the overflow ids, and
    # the transport drops it as NO_CREDENTIALS (never trusted).
    # PassCredentials=yes in the .socket unit (what `machipc unit` writes)
    # closes that window.
    return pass_credentials(sock)


def _clear_stale(name: str, path: str) -> None:
    """Remove a socket left by a crashed server of ours; refuse anything else."""
    try:
        check_socket_owner(path, (os.geteuid(),))
    except FileNotFoundError:
        return
    probe = connecting.seqpacket_socket()
    try:
        # A full backlog (a connect flood) is waited out; still full after 1 s: someone listens.
        connecting.connect(probe, path, 1.0)
    except IPCTimeoutError:
        pass
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s left by a server that is gone", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError as exc:
        raise error_from_errno(exc.errno, f"probing existing socket {path}") from None
    finally:
        probe.close()
    raise ServiceInUse(f"service {name!r} is already served by a live server at {path}")


def socket_path(sock: socket.socket) -> str:
    """The filesystem path of a bound AF_UNIX socket (``@name`` for the abstract namespace)."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    if name.startswith("\0"):
        return "@" + name[1:]
    return name
