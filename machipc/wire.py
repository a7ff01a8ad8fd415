"""The machipc wire format: one fixed header in front of every packet.

The layout is documented for implementers in ``docs/protocol.md``. This module
is the pure-Python definition; ``_wire.pxd`` mirrors the constants for the
Cython transport and ``tests/test_wire.py`` checks that both agree.

All integers are little-endian::

    offset size field
    0      2    magic        0x696d (the bytes b"mi")
    2      1    version      2 (VERSION; ERROR packets of any version are read alike)
    3      1    kind         Kind
    4      4    flags        Flag bits; unknown bits are an error
    8      8    request_id   0 for one-way messages, otherwise chosen by the client
    16     8    length       payload length in bytes
    24     ...  payload
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple, Optional

MAGIC = 0x696D
#: Version 2 added HELLO (the server's limits, first packet on a connection).
VERSION = 2
#: The version of the ERROR answering a packet of a version this side does not speak:
#: the ERROR layout is the same in every version, and every peer ever written reads version 1.
VERSION_ERROR_VERSION = 1
HEADER = struct.Struct("<HBBIQQ")
HEADER_SIZE = HEADER.size  # 24

#: Largest payload carried inside one packet. SOCK_SEQPACKET packets are capped
#: near SO_SNDBUF (about 208 KiB by default), so inline payloads stay well below.
INLINE_MAX = 64 * 1024
#: Receive buffer size: one header plus the largest inline payload.
PACKET_MAX = HEADER_SIZE + INLINE_MAX


class Kind(enum.IntEnum):
    """What a packet is. Servers accept MESSAGE and REQUEST; clients REPLY, ERROR and HELLO."""

    MESSAGE = 1  # one-way, no answer
    REQUEST = 2  # expects exactly one REPLY or ERROR with the same request_id
    REPLY = 3
    ERROR = 4  # payload: u16 ErrorCode + UTF-8 text
    HELLO = 5  # server -> client, first packet on a connection: the server's limits (HELLO struct)


class Flag(enum.IntFlag):
    """Header flag bits."""

    NONE = 0
    #: The payload is in a sealed memfd attached with SCM_RIGHTS; the packet is
    #: the header alone and ``length`` is the memfd's size.
    PAYLOAD_FD = 1
    #: The payload is in the sender's arena (see machipc/arena.py); the packet
    #: body is an arena reference (24 bytes). With PAYLOAD_FD too, the attached
    #: fd is a new arena.
    ARENA = 2
    #: A MESSAGE whose body is several one-way messages (see :func:`split_batch`); sent
    #: only to a server whose HELLO announces FEATURE_BATCH. No other flag goes with it.
    BATCH = 4


KNOWN_FLAGS = int(Flag.PAYLOAD_FD | Flag.ARENA | Flag.BATCH)
#: Size of the body of an ARENA packet (arena.REF).
ARENA_REF_SIZE = 24


class ErrorCode(enum.IntEnum):
    """Codes carried by an ERROR packet."""

    REJECTED = 1  # the server's policy refused the sender
    HANDLER_FAILED = 2  # the handler raised
    MALFORMED = 3  # the request broke the protocol
    TOO_LARGE = 4  # the request was over the server's size limit
    SHUTTING_DOWN = 5  # the server closed before answering
    NO_MEMORY = 6  # the server could not map or copy the payload now (ENOMEM); try again later
    OVER_BUDGET = 7  # the server's budget of mapped payload memory is used up; try again later


class Drop(enum.IntEnum):
    """Why a received packet was not handed on (0 means it was)."""

    OK = 0
    CLOSED = 1  # not a drop: the connection ended (event)
    SHORT = 2  # shorter than the header
    BAD_MAGIC = 3
    BAD_VERSION = 4
    BAD_KIND = 5
    BAD_FLAGS = 6
    BAD_LENGTH = 7  # header length differs from the payload received
    TRUNCATED = 8  # packet larger than the receive buffer
    NO_CREDENTIALS = 9  # no SCM_CREDENTIALS (pid 0 with the overflow uid/gid: sent before SO_PASSCRED)
    UNEXPECTED_FDS = 10  # file descriptors attached (all closed)
    CTRUNC = 11  # control data truncated (fds dropped by the kernel)
    BAD_REQUEST_ID = 12  # one-way with an id, or request without one
    BAD_PAYLOAD_FD = 13  # PAYLOAD_FD without exactly one sealed memfd of the right size
    OVERSIZE = 14  # payload over the receiver's limit
    BAD_ARENA = 15  # unknown arena, region outside it, or an arena fd that fails the checks
    UNMAPPABLE = 16  # the payload could not be mapped or copied (no memory now)
    OVER_BUDGET = 17  # mapping it would exceed the connection's or the server's mapped-bytes budget
    NOT_SHMEM = 18  # a payload or arena memfd not on shmem (e.g. hugetlbfs)
    SPARSE = 19  # a payload or arena memfd with holes (fewer blocks than bytes)
    CONN_LIMIT = 20  # connection refused: that uid has max_connections_per_uid already
    CLOSE_BUDGET = 21  # connection refused: that uid has max_deferred_closes fds still closing
    BAD_BATCH = 22  # a BATCH body that is not a whole sequence of at least one item


DROP_TEXT = {
    Drop.SHORT: "packet shorter than the 24-byte header",
    Drop.BAD_MAGIC: "bad magic",
    Drop.BAD_VERSION: "unsupported protocol version",
    Drop.BAD_KIND: "packet kind not accepted here",
    Drop.BAD_FLAGS: "unknown flag bits",
    Drop.BAD_LENGTH: "header length does not match the payload",
    Drop.TRUNCATED: "packet larger than the receive limit",
    Drop.NO_CREDENTIALS: "no kernel credentials on the packet",
    Drop.UNEXPECTED_FDS: "unexpected file descriptors (closed)",
    Drop.CTRUNC: "control data truncated by the kernel",
    Drop.BAD_REQUEST_ID: "request id does not fit the packet kind",
    Drop.BAD_PAYLOAD_FD: "payload fd missing, not a memfd, not fully sealed, or of the wrong size",
    Drop.OVERSIZE: "payload over the size limit",
    Drop.BAD_ARENA: "arena reference or arena fd failed the checks",
    Drop.UNMAPPABLE: "payload could not be mapped (no memory)",
    Drop.OVER_BUDGET: "payload over the server's mapped-memory budget",
    Drop.NOT_SHMEM: "payload or arena memfd not on shmem (hugetlbfs?)",
    Drop.SPARSE: "payload or arena memfd has holes",
    Drop.CONN_LIMIT: "connection refused: too many connections from this uid",
    Drop.CLOSE_BUDGET: "connection refused: too many of this uid's fds still closing",
    Drop.BAD_BATCH: "batch body is not a whole sequence of one or more length-prefixed items",
}

#: The error reply for a dropped request, by reason (MALFORMED for the rest).
DROP_ERROR = {
    Drop.OVERSIZE: ErrorCode.TOO_LARGE,
    Drop.UNMAPPABLE: ErrorCode.NO_MEMORY,
    Drop.OVER_BUDGET: ErrorCode.OVER_BUDGET,
}


class Header(NamedTuple):
    kind: int
    flags: int
    request_id: int
    length: int


def pack_header(kind: int, request_id: int, length: int, flags: int = 0, version: int = VERSION) -> bytes:
    """Return the 24-byte header for a packet."""
    return HEADER.pack(MAGIC, version, kind, flags, request_id, length)


def check_header(packet: bytes | memoryview, accepted: frozenset[int]) -> tuple[int, Header | None]:
    """Validate a received packet's header.

    Returns ``(Drop.OK, header)`` or ``(reason, header_or_None)``; the header is
    returned whenever it could be decoded, so a malformed request can still be
    answered with an error naming its request id.
    """
    if len(packet) < HEADER_SIZE:
        return Drop.SHORT, None
    magic, version, kind, flags, request_id, length = HEADER.unpack_from(packet)
    header = Header(kind, flags, request_id, length)
    if magic != MAGIC:
        return Drop.BAD_MAGIC, None
    if version != VERSION and not (kind == Kind.ERROR and kind in accepted):
        return Drop.BAD_VERSION, header
    if kind not in accepted:
        return Drop.BAD_KIND, header
    if flags & ~KNOWN_FLAGS or (flags & Flag.BATCH and (flags != Flag.BATCH or kind != Kind.MESSAGE)):
        return Drop.BAD_FLAGS, header
    if flags & Flag.ARENA:
        if len(packet) != HEADER_SIZE + ARENA_REF_SIZE or length == 0:
            return Drop.BAD_LENGTH, header
    elif flags & Flag.PAYLOAD_FD:
        if len(packet) != HEADER_SIZE or length == 0:
            return Drop.BAD_LENGTH, header
    elif length != len(packet) - HEADER_SIZE:
        return Drop.BAD_LENGTH, header
    if (request_id == 0) != (kind == Kind.MESSAGE or kind == Kind.HELLO):
        return Drop.BAD_REQUEST_ID, header
    return Drop.OK, header


SERVER_ACCEPTS = frozenset({Kind.MESSAGE, Kind.REQUEST})
CLIENT_ACCEPTS = frozenset({Kind.REPLY, Kind.ERROR, Kind.HELLO})

#: HELLO payload: largest payload the server accepts (bytes, any transfer), largest arena
#: ring it maps (bytes, without the control page), arenas it keeps per connection, largest
#: inline payload, then (since machipc 0.2, still version 2) the FEATURE_* bits it
#: understands. A reader ignores bytes after the fields it knows (later fields extend it).
HELLO = struct.Struct("<QQII")
HELLO_FEATURES = struct.Struct("<I")
#: Feature bit: the server accepts BATCH packets.
FEATURE_BATCH = 1
#: The features this side's servers announce.
FEATURES = FEATURE_BATCH


class Limits(NamedTuple):
    """What a server's HELLO announces (bytes, counts; ``features``: FEATURE_* bits, 0 from
    a server whose HELLO has no features field)."""

    max_size: int
    arena_capacity: int
    arenas: int
    inline_max: int
    features: int = 0


def pack_hello(max_size: int, arena_capacity: int, arenas: int, features: int = FEATURES) -> bytes:
    """Payload of the HELLO a server sends first on every connection (28 bytes)."""
    return HELLO.pack(max_size, arena_capacity, arenas, INLINE_MAX) + HELLO_FEATURES.pack(features)


def unpack_hello(payload) -> Optional[Limits]:
    """The limits a HELLO announces; None when it is shorter than the 24 bytes every HELLO has.

    A 24-byte HELLO (a server from before the features field) announces no features.
    """
    if len(payload) < HELLO.size:
        return None
    features = HELLO_FEATURES.unpack_from(payload, HELLO.size)[0] if len(payload) >= HELLO.size + HELLO_FEATURES.size else 0
    return Limits(*HELLO.unpack_from(payload), features)


def batch_room(limits: Optional[Limits]) -> int:
    """Largest BATCH body (bytes) to send a server with these ``limits``: its
    ``inline_max`` (at most INLINE_MAX) when it announced FEATURE_BATCH, else 0:
    send it no batches (an older server would drop them as BAD_FLAGS)."""
    if limits is None or not limits.features & FEATURE_BATCH:
        return 0
    return min(limits.inline_max, INLINE_MAX)


#: A BATCH item's length prefix (u32 little-endian); items follow each other unpadded.
BATCH_ITEM = struct.Struct("<I")
BATCH_ITEM_SIZE = BATCH_ITEM.size  # 4


def batch_count(body) -> int:
    """How many items a BATCH packet's body holds; 0 when it is malformed.

    ``body`` (bytes-like, at most INLINE_MAX bytes) must be one or more items
    ``u32 length | length bytes``, back to back with nothing after the last:
    an empty body, a length prefix cut short, or an item running past the end
    is malformed (the receiver drops the whole packet as Drop.BAD_BATCH).
    Items may be empty. Walks the prefixes only, copying nothing. The Cython
    transport has the same rules in C (``_batch_count``); tests/test_batch_wire.py
    checks that both agree.
    """
    view = memoryview(body).cast("B")
    end = len(view)
    at = count = 0
    while at < end:
        if end - at < BATCH_ITEM_SIZE:
            return 0
        at += BATCH_ITEM_SIZE + BATCH_ITEM.unpack_from(view, at)[0]
        if at > end:
            return 0
        count += 1
    return count


def split_batch(body) -> Optional[list[bytes]]:
    """The items of a BATCH packet's body (bytes each, in order); None when it is
    malformed (see :func:`batch_count`). ``_unix.split_batch`` is its C twin."""
    count = batch_count(body)
    if not count:
        return None
    view = memoryview(body).cast("B")
    items: list[bytes] = []
    at = 0
    for _ in range(count):
        (size,) = BATCH_ITEM.unpack_from(view, at)
        at += BATCH_ITEM_SIZE
        items.append(bytes(view[at : at + size]))
        at += size
    return items


def pack_batch(items) -> bytes:
    """The body of a BATCH packet carrying ``items`` (bytes-like, in order); the caller
    keeps it within the receiver's inline limit (``len(item) + 4`` bytes each)."""
    return b"".join(BATCH_ITEM.pack(len(item)) + bytes(item) for item in items)


ERROR_CODE = struct.Struct("<H")


def pack_error(code: int, text: str) -> bytes:
    """Payload of an ERROR packet."""
    return ERROR_CODE.pack(code) + text.encode("utf-8", "replace")[: INLINE_MAX - ERROR_CODE.size]


def unpack_error(payload: bytes) -> tuple[int, str]:
    """Decode an ERROR payload; a short one becomes MALFORMED."""
    if len(payload) < ERROR_CODE.size:
        return ErrorCode.MALFORMED, "error reply without a code"
    (code,) = ERROR_CODE.unpack_from(payload)
    return code, bytes(payload[ERROR_CODE.size :]).decode("utf-8", "replace")
