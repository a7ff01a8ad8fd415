"""docs/protocol.md, checked packet by packet: every MUST of the text is a row here.

Each case sends hand-built packets on a raw SOCK_SEQPACKET socket (no machipc
client code) to a real Server, over both transports, and checks the documented
outcome: the answer (none, REPLY, or ERROR with its code), the counter in
``Server.stats`` and, for arena packets, the release position the receiver
stored in the sender's arena.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import struct

import pytest

from machipc import arena, wire
from machipc.wire import ErrorCode, Flag, Kind

from conftest import wait_for

MiB = 1024 * 1024
HEADER = struct.Struct("<HBBIQQ")
REF = struct.Struct("<IIQQ")
ARENA_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def header(kind: int, request_id: int, length: int, flags: int = 0, version: int = wire.VERSION, magic: int = 0x696D) -> bytes:
    return HEADER.pack(magic, version, kind, flags, request_id, length)


class RawArena:
    """The sender's side of an arena, built from the text: a sealed memfd, control page, ring."""

    def __init__(self, capacity: int = MiB) -> None:
        self.fd = os.memfd_create("conformance-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, 4096 + capacity)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, ARENA_SEALS)
        self.map = mmap.mmap(self.fd, 4096 + capacity, flags=mmap.MAP_SHARED)

    @property
    def release(self) -> int:
        return struct.unpack_from("<Q", self.map, 0)[0]

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class Raw:
    """A hand-driven connection to the server under test."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.sock.settimeout(10)

    def send(self, packet: bytes, fds: tuple = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([packet], anc)

    def answer(self) -> tuple[int, int, bytes]:
        """(kind, request_id, payload) of the next packet from the server."""
        data = self.sock.recv(wire.PACKET_MAX)
        _magic, _version, kind, _flags, rid, _length = HEADER.unpack_from(data)
        return kind, rid, data[24:]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(serve):
    """(server, connect()) with the echo handler; connect() -> Raw."""
    srv = serve(max_size=2 * MiB)
    made = []

    def connect() -> Raw:
        conn = Raw(srv.path)
        made.append(conn)
        return conn

    yield srv, connect
    for conn in made:
        conn.close()


def ok_request(conn: Raw, rid: int) -> None:
    """A well-formed inline request: proves the connection still serves, in order."""
    conn.send(header(Kind.REQUEST, rid, 2) + b"hi")
    assert conn.answer() == (Kind.REPLY, rid, b"echo:hi")


# -- arena packets: the receiver stores `release` whatever the outcome ---------

ARENA_CASES = {
    # name: (kind, request_id, length, flags, reserved, offset, body size, expected answer, stats key)
    "delivered": (Kind.REQUEST, 5, 1000, Flag.ARENA, 0, 0, 24, "REPLY", "received"),
    "one-way delivered": (Kind.MESSAGE, 0, 1000, Flag.ARENA, 0, 0, 24, None, "received"),
    "over max_size": (Kind.REQUEST, 5, 3 * MiB, Flag.ARENA, 0, 0, 24, ErrorCode.TOO_LARGE, "too_large"),
    "region past the ring": (Kind.REQUEST, 5, 1000, Flag.ARENA, 0, MiB - 10, 24, ErrorCode.MALFORMED, "BAD_ARENA"),
    "one-way region past the ring": (Kind.MESSAGE, 0, 1000, Flag.ARENA, 0, MiB - 10, 24, None, "BAD_ARENA"),
    "reserved not zero": (Kind.REQUEST, 5, 1000, Flag.ARENA, 7, 0, 24, ErrorCode.MALFORMED, "BAD_ARENA"),
    "length 0": (Kind.REQUEST, 5, 0, Flag.ARENA, 0, 0, 24, ErrorCode.MALFORMED, "BAD_LENGTH"),
    "one-way length 0": (Kind.MESSAGE, 0, 0, Flag.ARENA, 0, 0, 24, None, "BAD_LENGTH"),
    "one-way with an id": (Kind.MESSAGE, 9, 1000, Flag.ARENA, 0, 0, 24, None, "BAD_REQUEST_ID"),
    "unknown flag bits": (Kind.REQUEST, 5, 1000, Flag.ARENA | 0x80, 0, 0, 24, ErrorCode.MALFORMED, "BAD_FLAGS"),
    "server-bound REPLY": (Kind.REPLY, 5, 1000, Flag.ARENA, 0, 0, 24, None, "BAD_KIND"),
    "PAYLOAD_FD without the fd": (Kind.REQUEST, 5, 1000, Flag.ARENA | Flag.PAYLOAD_FD, 0, 0, 24, ErrorCode.MALFORMED, "BAD_PAYLOAD_FD"),
}


def _stat(srv, key: str) -> int:
    if key in ("received", "too_large", "rejected"):
        return getattr(srv.stats, key)
    return srv.stats.dropped[key]


@pytest.mark.parametrize("case", list(ARENA_CASES))
def test_every_arena_outcome_releases_the_region(raw, case):
    kind, rid, length, flags, reserved, offset, _size, expected, key = ARENA_CASES[case]
    srv, connect = raw
    conn = connect()
    ring = RawArena()
    try:
        # Announce the arena with a delivered one-way message (release 1000 once copied).
        conn.send(header(Kind.MESSAGE, 0, 1000, Flag.ARENA | Flag.PAYLOAD_FD) + REF.pack(1, 0, 0, 1000), (ring.fd,))
        ok_request(conn, 1)  # the server has read the announcement
        assert ring.release == 1000
        before = _stat(srv, key)
        conn.send(header(kind, rid, length, flags) + REF.pack(1, reserved, offset, 77_777))
        if expected is not None:
            answer_kind, answer_rid, payload = conn.answer()
            assert answer_rid == rid
            if expected == "REPLY":
                assert answer_kind == Kind.REPLY
            else:
                assert answer_kind == Kind.ERROR and wire.unpack_error(payload)[0] == expected
        ok_request(conn, 2)
        assert ring.release == 77_777, "the receiver must store `release` for every outcome"
        counted = 2 if key == "received" else 1  # ok_request above was received too
        assert wait_for(lambda: _stat(srv, key) == before + counted)
    finally:
        ring.close()
