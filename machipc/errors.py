"""The machipc exception tree.

Every error raised by machipc derives from :class:`IPCError`, and each one also
derives from the builtin exception a caller would naturally catch, so
``except TimeoutError`` works as well as ``except machipc.IPCError``.
Both the Cython and the pure-Python transports raise these classes.
"""

from __future__ import annotations

import errno as _errno
import os as _os

__all__ = [
    "IPCError",
    "IPCTimeoutError",
    "ServiceNotFound",
    "ServiceInUse",
    "NotPermitted",
    "Rejected",
    "PeerGone",
    "UnreadReplies",
    "MessageTooLarge",
    "InvalidArgument",
    "ProtocolError",
    "RemoteError",
    "ServerBusy",
    "ServerClosed",
    "error_from_errno",
]


class IPCError(Exception):
    """Base class of every machipc error."""


class IPCTimeoutError(IPCError, TimeoutError):
    """A blocking call ran out of time (send queue full, no reply, nothing received)."""


class ServiceNotFound(IPCError, FileNotFoundError):
    """No server is listening under this service name."""


class ServiceInUse(IPCError, FileExistsError):
    """Another live server already holds this service name."""


class NotPermitted(IPCError, PermissionError):
    """A local permission or ownership check failed (e.g. a squatted socket path)."""


class Rejected(NotPermitted):
    """The server's policy rejected this sender; ``reason`` is what the server said."""

    def __init__(self, reason: str = "rejected by the server's policy") -> None:
        super().__init__(reason)
        self.reason = reason


class PeerGone(IPCError, ConnectionError):
    """The other side closed the connection or exited."""


class UnreadReplies(PeerGone):
    """Server side: a client left more replies unread than its bound; it is disconnected."""


class MessageTooLarge(IPCError, ValueError):
    """A payload is over the size limit of the transport or the server."""


class InvalidArgument(IPCError, ValueError, TypeError):
    """An argument is malformed (a bad service name, a negative timeout, a str payload, ...).

    Both a ValueError and a TypeError: callers catching either builtin for a bad
    value or a wrong type catch it.
    """


class ProtocolError(IPCError):
    """The peer sent data that does not follow the machipc wire protocol."""


class RemoteError(IPCError):
    """The server's handler failed while answering this request."""


class ServerBusy(IPCError):
    """The server could not take the payload now (no memory, or its mapped-memory
    budget is used up: error codes NO_MEMORY, OVER_BUDGET); retrying later may work."""


class ServerClosed(IPCError, ConnectionError):
    """The server is closed (or closing) and handles no more messages."""


_ERRNO_CLASSES: dict[int, type[IPCError]] = {
    _errno.ENOENT: ServiceNotFound,
    _errno.ECONNREFUSED: ServiceNotFound,
    _errno.EADDRINUSE: ServiceInUse,
    _errno.EACCES: NotPermitted,
    _errno.EPERM: NotPermitted,
    _errno.EPIPE: PeerGone,
    _errno.ECONNRESET: PeerGone,
    _errno.ENOTCONN: PeerGone,
    _errno.ETIMEDOUT: IPCTimeoutError,
    _errno.EAGAIN: IPCTimeoutError,
    _errno.EMSGSIZE: MessageTooLarge,
    _errno.EINVAL: InvalidArgument,
}


def error_from_errno(err: int, what: str) -> IPCError:
    """Turn an errno from a system call into the matching machipc exception.

    ``what`` names the operation, so the message says what failed and why.
    """
    cls = _ERRNO_CLASSES.get(err, IPCError)
    exc = cls(f"{what}: {_os.strerror(err)} [{_errno.errorcode.get(err, err)}]")
    exc.errno = err  # type: ignore[attr-defined]
    return exc
