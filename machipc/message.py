"""``Message``: one received payload, who sent it, and how to answer it."""

from __future__ import annotations

from abc import ABCMeta
from typing import TYPE_CHECKING, Optional

from . import payload
from .errors import InvalidArgument
from .wire import INLINE_MAX, ErrorCode, Kind, pack_error

if TYPE_CHECKING:
    from .peer import Peer

__all__ = ["Message"]

_REPLY = int(Kind.REPLY)  # a plain int: the enum attribute lookup costs more than the send's checks


class Message(metaclass=ABCMeta):
    """A message the server's policy allowed.

    ``data`` is the payload: ``bytes`` when it travelled inline, a read-only
    zero-copy ``memoryview`` of a sealed memfd when it was large (the mapping
    goes when the last reference does). ``sender`` is the kernel-reported
    :class:`~machipc.Peer`. Requests must be answered once with :meth:`reply`
    (``Server.serve`` does that with the handler's return value).

    This is the pure-Python twin; the Cython transport hands out
    ``machipc._message.Message``, an extension type with the same fields and
    methods, registered as a virtual subclass so ``isinstance`` holds for both.
    """

    __slots__ = ("data", "sender", "request_id", "decision", "_conn", "_reply_timeout", "_answered", "_limit")

    def __init__(
        self,
        data: "bytes | memoryview",
        sender: "Peer",
        request_id: int,
        conn,
        reply_timeout: Optional[float],
        decision=None,
        limit: int = payload.MAX_PAYLOAD,
    ) -> None:
        self.data = data
        self.sender = sender
        self.request_id = request_id
        self.decision = decision
        self._conn = conn
        self._reply_timeout = reply_timeout
        self._answered = False
        self._limit = limit

    @property
    def expects_reply(self) -> bool:
        """True for a request (``Client.request``), False for a one-way message."""
        return self.request_id != 0

    @property
    def answered(self) -> bool:
        """True once a reply or an error was sent for this request."""
        return self._answered

    def _check_answerable(self) -> None:
        if not self.request_id:
            raise InvalidArgument("this is a one-way message (Client.send): it cannot be replied to")
        if self._answered:
            raise InvalidArgument(f"request {self.request_id} was already answered")

    def reply(self, data: "payload.Payload" = b"") -> None:
        """Send ``data`` back to the requesting client (any size up to the limit).

        ``data`` may be a buffer from :meth:`buffer`, sent without a copy.
        Raises InvalidArgument for one-way messages or a second reply,
        MessageTooLarge over the size limit, PeerGone if the client left.
        """
        self._check_answerable()
        if type(data) is bytes and len(data) <= INLINE_MAX:  # the common case: straight to the transport
            self._conn.send(_REPLY, self.request_id, data, self._reply_timeout)
        else:
            payload.send(self._conn, _REPLY, self.request_id, data, self._reply_timeout, self._limit)
        self._answered = True

    def buffer(self, size: int) -> "payload.LoanBuffer":
        """A writable buffer to build a large reply in place: ``msg.reply(buf)`` sends it uncopied."""
        return payload.loan(size, self._limit)

    def fail(self, text: str, code: int = ErrorCode.HANDLER_FAILED) -> None:
        """Answer the request with an error; the client's ``request`` raises it."""
        self._check_answerable()
        self._answered = True
        self._conn.send(Kind.ERROR, self.request_id, pack_error(code, text), self._reply_timeout)

    def __repr__(self) -> str:
        kind = f"request {self.request_id}" if self.request_id else "one-way"
        return f"<Message {kind} {len(self.data)} bytes from {self.sender!r}>"
