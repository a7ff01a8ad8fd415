# cython: language_level=3
"""``Message`` as an extension type (the twin of machipc/message.py, whose docstrings hold).

The Cython transport builds these directly for packets its connection's
cached admission lets through (machipc._unix), so a message costs one
allocation and no Python call. ``isinstance(msg, machipc.Message)`` holds for
both twins: the pure class registers this one as a virtual subclass.
"""

from . import payload as _payload
from .errors import InvalidArgument
from .message import Message as _PureMessage
from .wire import INLINE_MAX, ErrorCode, Kind, pack_error

cdef int _REPLY = Kind.REPLY
cdef int _ERROR = Kind.ERROR
cdef Py_ssize_t _INLINE_MAX = INLINE_MAX


cdef class Message:
    """A message the server's policy allowed (see machipc.message.Message)."""

    def __init__(self, data, sender, unsigned long long request_id, conn, reply_timeout, decision=None,
                 limit=_payload.MAX_PAYLOAD):
        self.data = data
        self.sender = sender
        self.request_id = request_id
        self.decision = decision
        self._conn = conn
        self._reply_timeout = reply_timeout
        self._answered = False
        self._limit = limit

    @property
    def expects_reply(self):
        """True for a request (``Client.request``), False for a one-way message."""
        return self.request_id != 0

    @property
    def answered(self):
        """True once a reply or an error was sent for this request."""
        return self._answered

    cdef int _check_answerable(self) except -1:
        if not self.request_id:
            raise InvalidArgument("this is a one-way message (Client.send): it cannot be replied to")
        if self._answered:
            raise InvalidArgument(f"request {self.request_id} was already answered")
        return 0

    def reply(self, data=b""):
        """Send ``data`` back to the requesting client (see machipc.message.Message.reply)."""
        self._check_answerable()
        if type(data) is bytes and len(<bytes>data) <= _INLINE_MAX:  # the common case: straight to the transport
            self._conn.send(_REPLY, self.request_id, data, self._reply_timeout)
        else:
            _payload.send(self._conn, _REPLY, self.request_id, data, self._reply_timeout, self._limit)
        self._answered = True

    def buffer(self, size):
        """A writable buffer to build a large reply in place: ``msg.reply(buf)`` sends it uncopied."""
        return _payload.loan(size, self._limit)

    def fail(self, text, code=ErrorCode.HANDLER_FAILED):
        """Answer the request with an error; the client's ``request`` raises it."""
        self._check_answerable()
        self._answered = True
        self._conn.send(_ERROR, self.request_id, pack_error(code, text), self._reply_timeout)

    def __repr__(self):
        kind = f"request {self.request_id}" if self.request_id else "one-way"
        return f"<Message {kind} {len(self.data)} bytes from {self.sender!r}>"


_PureMessage.register(Message)


def dispatch_batch(server, handler, list batch):
    """``Server.serve``'s loop over one batch: ``handler(msg)`` for each message, in
    order, and for an unanswered request its reply. The twin of
    ``Server._dispatch_each``; what is rare stays there in Python
    (``server._handler_failed``, ``server._answer_result``). Stops when the server
    is closed (``close()`` from a handler)."""
    for msg in batch:
        if server._closed:
            return
        try:
            result = handler(msg)
        except Exception as exc:
            server._handler_failed(msg, exc)
            continue
        if type(msg) is Message:
            if (<Message>msg).request_id and not (<Message>msg)._answered:
                server._answer_result(msg, result)
        elif msg.request_id and not msg._answered:
            server._answer_result(msg, result)
