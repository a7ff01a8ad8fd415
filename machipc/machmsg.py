"""Portable parser and validator of received Mach messages (macOS transport).

This module runs everywhere (it only reads bytes), so the rules deciding what a
received Mach message may contain are tested and fuzzed on Linux. The Cython
receive path (``_mach.pyx``) receives into a buffer and hands that buffer to
:func:`parse`; it then acts on the verdict (take the OOL region and the reply
right, or ``mach_msg_destroy`` the whole message). ``_mach_layout.h`` holds
``_Static_assert``\\ s proving every offset and size below against the macOS SDK
headers (``make macos-check`` compiles them).

What a machipc Mach message looks like (64-bit user space, ``#pragma pack(4)``)::

    offset size  field
    0      24    mach_msg_header_t: bits, size, remote, local, voucher, id
    -- simple message (MACH_MSGH_BITS_COMPLEX clear) --
    24     24+n  machipc wire header (machipc/wire.py) + inline payload
    -- complex message (one OOL descriptor) --
    24     4     mach_msg_body_t.msgh_descriptor_count == 1
    28     16    mach_msg_ool_descriptor_t: address u64, deallocate u8, copy u8,
                 pad u8, type u8 (== MACH_MSG_OOL_DESCRIPTOR), size u32
    44     24    machipc wire header whose length == the descriptor's size
    round_msg(msgh_size)   the trailer the receiver asked for:
                 mach_msg_audit_trailer_t (52 bytes), audit token at +20

Nothing in a message is trusted before its size has been checked against the
buffer and the kernel-written trailer has been found and checked.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple, Optional

from .errors import (
    InvalidArgument,
    IPCError,
    IPCTimeoutError,
    MessageTooLarge,
    NotPermitted,
    PeerGone,
    ServiceInUse,
    ServiceNotFound,
)
from .wire import HEADER_SIZE as WIRE_HEADER_SIZE
from .wire import Drop

__all__ = [
    "AuditToken",
    "Parsed",
    "Reject",
    "parse",
    "round_msg",
    "build_simple",
    "build_ool",
    "build_send_once_notification",
    "kern_error",
    "kern_name",
    "bootstrap_error",
]

# -- mach_msg_header_t (24 bytes in user space) -------------------------------
MSG_HEADER_SIZE = 24
OFF_MSGH_BITS = 0
OFF_MSGH_SIZE = 4
OFF_MSGH_REMOTE_PORT = 8
OFF_MSGH_LOCAL_PORT = 12
OFF_MSGH_VOUCHER_PORT = 16
OFF_MSGH_ID = 20
MSG_HEADER = struct.Struct("<IIIIIi")

# -- mach_msg_body_t and descriptors (64-bit user layout) ---------------------
MSG_BODY_SIZE = 4  # mach_msg_body_t: msgh_descriptor_count
OFF_DESCRIPTOR_COUNT = MSG_HEADER_SIZE  # 24
OFF_FIRST_DESCRIPTOR = MSG_HEADER_SIZE + MSG_BODY_SIZE  # 28
OOL_DESCRIPTOR_SIZE = 16  # mach_msg_ool_descriptor_t
PORT_DESCRIPTOR_SIZE = 12  # mach_msg_port_descriptor_t
OFF_OOL_ADDRESS = 0
OFF_OOL_DEALLOCATE = 8
OFF_OOL_COPY = 9
OFF_OOL_TYPE = 11  # the type byte sits at +11 in every user descriptor
OFF_OOL_SIZE = 12
OOL_DESCRIPTOR = struct.Struct("<QBBBBI")
#: Size of a complex machipc message before its inline bytes.
COMPLEX_PREFIX_SIZE = OFF_FIRST_DESCRIPTOR + OOL_DESCRIPTOR_SIZE  # 44

# -- trailers ----------------------------------------------------------------
TRAILER_HEAD_SIZE = 8  # mach_msg_trailer_t: type, size
OFF_TRAILER_TYPE = 0
OFF_TRAILER_SIZE = 4
OFF_TRAILER_SEQNO = 8
OFF_TRAILER_SENDER = 12  # security_token_t (uid, gid)
OFF_TRAILER_AUDIT = 20  # audit_token_t
AUDIT_TOKEN_SIZE = 32
AUDIT_TRAILER_SIZE = 52  # mach_msg_audit_trailer_t
MAX_TRAILER_SIZE = 68  # mach_msg_max_trailer_t: what a receive buffer must leave room for
AUDIT_TOKEN = struct.Struct("<8I")

# -- constants from <mach/message.h>, <mach/port.h>, <mach/notify.h> ---------
MACH_MSGH_BITS_REMOTE_MASK = 0x0000001F
MACH_MSGH_BITS_LOCAL_MASK = 0x00001F00
MACH_MSGH_BITS_VOUCHER_MASK = 0x001F0000
MACH_MSGH_BITS_COMPLEX = 0x80000000
MACH_MSGH_BITS_USER = 0x801F1F1F

MACH_MSG_TYPE_MOVE_RECEIVE = 16
MACH_MSG_TYPE_MOVE_SEND = 17
MACH_MSG_TYPE_MOVE_SEND_ONCE = 18
MACH_MSG_TYPE_COPY_SEND = 19
MACH_MSG_TYPE_MAKE_SEND = 20
MACH_MSG_TYPE_MAKE_SEND_ONCE = 21
MACH_MSG_TYPE_PORT_SEND_ONCE = MACH_MSG_TYPE_MOVE_SEND_ONCE  # as seen by a receiver

MACH_MSG_PORT_DESCRIPTOR = 0
MACH_MSG_OOL_DESCRIPTOR = 1
MACH_MSG_OOL_PORTS_DESCRIPTOR = 2
MACH_MSG_OOL_VOLATILE_DESCRIPTOR = 3
MACH_MSG_GUARDED_PORT_DESCRIPTOR = 4

MACH_MSG_PHYSICAL_COPY = 0
MACH_MSG_VIRTUAL_COPY = 1

MACH_MSG_TRAILER_FORMAT_0 = 0
MACH_RCV_TRAILER_AUDIT = 3


def MACH_MSGH_BITS(remote: int, local: int) -> int:
    return remote | (local << 8)


def MACH_RCV_TRAILER_TYPE(x: int) -> int:
    return (x & 0xF) << 28


def MACH_RCV_TRAILER_ELEMENTS(x: int) -> int:
    return (x & 0xF) << 24


#: The receive option bits asking for the audit trailer.
RCV_TRAILER_OPTIONS = MACH_RCV_TRAILER_TYPE(MACH_MSG_TRAILER_FORMAT_0) | MACH_RCV_TRAILER_ELEMENTS(MACH_RCV_TRAILER_AUDIT)

# mach_msg() options (<mach/message.h>). machipc passes MACH_RCV_INTERRUPT and
# MACH_SEND_INTERRUPT: without them libsyscall's mach_msg() restarts an interrupted
# wait itself (``while (mr == MACH_RCV_INTERRUPTED)``, libsyscall/mach/mach_msg.c),
# so Python signal handlers (SIGTERM -> Server.stop) could not run until a message came.
MACH_MSG_SUCCESS = 0
MACH_SEND_MSG = 0x00000001
MACH_RCV_MSG = 0x00000002
MACH_RCV_LARGE = 0x00000004
MACH_SEND_TIMEOUT = 0x00000010
MACH_SEND_INTERRUPT = 0x00000040
MACH_RCV_TIMEOUT = 0x00000100
MACH_RCV_INTERRUPT = 0x00000400
#: What _mach.pyx passes to every receive (plus MACH_RCV_TIMEOUT with a timeout).
RECV_OPTIONS = MACH_RCV_MSG | MACH_RCV_LARGE | MACH_RCV_INTERRUPT | RCV_TRAILER_OPTIONS
#: What _mach.pyx passes to every send (plus MACH_SEND_TIMEOUT with a timeout).
SEND_OPTIONS = MACH_SEND_MSG | MACH_SEND_INTERRUPT
#: Bits a failed mach_msg() may or into its return code (MACH_MSG_IPC_SPACE, VM_SPACE,
#: IPC_KERNEL, VM_KERNEL: <mach/message.h>); classify errors with ``kr & ~MACH_MSG_MASK``.
MACH_MSG_MASK = 0x00003E00
MACH_MSG_IPC_SPACE = 0x00002000

MACH_NOTIFY_NO_SENDERS = 70
MACH_NOTIFY_SEND_ONCE = 71
MACH_NOTIFY_DEAD_NAME = 72

#: ``msgh_id`` of every machipc message ("mipc").
MACHIPC_MSGH_ID = 0x6D697063

MACH_PORT_QLIMIT_DEFAULT = 5
MACH_PORT_QLIMIT_MAX = 1024
#: ``name_t`` is ``char[128]``: at most 127 bytes and the NUL.
BOOTSTRAP_NAME_MAX = 127


def round_msg(size: int) -> int:
    """``round_msg`` from <mach/message.h>: round up to a multiple of 4."""
    return (size + 3) & ~3


class AuditToken(NamedTuple):
    """``audit_token_t`` as the kernel wrote it (``val[0]`` .. ``val[7]``)."""

    auid: int
    euid: int
    egid: int
    ruid: int
    rgid: int
    pid: int
    asid: int
    pidversion: int

    def pack(self) -> bytes:
        return AUDIT_TOKEN.pack(*self)


class Reject(enum.IntEnum):
    """Why a received Mach message is refused (0 means it is well-formed)."""

    OK = 0
    SHORT_HEADER = 1  # fewer than 24 bytes
    BAD_SIZE = 2  # msgh_size below the header or past the buffer
    NO_TRAILER = 3  # no room for a trailer after round_msg(msgh_size)
    BAD_TRAILER_TYPE = 4
    TRAILER_TOO_SMALL = 5  # msgh_trailer_size below the audit trailer
    TRAILER_TRUNCATED = 6  # trailer size claims more than the buffer holds
    KERNEL_SENDER = 7  # pid 0 on a machipc message
    BAD_ID = 8  # msgh_id is not machipc's (nor an expected notification)
    UNEXPECTED_VOUCHER = 9
    UNEXPECTED_RIGHT = 10  # a header right other than a send-once reply right
    COMPLEX_WITHOUT_BODY = 11  # complex bit but no room for the descriptor count
    BAD_DESCRIPTOR_COUNT = 12  # complex with a count other than 1
    BAD_DESCRIPTOR_TYPE = 13  # not a plain (non-volatile) OOL descriptor
    DESCRIPTOR_TRUNCATED = 14  # descriptor runs past msgh_size
    SHORT_BODY = 15  # inline body shorter than the machipc header
    BAD_OOL_SIZE = 16  # OOL size != header length, or OOL with inline payload
    EMPTY_OOL = 17  # an OOL descriptor of 0 bytes
    BAD_NOTIFICATION = 18  # a notification with a body, bits, or from a process


REJECT_TEXT = {
    Reject.SHORT_HEADER: "message shorter than mach_msg_header_t",
    Reject.BAD_SIZE: "msgh_size is below the header or past the received bytes",
    Reject.NO_TRAILER: "no trailer after the message",
    Reject.BAD_TRAILER_TYPE: "trailer is not MACH_MSG_TRAILER_FORMAT_0",
    Reject.TRAILER_TOO_SMALL: "trailer smaller than mach_msg_audit_trailer_t (no audit token)",
    Reject.TRAILER_TRUNCATED: "trailer runs past the received bytes",
    Reject.KERNEL_SENDER: "audit token says pid 0 (not a process)",
    Reject.BAD_ID: "msgh_id is not machipc's",
    Reject.UNEXPECTED_VOUCHER: "unexpected voucher port (destroyed)",
    Reject.UNEXPECTED_RIGHT: "unexpected port right in the header (destroyed)",
    Reject.COMPLEX_WITHOUT_BODY: "MACH_MSGH_BITS_COMPLEX without a descriptor count",
    Reject.BAD_DESCRIPTOR_COUNT: "descriptor count is not 1",
    Reject.BAD_DESCRIPTOR_TYPE: "descriptor is not a plain out-of-line region (destroyed)",
    Reject.DESCRIPTOR_TRUNCATED: "descriptor runs past msgh_size",
    Reject.SHORT_BODY: "body shorter than the machipc header",
    Reject.BAD_OOL_SIZE: "out-of-line size does not match the machipc header",
    Reject.EMPTY_OOL: "empty out-of-line region",
    Reject.BAD_NOTIFICATION: "malformed notification",
}

#: The machipc transport status (wire.Drop) each rejection is counted as.
REJECT_DROP = {
    Reject.OK: Drop.OK,
    Reject.SHORT_HEADER: Drop.SHORT,
    Reject.BAD_SIZE: Drop.SHORT,
    Reject.NO_TRAILER: Drop.NO_CREDENTIALS,
    Reject.BAD_TRAILER_TYPE: Drop.NO_CREDENTIALS,
    Reject.TRAILER_TOO_SMALL: Drop.NO_CREDENTIALS,
    Reject.TRAILER_TRUNCATED: Drop.NO_CREDENTIALS,
    Reject.KERNEL_SENDER: Drop.NO_CREDENTIALS,
    Reject.BAD_ID: Drop.BAD_MAGIC,
    Reject.UNEXPECTED_VOUCHER: Drop.UNEXPECTED_FDS,
    Reject.UNEXPECTED_RIGHT: Drop.UNEXPECTED_FDS,
    Reject.COMPLEX_WITHOUT_BODY: Drop.SHORT,
    Reject.BAD_DESCRIPTOR_COUNT: Drop.UNEXPECTED_FDS,
    Reject.BAD_DESCRIPTOR_TYPE: Drop.UNEXPECTED_FDS,
    Reject.DESCRIPTOR_TRUNCATED: Drop.SHORT,
    Reject.SHORT_BODY: Drop.SHORT,
    Reject.BAD_OOL_SIZE: Drop.BAD_LENGTH,
    Reject.EMPTY_OOL: Drop.BAD_LENGTH,
    Reject.BAD_NOTIFICATION: Drop.BAD_MAGIC,
}


class Parsed(NamedTuple):
    """A received message that passed :func:`parse` (or as far as it got)."""

    msgh_bits: int
    msgh_size: int
    msgh_id: int
    remote_port: int  # the send-once reply right (0: none)
    local_port: int
    audit: Optional[AuditToken]  # None only when the trailer was unusable
    notification: bool  # MACH_NOTIFY_SEND_ONCE from the kernel
    inline_offset: int  # where the machipc header starts in the buffer
    inline_size: int  # machipc header + inline payload bytes
    ool_address: int  # 0 when there is no OOL region
    ool_size: int
    trailer_size: int

    @property
    def complex(self) -> bool:
        return bool(self.msgh_bits & MACH_MSGH_BITS_COMPLEX)

    def inline(self, buf) -> memoryview:
        """The machipc header (+ inline payload) inside ``buf``."""
        return memoryview(buf)[self.inline_offset : self.inline_offset + self.inline_size]


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
#: Offset of the payload length inside the machipc wire header (machipc/wire.py).
OFF_WIRE_LENGTH = 16


def parse(buf, *, allow_notification: bool = False) -> tuple[Reject, Optional[Parsed]]:
    """Validate one received Mach message + audit trailer held in ``buf``.

    ``buf`` is the receive buffer (it may be longer than the message). Returns
    ``(Reject.OK, parsed)`` or ``(reason, parsed_or_None)``; a partial result
    carries the audit token whenever the trailer could be read, so a rejection
    can still be logged with the sender's pid. Reply ports and OOL regions of a
    rejected message belong to nobody: the caller must ``mach_msg_destroy`` it.
    ``allow_notification`` accepts ``MACH_NOTIFY_SEND_ONCE`` (client reply ports).
    """
    buf = memoryview(buf).cast("B")
    n = len(buf)
    if n < MSG_HEADER_SIZE:
        return Reject.SHORT_HEADER, None
    bits, size, remote, local, voucher, msgh_id = MSG_HEADER.unpack_from(buf, 0)
    if size < MSG_HEADER_SIZE or size > n:
        return Reject.BAD_SIZE, None
    # The trailer: kernel-written, found at round_msg(msgh_size), checked first.
    toff = round_msg(size)
    if toff + TRAILER_HEAD_SIZE > n:
        return Reject.NO_TRAILER, None
    ttype = _U32.unpack_from(buf, toff + OFF_TRAILER_TYPE)[0]
    tsize = _U32.unpack_from(buf, toff + OFF_TRAILER_SIZE)[0]
    if ttype != MACH_MSG_TRAILER_FORMAT_0:
        return Reject.BAD_TRAILER_TYPE, None
    if tsize < AUDIT_TRAILER_SIZE:
        return Reject.TRAILER_TOO_SMALL, None
    if toff + tsize > n:
        return Reject.TRAILER_TRUNCATED, None
    audit = AuditToken(*AUDIT_TOKEN.unpack_from(buf, toff + OFF_TRAILER_AUDIT))

    def partial(reason: Reject, **kw) -> tuple[Reject, Parsed]:
        fields = dict(
            msgh_bits=bits, msgh_size=size, msgh_id=msgh_id, remote_port=remote, local_port=local,
            audit=audit, notification=False, inline_offset=0, inline_size=0, ool_address=0,
            ool_size=0, trailer_size=tsize,
        )
        fields.update(kw)
        return reason, Parsed(**fields)

    if voucher != 0 or bits & MACH_MSGH_BITS_VOUCHER_MASK:
        return partial(Reject.UNEXPECTED_VOUCHER)
    remote_type = bits & MACH_MSGH_BITS_REMOTE_MASK
    if msgh_id == MACH_NOTIFY_SEND_ONCE and allow_notification:
        # mach_send_once_notification_t: a bare header from the kernel.
        if size != MSG_HEADER_SIZE or bits & MACH_MSGH_BITS_COMPLEX or remote != 0 or audit.pid != 0:
            return partial(Reject.BAD_NOTIFICATION)
        return partial(Reject.OK, notification=True)
    if msgh_id != MACHIPC_MSGH_ID:
        return partial(Reject.BAD_ID)
    if audit.pid == 0:
        return partial(Reject.KERNEL_SENDER)
    if remote != 0 and remote_type != MACH_MSG_TYPE_PORT_SEND_ONCE:
        return partial(Reject.UNEXPECTED_RIGHT)
    if remote == 0 and remote_type != 0:
        return partial(Reject.UNEXPECTED_RIGHT)
    if not bits & MACH_MSGH_BITS_COMPLEX:
        body = size - MSG_HEADER_SIZE
        if body < WIRE_HEADER_SIZE:
            return partial(Reject.SHORT_BODY)
        # msgh_size is a multiple of 4, so a sender pads the payload by up to 3
        # bytes: trust the machipc length only within that padding (anything
        # else is left for wire.check_header to report as BAD_LENGTH).
        length = _U64.unpack_from(buf, MSG_HEADER_SIZE + OFF_WIRE_LENGTH)[0]
        if 0 <= body - WIRE_HEADER_SIZE - length <= 3:
            body = WIRE_HEADER_SIZE + length
        return partial(Reject.OK, inline_offset=MSG_HEADER_SIZE, inline_size=body)
    if size < OFF_FIRST_DESCRIPTOR:
        return partial(Reject.COMPLEX_WITHOUT_BODY)
    count = _U32.unpack_from(buf, OFF_DESCRIPTOR_COUNT)[0]
    if count != 1:
        return partial(Reject.BAD_DESCRIPTOR_COUNT)
    # The type byte is at +11 in every user descriptor, so it can be read
    # whenever 12 bytes are present, before the descriptor's size is known.
    if size < OFF_FIRST_DESCRIPTOR + PORT_DESCRIPTOR_SIZE:
        return partial(Reject.DESCRIPTOR_TRUNCATED)
    dtype = buf[OFF_FIRST_DESCRIPTOR + OFF_OOL_TYPE]
    if dtype != MACH_MSG_OOL_DESCRIPTOR:
        return partial(Reject.BAD_DESCRIPTOR_TYPE)
    if size < COMPLEX_PREFIX_SIZE:
        return partial(Reject.DESCRIPTOR_TRUNCATED)
    address, _dealloc, _copy, _pad, _type, ool_size = OOL_DESCRIPTOR.unpack_from(buf, OFF_FIRST_DESCRIPTOR)
    body = size - COMPLEX_PREFIX_SIZE
    got = dict(inline_offset=COMPLEX_PREFIX_SIZE, inline_size=body, ool_address=address, ool_size=ool_size)
    if body < WIRE_HEADER_SIZE:
        return partial(Reject.SHORT_BODY, **got)
    if body != WIRE_HEADER_SIZE:
        return partial(Reject.BAD_OOL_SIZE, **got)
    if ool_size == 0:
        return partial(Reject.EMPTY_OOL, **got)
    length = _U64.unpack_from(buf, COMPLEX_PREFIX_SIZE + OFF_WIRE_LENGTH)[0]
    if length != ool_size:
        return partial(Reject.BAD_OOL_SIZE, **got)
    return partial(Reject.OK, **got)


# -- builders: what a sender lays out (used by tests and documentation) ------


def _trailer(audit: AuditToken, seqno: int = 0, size: int = AUDIT_TRAILER_SIZE, ttype: int = 0) -> bytes:
    t = struct.pack("<III", ttype, size, seqno) + struct.pack("<II", audit.euid, audit.egid) + audit.pack()
    return t + bytes(max(0, size - len(t)))


def build_simple(wire_packet: bytes, audit: Optional[AuditToken], *, reply_port: int = 0, local_port: int = 0x1103,
                 msgh_id: int = MACHIPC_MSGH_ID) -> bytes:
    """A received simple message (header + inline bytes [+ audit trailer]) as the kernel lays it out."""
    bits = MACH_MSGH_BITS(MACH_MSG_TYPE_PORT_SEND_ONCE if reply_port else 0, MACH_MSG_TYPE_MOVE_SEND)
    size = round_msg(MSG_HEADER_SIZE + len(wire_packet))  # senders pad to a multiple of 4
    msg = MSG_HEADER.pack(bits, size, reply_port, local_port, 0, msgh_id) + wire_packet
    msg += bytes(size - len(msg))
    return msg + (_trailer(audit) if audit is not None else b"")


def build_ool(wire_header: bytes, ool_address: int, ool_size: int, audit: Optional[AuditToken], *, reply_port: int = 0,
              local_port: int = 0x1103, dtype: int = MACH_MSG_OOL_DESCRIPTOR, count: int = 1) -> bytes:
    """A received complex message with one OOL descriptor [+ audit trailer]."""
    bits = MACH_MSGH_BITS_COMPLEX | MACH_MSGH_BITS(MACH_MSG_TYPE_PORT_SEND_ONCE if reply_port else 0, MACH_MSG_TYPE_MOVE_SEND)
    body = _U32.pack(count) + OOL_DESCRIPTOR.pack(ool_address, 0, MACH_MSG_VIRTUAL_COPY, 0, dtype, ool_size)
    size = MSG_HEADER_SIZE + len(body) + len(wire_header)
    msg = MSG_HEADER.pack(bits, size, reply_port, local_port, 0, MACHIPC_MSGH_ID) + body + wire_header
    msg += bytes(round_msg(size) - size)
    return msg + (_trailer(audit) if audit is not None else b"")


def build_send_once_notification(local_port: int = 0x2203) -> bytes:
    """What the kernel delivers to a reply port whose send-once right was dropped."""
    bits = MACH_MSGH_BITS(0, MACH_MSG_TYPE_PORT_SEND_ONCE)
    msg = MSG_HEADER.pack(bits, MSG_HEADER_SIZE, 0, local_port, 0, MACH_NOTIFY_SEND_ONCE)
    return msg + _trailer(AuditToken(0, 0, 0, 0, 0, 0, 0, 0))


# -- kern_return_t / bootstrap error codes ------------------------------------

KERN_NAMES: dict[int, str] = {
    0: "KERN_SUCCESS",
    1: "KERN_INVALID_ADDRESS",
    2: "KERN_PROTECTION_FAILURE",
    3: "KERN_NO_SPACE",
    4: "KERN_INVALID_ARGUMENT",
    5: "KERN_FAILURE",
    6: "KERN_RESOURCE_SHORTAGE",
    10: "KERN_NO_ACCESS",
    14: "KERN_ABORTED",
    15: "KERN_INVALID_NAME",
    16: "KERN_INVALID_TASK",
    17: "KERN_INVALID_RIGHT",
    18: "KERN_INVALID_VALUE",
    19: "KERN_UREFS_OVERFLOW",
    20: "KERN_INVALID_CAPABILITY",
    21: "KERN_RIGHT_EXISTS",
    22: "KERN_INVALID_HOST",
    37: "KERN_NOT_SUPPORTED",
    49: "KERN_OPERATION_TIMED_OUT",
    0x10000001: "MACH_SEND_IN_PROGRESS",
    0x10000002: "MACH_SEND_INVALID_DATA",
    0x10000003: "MACH_SEND_INVALID_DEST",
    0x10000004: "MACH_SEND_TIMED_OUT",
    0x10000005: "MACH_SEND_INVALID_VOUCHER",
    0x10000007: "MACH_SEND_INTERRUPTED",
    0x10000008: "MACH_SEND_MSG_TOO_SMALL",
    0x10000009: "MACH_SEND_INVALID_REPLY",
    0x1000000A: "MACH_SEND_INVALID_RIGHT",
    0x1000000B: "MACH_SEND_INVALID_NOTIFY",
    0x1000000C: "MACH_SEND_INVALID_MEMORY",
    0x1000000D: "MACH_SEND_NO_BUFFER",
    0x1000000E: "MACH_SEND_TOO_LARGE",
    0x1000000F: "MACH_SEND_INVALID_TYPE",
    0x10000010: "MACH_SEND_INVALID_HEADER",
    0x10000011: "MACH_SEND_INVALID_TRAILER",
    0x10000015: "MACH_SEND_INVALID_RT_OOL_SIZE",
    0x10004001: "MACH_RCV_IN_PROGRESS",
    0x10004002: "MACH_RCV_INVALID_NAME",
    0x10004003: "MACH_RCV_TIMED_OUT",
    0x10004004: "MACH_RCV_TOO_LARGE",
    0x10004005: "MACH_RCV_INTERRUPTED",
    0x10004006: "MACH_RCV_PORT_CHANGED",
    0x10004007: "MACH_RCV_INVALID_NOTIFY",
    0x10004008: "MACH_RCV_INVALID_DATA",
    0x10004009: "MACH_RCV_PORT_DIED",
    0x1000400A: "MACH_RCV_IN_SET",
    0x1000400B: "MACH_RCV_HEADER_ERROR",
    0x1000400C: "MACH_RCV_BODY_ERROR",
    0x1000400D: "MACH_RCV_INVALID_TYPE",
    0x1000400E: "MACH_RCV_SCATTER_SMALL",
    0x1000400F: "MACH_RCV_INVALID_TRAILER",
    1100: "BOOTSTRAP_NOT_PRIVILEGED",
    1101: "BOOTSTRAP_NAME_IN_USE",
    1102: "BOOTSTRAP_UNKNOWN_SERVICE",
    1103: "BOOTSTRAP_SERVICE_ACTIVE",
    1104: "BOOTSTRAP_BAD_COUNT",
    1105: "BOOTSTRAP_NO_MEMORY",
    1106: "BOOTSTRAP_NO_CHILDREN",
}
_NAME_CODES = {v: k for k, v in KERN_NAMES.items()}
MACH_SEND_INVALID_DEST = _NAME_CODES["MACH_SEND_INVALID_DEST"]
MACH_SEND_TIMED_OUT = _NAME_CODES["MACH_SEND_TIMED_OUT"]
MACH_SEND_INTERRUPTED = _NAME_CODES["MACH_SEND_INTERRUPTED"]
MACH_SEND_TOO_LARGE = _NAME_CODES["MACH_SEND_TOO_LARGE"]
MACH_RCV_TIMED_OUT = _NAME_CODES["MACH_RCV_TIMED_OUT"]
MACH_RCV_TOO_LARGE = _NAME_CODES["MACH_RCV_TOO_LARGE"]
MACH_RCV_INTERRUPTED = _NAME_CODES["MACH_RCV_INTERRUPTED"]
MACH_RCV_PORT_DIED = _NAME_CODES["MACH_RCV_PORT_DIED"]
BOOTSTRAP_NOT_PRIVILEGED = 1100
BOOTSTRAP_NAME_IN_USE = 1101
BOOTSTRAP_UNKNOWN_SERVICE = 1102
BOOTSTRAP_SERVICE_ACTIVE = 1103

_KERN_CLASSES: dict[int, type[IPCError]] = {
    _NAME_CODES["MACH_SEND_INVALID_DEST"]: PeerGone,
    _NAME_CODES["MACH_RCV_PORT_DIED"]: PeerGone,
    _NAME_CODES["MACH_SEND_TIMED_OUT"]: IPCTimeoutError,
    _NAME_CODES["MACH_RCV_TIMED_OUT"]: IPCTimeoutError,
    _NAME_CODES["KERN_OPERATION_TIMED_OUT"]: IPCTimeoutError,
    _NAME_CODES["MACH_SEND_TOO_LARGE"]: MessageTooLarge,
    _NAME_CODES["MACH_SEND_NO_BUFFER"]: MessageTooLarge,
    _NAME_CODES["MACH_RCV_TOO_LARGE"]: MessageTooLarge,
    _NAME_CODES["KERN_INVALID_ARGUMENT"]: InvalidArgument,
    _NAME_CODES["KERN_INVALID_VALUE"]: InvalidArgument,
    _NAME_CODES["KERN_INVALID_NAME"]: InvalidArgument,
    _NAME_CODES["KERN_NO_ACCESS"]: NotPermitted,
    _NAME_CODES["KERN_PROTECTION_FAILURE"]: NotPermitted,
    BOOTSTRAP_NOT_PRIVILEGED: NotPermitted,
    BOOTSTRAP_NAME_IN_USE: ServiceInUse,
    BOOTSTRAP_SERVICE_ACTIVE: ServiceInUse,
    BOOTSTRAP_UNKNOWN_SERVICE: ServiceNotFound,
}


KERN_CODES = _NAME_CODES  # name -> value


def timeout_ms(seconds: float) -> int:
    """Seconds to a mach_msg timeout in ms, rounded up (0 < t < 1 ms still waits), capped
    at 2**32 - 2 (the .pyx's ``_ms`` does the same in C)."""
    if seconds <= 0:
        return 0
    ms = seconds * 1000.0
    if ms >= 4294967294.0:
        return 4294967294
    t = int(ms)
    return t + 1 if t < ms else t


def send_needs_destroy(kr: int) -> bool:
    """After a failed send, does the header hold rights or memory to release?

    MACH_SEND_INVALID_DEST, _TIMED_OUT and _INTERRUPTED come back after copy-in with
    the message pseudo-received (xnu osfmk/ipc/mach_msg.c ``mr |=
    mach_msg_receive_pseudo(...)``), possibly with MACH_MSG_MASK bits or-ed in, so the
    code is masked first. (INVALID_DEST can also come before copy-in with the header
    untouched; destroying that is balanced too: only MOVE_* bits release anything.)
    """
    return (kr & ~MACH_MSG_MASK) in (MACH_SEND_INVALID_DEST, MACH_SEND_TIMED_OUT, MACH_SEND_INTERRUPTED)


def local_right_to_release(header) -> int:
    """The name in ``msgh_local_port`` that ``mach_msg_destroy`` leaves behind, or 0.

    ipc_kmsg_copyout_pseudo (xnu osfmk/ipc/ipc_kmsg.c) puts a failed send's reply right
    back into msgh_local_port *unswapped* (a MAKE_SEND_ONCE reply is now a send-once
    right, bits MOVE_SEND_ONCE), and libsyscall's mach_msg_destroy never touches that
    field ("The msgh_local_port field doesn't hold a port right", mach_msg.c), so the
    sender must release it or leak one name per failed request.
    """
    bits, _size, _remote, local, _voucher, _id = MSG_HEADER.unpack_from(header, 0)
    ltype = (bits & MACH_MSGH_BITS_LOCAL_MASK) >> 8
    return local if local and ltype in (MACH_MSG_TYPE_MOVE_SEND, MACH_MSG_TYPE_MOVE_SEND_ONCE) else 0


#: Receiver-side size of each kernel-written descriptor type (64-bit; <mach/message.h>).
_DESCRIPTOR_SIZES = {
    MACH_MSG_PORT_DESCRIPTOR: PORT_DESCRIPTOR_SIZE,
    MACH_MSG_OOL_DESCRIPTOR: OOL_DESCRIPTOR_SIZE,
    MACH_MSG_OOL_PORTS_DESCRIPTOR: OOL_DESCRIPTOR_SIZE,
    MACH_MSG_OOL_VOLATILE_DESCRIPTOR: OOL_DESCRIPTOR_SIZE,
    MACH_MSG_GUARDED_PORT_DESCRIPTOR: OOL_DESCRIPTOR_SIZE,
}


def take_regions(buf) -> list[tuple[int, int]]:
    """Take every out-of-line region out of a received message about to be destroyed.

    Returns ``[(address, size), ...]`` for each OOL and OOL_VOLATILE descriptor the
    kernel wrote (walked within ``msgh_size``) and zeroes their ``size`` and
    ``deallocate`` in ``buf`` (writable), so the caller ``vm_deallocate``s each region
    once and ``mach_msg_destroy`` skips them. Needed because the kernel sets a received
    descriptor's ``deallocate`` only for MACH_MSG_VIRTUAL_COPY (ipc_kmsg_copyout_ool_descriptor,
    xnu osfmk/ipc/ipc_kmsg.c) and mach_msg_destroy frees only ``if (dsc->deallocate)`` and
    skips volatile descriptors (libsyscall/mach/mach_msg.c): a sender choosing
    MACH_MSG_PHYSICAL_COPY or the volatile type would otherwise leave the region mapped.
    """
    view = memoryview(buf).cast("B")
    if len(view) < OFF_FIRST_DESCRIPTOR:
        return []
    bits, size = MSG_HEADER.unpack_from(view, 0)[:2]
    if not bits & MACH_MSGH_BITS_COMPLEX:
        return []
    size = min(size, len(view))
    count = _U32.unpack_from(view, OFF_DESCRIPTOR_COUNT)[0]
    regions = []
    off = OFF_FIRST_DESCRIPTOR
    for _ in range(count):
        if off + PORT_DESCRIPTOR_SIZE > size:
            break
        dtype = view[off + OFF_OOL_TYPE]
        dsize = _DESCRIPTOR_SIZES.get(dtype)
        if dsize is None or off + dsize > size:
            break
        if dtype in (MACH_MSG_OOL_DESCRIPTOR, MACH_MSG_OOL_VOLATILE_DESCRIPTOR):
            address = _U64.unpack_from(view, off + OFF_OOL_ADDRESS)[0]
            length = _U32.unpack_from(view, off + OFF_OOL_SIZE)[0]
            if address and length:
                regions.append((address, length))
            view[off + OFF_OOL_DEALLOCATE] = 0
            _U32.pack_into(view, off + OFF_OOL_SIZE, 0)
        off += dsize
    return regions


class SendInterrupted(IPCError):
    """MACH_SEND_INTERRUPTED: a signal came while the send waited; handlers have run and
    the message was not sent (machipc.mach retries it for the time left, PEP 475-style)."""


def send_error(kr: int, timeout) -> IPCError:
    """The exception for a failed send's return code (MACH_MSG_MASK bits ignored)."""
    base = kr & ~MACH_MSG_MASK
    if base == MACH_SEND_TIMED_OUT:
        exc: IPCError = IPCTimeoutError(f"send: the receiver's queue stayed full for {timeout} s ({kern_name(kr)})")
    elif base == MACH_SEND_INVALID_DEST:
        exc = PeerGone(f"send: the receiver is gone ({kern_name(kr)})")
    elif base == MACH_SEND_INTERRUPTED:
        exc = SendInterrupted(f"send: interrupted by a signal ({kern_name(kr)})")
    else:
        return kern_error(kr, "mach_msg(send)")
    exc.kern_return = kr  # type: ignore[attr-defined]
    return exc


def kern_name(kr: int) -> str:
    """``"MACH_SEND_INVALID_DEST (0x10000003)"`` for a kern_return_t / bootstrap code."""
    name = KERN_NAMES.get(kr & ~MACH_MSG_MASK if kr & 0x10000000 else kr)
    return f"{name} ({kr:#x})" if name else f"kern_return_t {kr:#x}"


def kern_error(kr: int, what: str) -> IPCError:
    """Turn a ``kern_return_t`` (or bootstrap code) into the matching machipc exception."""
    exc = _KERN_CLASSES.get(kr & ~MACH_MSG_MASK if kr & 0x10000000 else kr, IPCError)(f"{what}: {kern_name(kr)}")
    exc.kern_return = kr  # type: ignore[attr-defined]
    return exc


_BOOTSTRAP_HINTS = {
    BOOTSTRAP_UNKNOWN_SERVICE: (
        "no service is registered under {name!r}: start the server first, or load its launchd plist "
        "(launchctl bootstrap ...); check the name's spelling and that client and server share a bootstrap "
        "namespace (a per-user agent's name is invisible to root daemons and other users)"
    ),
    BOOTSTRAP_NAME_IN_USE: (
        "{name!r} is already checked in by another process: stop the other server, or choose another name"
    ),
    BOOTSTRAP_SERVICE_ACTIVE: (
        "{name!r} is already held by another running process (BOOTSTRAP_SERVICE_ACTIVE): stop it, or use "
        "another name; under launchd only the job that declares it in MachServices may check it in"
    ),
    BOOTSTRAP_NOT_PRIVILEGED: (
        "the bootstrap server refused {name!r}: another process holds it (machipc.mach reports that case as "
        "ServiceInUse after a look-up), or this process is in a dead login session's bootstrap "
        "namespace (started from a closed Terminal/ssh session, or by a detached nohup/screen); run it as a "
        "launchd job (launchctl bootstrap gui/$UID or system ...) or from a live login session"
    ),
}


def bootstrap_error(kr: int, op: str, name: str) -> IPCError:
    """A bootstrap failure with its own message and the likely fix."""
    hint = _BOOTSTRAP_HINTS.get(kr)
    text = f"{op}({name!r}) failed: {kern_name(kr)}"
    if hint:
        text += "; " + hint.format(name=name)
    exc = _KERN_CLASSES.get(kr, IPCError)(text)
    exc.kern_return = kr  # type: ignore[attr-defined]
    return exc


def check_service_name(name: str) -> bytes:
    """The bootstrap name as bytes; refuse what ``name_t`` would silently truncate."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("a service name must be a non-empty str")
    raw = name.encode("utf-8")
    if b"\0" in raw:
        raise InvalidArgument("a service name must not contain NUL")
    if len(raw) > BOOTSTRAP_NAME_MAX:
        raise InvalidArgument(
            f"service name is {len(raw)} bytes; bootstrap names (name_t) hold at most {BOOTSTRAP_NAME_MAX} "
            "and longer ones would be silently truncated"
        )
    return raw
