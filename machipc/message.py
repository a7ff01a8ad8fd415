"""``Message``: one received payload, who sent it, and how to answer it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .errors import InvalidArgument, MessageTooLarge
from .wire import INLINE_MAX, ErrorCode, Kind, pack_error

if TYPE_CHECKING:
    from .peer import Peer

__all__ = ["Message"]


class Message:
    """A message the server's policy allowed.

    ``data`` is the payload (bytes), ``sender`` the kernel-reported
    :class:`~machipc.Peer`. Requests must be answered once with :meth:`reply`
    (``Server.serve`` does that with the handler's return value).
    """

    __slots__ = ("data", "sender", "request_id", "decision", "_conn", "_reply_timeout", "_answered")

    def __init__(self, data: bytes, sender: "Peer", request_id: int, conn, reply_timeout: Optional[float], decision=None) -> None:
        self.data = data
        self.sender = sender
        self.request_id = request_id
        self.decision = decision
        self._conn = conn
        self._reply_timeout = reply_timeout
        self._answered = False

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

    def reply(self, data: bytes = b"") -> None:
        """Send ``data`` back to the requesting client.

        Raises InvalidArgument for one-way messages or a second reply,
        MessageTooLarge over the size limit, PeerGone if the client left.
        """
        self._check_answerable()
        if len(data) > INLINE_MAX:
            raise MessageTooLarge(f"reply of {len(data)} bytes is over the {INLINE_MAX}-byte limit")
        self._answered = True
        self._conn.send(Kind.REPLY, self.request_id, data, self._reply_timeout)

    def fail(self, text: str, code: int = ErrorCode.HANDLER_FAILED) -> None:
        """Answer the request with an error; the client's ``request`` raises it."""
        self._check_answerable()
        self._answered = True
        self._conn.send(Kind.ERROR, self.request_id, pack_error(code, text), self._reply_timeout)

    def __repr__(self) -> str:
        kind = f"request {self.request_id}" if self.request_id else "one-way"
        return f"<Message {kind} {len(self.data)} bytes from {self.sender!r}>"
