"""``Received``: what a transport's receive hands up (the contract is machipc.transport).

The Cython transport (machipc._unix) has an extension type of the same name
and fields; this class serves the pure-Python twin (machipc.unix) and the Mach
transport (machipc.mach).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["Received", "SAME_PEER", "take_many"]

#: ``Received.pidfd`` of a packet from the same process as the previous packet on
#: its connection (Linux): the caller reuses the Peer it made for that one.
SAME_PEER = -2


class Received:
    """One received packet, a connection's end, or a connection refused at accept.

    Fields:

    * ``status``: a :class:`machipc.wire.Drop` (``OK``: a valid packet;
      ``CLOSED``: the connection ended; anything else: why it was dropped).
    * ``conn``: the connection it came on (a transport ``Conn``; None for a
      connection refused at accept).
    * ``kind``, ``flags``, ``request_id``: the header's (0 when there was none).
    * ``payload``: ``bytes`` for an inline payload, a
      :class:`machipc.payload.Untaken` for a server's large one, a
      ``memoryview`` for a client's large one, a ``Batch`` (``len()`` messages,
      ``items()`` their payloads) for a server's BATCH packet (docs/protocol.md
      §5.4); ``b""`` when dropped.
    * ``pid``, ``uid``, ``gid``: the kernel's credentials of the sender
      (``SCM_CREDENTIALS`` on Linux, the audit trailer on macOS); 0 if none.
    * ``pidfd`` (Linux): a pidfd of the sender that the caller now owns
      (``>= 0``), -1 (none), or :data:`SAME_PEER`. Always -1 on macOS.
    * ``peer`` (macOS): the :class:`machipc.Peer` built from the message's
      audit token; None on Linux, where the caller builds it from ``pidfd``.
    """

    __slots__ = ("status", "conn", "kind", "flags", "request_id", "payload", "pid", "uid", "gid", "pidfd", "peer")

    def __init__(
        self, status: int, conn: Any, kind: int = 0, flags: int = 0, request_id: int = 0, payload: Any = b"",
        pid: int = 0, uid: int = 0, gid: int = 0, pidfd: int = -1, peer: Optional[Any] = None,
    ) -> None:
        self.status = status
        self.conn = conn
        self.kind = kind
        self.flags = flags
        self.request_id = request_id
        self.payload = payload
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.pidfd = pidfd
        self.peer = peer

    def __repr__(self) -> str:
        return (f"<Received status={self.status} kind={self.kind} flags={self.flags:#x} request_id={self.request_id} "
                f"pid={self.pid} uid={self.uid} gid={self.gid} pidfd={self.pidfd}>")


def take_many(recv: Callable[[Optional[float]], Any], max_count: int, timeout: Optional[float]) -> list:
    """``ServerTransport.recv_many`` from its ``recv``: up to ``max_count`` of what ``recv``
    returns, waiting up to ``timeout`` only for the first (see machipc.unix). A Received
    ends the list: the server judges it before more is taken (it may cache an admission
    for the packets that follow, and a large payload is taken before the next)."""
    got = recv(timeout)
    if got is None:
        return []
    out = [got]
    while len(out) < max_count:
        if got.__class__ is Received:
            break  # the server judges it first: it may cache an admission for what follows
        got = recv(0.0)
        if got is None:
            break
        out.append(got)
    return out
