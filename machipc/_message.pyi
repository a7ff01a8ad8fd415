# Type stubs for machipc/_message.pyx; machipc/message.py is its pure twin (same API).
from typing import Optional

from .payload import LoanBuffer, Payload
from .peer import Peer
from .policies import Decision

class Message:
    data: bytes | memoryview
    sender: Peer
    request_id: int
    decision: Optional[Decision]
    def __init__(self, data: bytes | memoryview, sender: Peer, request_id: int, conn: object,
                 reply_timeout: Optional[float], decision: Optional[Decision] = ..., limit: int = ...) -> None: ...
    @property
    def expects_reply(self) -> bool: ...
    @property
    def answered(self) -> bool: ...
    def reply(self, data: Payload = ...) -> None: ...
    def buffer(self, size: int) -> LoanBuffer: ...
    def fail(self, text: str, code: int = ...) -> None: ...
