"""machipc: kernel-authenticated local IPC for Python daemons.

The kernel, not the sender, tells the server who sent each message; a policy
decides whether that sender is trusted before any handler sees the bytes::

    import machipc
    with machipc.Server("org.example.echo") as srv:
        srv.serve(lambda msg: b"pong")
"""

try:
    from . import policies
except ImportError as _exc:
    if _exc.name != __name__:
        raise
    # A source checkout that was never installed: machipc.policies lives in ./policies
    # and only an install (editable or not) maps it there.
    raise ImportError(
        "machipc is not installed: in the source checkout run `make install` (or `pip install -e .`), "
        "which maps machipc.policies and builds the Cython transport"
    ) from None
from ._backend import PURE_PYTHON
from .client import Client
from .errors import (
    InvalidArgument,
    IPCError,
    IPCTimeoutError,
    MessageTooLarge,
    NotPermitted,
    PeerGone,
    ProtocolError,
    Rejected,
    RemoteError,
    ServerBusy,
    ServerClosed,
    ServiceInUse,
    ServiceNotFound,
)
from .message import Message
from .peer import Peer, peer_of
from .policies import Decision, Policy
from .server import Server, ServerStats

__version__ = "0.1.0"

__all__ = [
    "Server",
    "Client",
    "Message",
    "Peer",
    "peer_of",
    "ServerStats",
    "Decision",
    "Policy",
    "policies",
    "IPCError",
    "IPCTimeoutError",
    "ServiceNotFound",
    "ServiceInUse",
    "NotPermitted",
    "Rejected",
    "PeerGone",
    "MessageTooLarge",
    "InvalidArgument",
    "ProtocolError",
    "RemoteError",
    "ServerBusy",
    "ServerClosed",
    "PURE_PYTHON",
]
