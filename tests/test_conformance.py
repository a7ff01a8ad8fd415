"""docs/protocol.md, checked packet by packet: every MUST of the text is a row here.

Each case sends hand-built packets on a raw SOCK_SEQPACKET socket (no machipc
client code) to a real Server, over both transports, and checks the documented
outcome: the answer (none, REPLY, or ERROR with its code), the counter in
``Server.stats`` and, for arena packets, the release position the receiver
stored in the sender's arena.
"""

from __future__ import annotations

import array
import errno
import fcntl
import mmap
import os
import shutil
import socket
import struct
import subprocess

import pytest

import machipc
from machipc import arena, wire
from machipc.received import Received
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
        os.posix_fallocate(self.fd, 0, 4096 + capacity)  # receivers refuse arenas with holes
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
        kind, rid, payload = self.answer()
        assert (kind, rid) == (Kind.HELLO, 0), "HELLO MUST be the first packet from the server"
        self.limits = wire.unpack_hello(payload)

    def send(self, packet: bytes, fds: tuple = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([packet], anc)

    def answer(self) -> tuple[int, int, bytes]:
        """(kind, request_id, payload) of the next packet from the server."""
        return self.packet()[1:]

    def packet(self) -> tuple[int, int, int, bytes]:
        """(version, kind, request_id, payload) of the next packet; checks magic, flags, length."""
        data = self.sock.recv(wire.PACKET_MAX)
        magic, version, kind, flags, rid, length = HEADER.unpack_from(data)
        assert (magic, flags, length) == (0x696D, 0, len(data) - 24)
        return version, kind, rid, data[24:]

    def close(self) -> None:
        self.sock.close()


def count(m) -> bytes:
    return b"got %d" % len(m.data)


@pytest.fixture
def raw(serve):
    """(server, connect()) answering b"got N" for an N-byte payload; connect() -> Raw."""
    srv = serve(count, max_size=2 * MiB)
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
    assert conn.answer() == (Kind.REPLY, rid, b"got 2")


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


# -- every packet a client can send, and what the server MUST do with it --------


def _memfd(data: bytes, seals: int = fcntl.F_SEAL_WRITE | ARENA_SEALS) -> int:
    fd = os.memfd_create("conformance", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _sparse_memfd(size: int) -> int:
    fd = os.memfd_create("conformance", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)  # never written: all holes
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | ARENA_SEALS)
    return fd


def _pipe_end() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


R = Kind.REQUEST
M = Kind.MESSAGE
BIG = 100_000  # over INLINE_MAX: a memfd payload
# name: (packet, fds to attach (made per run), expected answer, answer header version, stats key)
#   expected answer: None (nothing, ever), b"..." (a REPLY with that payload), or an ErrorCode.
CASES = {
    "inline request": (header(R, 5, 3) + b"abc", lambda: (), b"got 3", wire.VERSION, "received"),
    "inline message": (header(M, 0, 3) + b"abc", lambda: (), None, 0, "received"),
    "0-byte message is a message, not EOF": (header(M, 0, 0), lambda: (), None, 0, "received"),
    "0-byte request": (header(R, 5, 0), lambda: (), b"got 0", wire.VERSION, "received"),
    "largest inline request (65,560-byte packet)": (header(R, 5, wire.INLINE_MAX) + b"x" * wire.INLINE_MAX, lambda: (), b"got 65536", wire.VERSION, "received"),
    "request id 2**64-1": (header(R, 2**64 - 1, 1) + b"x", lambda: (), b"got 1", wire.VERSION, "received"),
    "sealed memfd request": (header(R, 5, BIG, Flag.PAYLOAD_FD), lambda: (_memfd(b"m" * BIG),), b"got 100000", wire.VERSION, "received"),
    "sealed memfd of 1 byte": (header(R, 5, 1, Flag.PAYLOAD_FD), lambda: (_memfd(b"m"),), b"got 1", wire.VERSION, "received"),
    # SHORT, BAD_MAGIC: the header cannot be trusted, nothing is answered.
    "23 bytes": (header(R, 5, 0)[:23], lambda: (), None, 0, "SHORT"),
    "bad magic": (header(R, 5, 0, magic=0x6D69), lambda: (), None, 0, "BAD_MAGIC"),
    # BAD_VERSION: a request is answered MALFORMED in a version-1 header (every peer reads it).
    "version 1 request": (header(R, 5, 1, version=1) + b"x", lambda: (), ErrorCode.MALFORMED, 1, "BAD_VERSION"),
    "version 3 request": (header(R, 5, 1, version=3) + b"x", lambda: (), ErrorCode.MALFORMED, 1, "BAD_VERSION"),
    "version 1 message": (header(M, 0, 1, version=1) + b"x", lambda: (), None, 0, "BAD_VERSION"),
    "kind REPLY": (header(Kind.REPLY, 5, 0), lambda: (), None, 0, "BAD_KIND"),
    "kind ERROR": (header(Kind.ERROR, 5, 2) + b"\x01\x00", lambda: (), None, 0, "BAD_KIND"),
    "kind HELLO": (header(Kind.HELLO, 0, 0), lambda: (), None, 0, "BAD_KIND"),
    "kind 0": (header(0, 5, 0), lambda: (), None, 0, "BAD_KIND"),
    "kind 255": (header(255, 5, 0), lambda: (), None, 0, "BAD_KIND"),
    "flag bit 3": (header(R, 5, 0, 8), lambda: (), ErrorCode.MALFORMED, wire.VERSION, "BAD_FLAGS"),
    # BATCH (§5.4): one-way only, no other flag, a whole sequence of at least one item.
    "BATCH of one item": (header(M, 0, 7, Flag.BATCH) + b"\x03\x00\x00\x00abc", lambda: (), None, 0, "received"),
    "BATCH on a request": (header(R, 5, 7, Flag.BATCH) + b"\x03\x00\x00\x00abc", lambda: (), ErrorCode.MALFORMED, wire.VERSION, "BAD_FLAGS"),
    "BATCH with PAYLOAD_FD": (header(M, 0, 7, Flag.BATCH | Flag.PAYLOAD_FD) + b"\x03\x00\x00\x00abc", lambda: (), None, 0, "BAD_FLAGS"),
    "BATCH without items": (header(M, 0, 0, Flag.BATCH), lambda: (), None, 0, "BAD_BATCH"),
    "BATCH item past the end": (header(M, 0, 7, Flag.BATCH) + b"\x04\x00\x00\x00abc", lambda: (), None, 0, "BAD_BATCH"),
    "BATCH length prefix cut short": (header(M, 0, 9, Flag.BATCH) + b"\x03\x00\x00\x00abc\x00\x00", lambda: (), None, 0, "BAD_BATCH"),
    "BATCH with an fd": (header(M, 0, 7, Flag.BATCH) + b"\x03\x00\x00\x00abc", lambda: (_memfd(b"m"),), None, 0, "UNEXPECTED_FDS"),
    "flag bit 31, one-way": (header(M, 0, 0, 1 << 31), lambda: (), None, 0, "BAD_FLAGS"),
    "length over the body": (header(R, 5, 4) + b"abc", lambda: (), ErrorCode.MALFORMED, wire.VERSION, "BAD_LENGTH"),
    "length under the body": (header(R, 5, 2) + b"abc", lambda: (), ErrorCode.MALFORMED, wire.VERSION, "BAD_LENGTH"),
    "PAYLOAD_FD with a body": (header(R, 5, BIG, Flag.PAYLOAD_FD) + b"x", lambda: (_memfd(b"m" * BIG),), ErrorCode.MALFORMED, wire.VERSION, "BAD_LENGTH"),
    "PAYLOAD_FD of length 0": (header(R, 5, 0, Flag.PAYLOAD_FD), lambda: (_memfd(b"m"),), ErrorCode.MALFORMED, wire.VERSION, "BAD_LENGTH"),
    "request id 0": (header(R, 0, 1) + b"x", lambda: (), None, 0, "BAD_REQUEST_ID"),
    "message with an id": (header(M, 5, 1) + b"x", lambda: (), None, 0, "BAD_REQUEST_ID"),
    "inline packet of 65,561 bytes": (header(R, 5, wire.INLINE_MAX + 1) + b"x" * (wire.INLINE_MAX + 1), lambda: (), ErrorCode.MALFORMED, wire.VERSION, "TRUNCATED"),
    "fd on an inline packet": (header(R, 5, 1) + b"x", lambda: (_memfd(b"m"),), ErrorCode.MALFORMED, wire.VERSION, "UNEXPECTED_FDS"),
    "two fds on PAYLOAD_FD": (header(R, 5, BIG, Flag.PAYLOAD_FD), lambda: (_memfd(b"m" * BIG), _memfd(b"m" * BIG)), ErrorCode.MALFORMED, wire.VERSION, "UNEXPECTED_FDS"),
    "PAYLOAD_FD without an fd": (header(R, 5, BIG, Flag.PAYLOAD_FD), lambda: (), ErrorCode.MALFORMED, wire.VERSION, "BAD_PAYLOAD_FD"),
    "unsealed memfd": (header(R, 5, BIG, Flag.PAYLOAD_FD), lambda: (_memfd(b"m" * BIG, 0),), ErrorCode.MALFORMED, wire.VERSION, "BAD_PAYLOAD_FD"),
    "memfd without F_SEAL_WRITE": (header(R, 5, BIG, Flag.PAYLOAD_FD), lambda: (_memfd(b"m" * BIG, ARENA_SEALS),), ErrorCode.MALFORMED, wire.VERSION, "BAD_PAYLOAD_FD"),
    "memfd larger than length": (header(R, 5, BIG - 1, Flag.PAYLOAD_FD), lambda: (_memfd(b"m" * BIG),), ErrorCode.MALFORMED, wire.VERSION, "BAD_PAYLOAD_FD"),
    "memfd smaller than length": (header(R, 5, BIG + 1, Flag.PAYLOAD_FD), lambda: (_memfd(b"m" * BIG),), ErrorCode.MALFORMED, wire.VERSION, "BAD_PAYLOAD_FD"),
    "a pipe, not a memfd": (header(R, 5, BIG, Flag.PAYLOAD_FD), lambda: (_pipe_end(),), ErrorCode.MALFORMED, wire.VERSION, "UNEXPECTED_FDS"),
    "memfd with holes": (header(R, 5, BIG, Flag.PAYLOAD_FD), lambda: (_sparse_memfd(BIG),), ErrorCode.MALFORMED, wire.VERSION, "SPARSE"),
    "memfd over max_size": (header(R, 5, 2 * MiB + 1, Flag.PAYLOAD_FD), lambda: (_memfd(b"m" * (2 * MiB + 1)),), ErrorCode.TOO_LARGE, wire.VERSION, "too_large"),
}


#: Outcomes after which the server also hangs up on the sender (fds the protocol does not carry).
HANG_UP = {"UNEXPECTED_FDS"}


@pytest.mark.parametrize("case", list(CASES))
def test_each_packet_gets_its_documented_outcome(raw, case):
    packet, make_fds, expected, version, key = CASES[case]
    srv, connect = raw
    conn = connect()
    fds = make_fds()
    before = _stat(srv, key)
    conn.send(packet, fds)
    for fd in fds:
        os.close(fd)
    if expected is not None:
        got_version, kind, rid, payload = conn.packet()
        assert (got_version, rid) == (version, HEADER.unpack_from(packet)[4])
        if isinstance(expected, bytes):
            assert (kind, payload) == (Kind.REPLY, expected)
        else:
            code, text = wire.unpack_error(payload)
            assert (kind, code) == (Kind.ERROR, expected), text
            if key == "BAD_VERSION":
                assert "this server speaks version 2" in text
    if key in HANG_UP:
        assert conn.sock.recv(wire.PACKET_MAX) == b""  # then the server hangs up
        conn = connect()
    ok_request(conn, 1)  # the connection still serves, and nothing else was answered before it
    counted = 2 if key == "received" else 1
    assert wait_for(lambda: _stat(srv, key) == before + counted)


def test_hello_is_the_first_packet_and_announces_the_limits(raw):
    srv, connect = raw
    conn = connect()  # Raw reads the HELLO, and checks it is the first packet
    assert conn.limits == (2 * MiB, arena.MAX_CAPACITY, arena.MAX_ARENAS, wire.INLINE_MAX, wire.FEATURE_BATCH)
    assert (conn.limits.arena_capacity, conn.limits.arenas) == (128 * MiB, 4)


def test_inline_payload_over_a_small_max_size_is_too_large(serve):
    srv = serve(count, max_size=100)
    conn = Raw(srv.path)
    assert conn.limits.max_size == 100
    conn.send(header(R, 5, 101) + b"x" * 101)
    kind, rid, payload = conn.answer()
    assert (kind, rid, wire.unpack_error(payload)[0]) == (Kind.ERROR, 5, ErrorCode.TOO_LARGE)
    conn.send(header(R, 6, 100) + b"x" * 100)
    assert conn.answer() == (Kind.REPLY, 6, b"got 100")
    assert srv.stats.too_large == 1
    conn.close()


def test_duplicate_outstanding_request_ids_are_each_answered(raw):
    _srv, connect = raw
    conn = connect()
    conn.send(header(R, 5, 1) + b"a")
    conn.send(header(R, 5, 2) + b"bb")
    assert sorted([conn.answer(), conn.answer()]) == [(Kind.REPLY, 5, b"got 1"), (Kind.REPLY, 5, b"got 2")]


def test_a_rejected_sender_gets_rejected_and_nothing_else(serve):
    srv = serve(count, policy=lambda peer: machipc.policies.Decision.deny("conformance"))
    conn = Raw(srv.path)
    conn.send(header(M, 0, 1) + b"x")
    conn.send(header(R, 5, 1) + b"x")
    kind, rid, payload = conn.answer()
    assert (kind, rid, wire.unpack_error(payload)[0]) == (Kind.ERROR, 5, ErrorCode.REJECTED)
    assert wait_for(lambda: srv.stats.rejected == 2)
    conn.close()


# -- the sealing recipe's pitfall (spec §5.2 step 3) ------------------------------------


def test_f_seal_write_fails_while_a_shared_mapping_exists_even_a_read_only_one():
    fd = os.memfd_create("recipe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 4096)
        view = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        with pytest.raises(OSError) as info:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        assert info.value.errno == errno.EBUSY
        view.close()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # every shared mapping gone: it works
    finally:
        os.close(fd)


# -- the spec's own client snippet, run as printed ----------------------------------------


def test_the_write_your_own_client_snippet_works_as_printed(serve):
    srv = serve()
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")) as f:
        text = f.read()
    snippet = text.split("## 13 Write your own client", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope = {"PATH": srv.path}
    exec(compile(snippet, "docs/protocol.md §13", "exec"), scope)
    assert scope["REPLY"] == b"echo:ping"


# -- the independent C client (tests/c/client.c, written from the text) --------------------

C_SOURCE = os.path.join(os.path.dirname(__file__), "c", "client.c")
C_BUILT = os.path.join(os.path.dirname(__file__), "c", "bin", "client")


@pytest.fixture(scope="module")
def c_client(tmp_path_factory) -> str:
    """The C client: built by `make test` (tests/c/bin/client), else here with $CC."""
    if os.path.exists(C_BUILT) and os.path.getmtime(C_BUILT) >= os.path.getmtime(C_SOURCE):
        return C_BUILT
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        print("no C compiler: the C client is not run")
        pytest.skip("no C compiler ($CC, cc or gcc) to build tests/c/client.c")
    exe = str(tmp_path_factory.mktemp("c-client") / "client")
    subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", exe, C_SOURCE], check=True)
    return exe


def pattern(seed: int, n: int) -> bytes:
    """The C client's payload bytes (see tests/c/client.c)."""
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


def echo_bytes(m) -> bytes:
    return bytes(m.data)


def run_c(exe: str, srv, *args: str) -> str:
    done = subprocess.run([exe, srv.path, *args], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode()


def test_c_client_reads_the_hello(serve, c_client):
    srv = serve(echo_bytes, max_size=3 * MiB)
    out = run_c(c_client, srv, "hello")
    assert out == f"hello max_size={3 * MiB} arena_capacity={128 * MiB} arenas=4 inline_max=65536\n"


@pytest.mark.parametrize("args", [("inline",), ("many", "300"), ("memfd", "1"), ("memfd", "100001"), ("memfd", str(5 * MiB))])
def test_c_client_round_trips(serve, c_client, args):
    srv = serve(echo_bytes)
    assert run_c(c_client, srv, *args).startswith("ok ")
    assert srv.stats.dropped_total == 0


def test_c_client_arena_reuse_and_the_release_wait(impl, sockdir, c_client):
    count, size = 6, 300_000  # three fit the 1 MiB ring: the fourth waits for a release
    with machipc.Server("org.test.c", directory=sockdir, impl=impl) as srv:
        proc = subprocess.Popen([c_client, srv.path, "arena", str(MiB), str(count), str(size)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # Nothing is received until the client says it waits: the wait is certain.
            assert proc.stdout.readline() == b"waiting\n", proc.stderr.read()
            for k in range(count):
                msg = srv.receive(timeout=60)
                assert msg.request_id == 0 and bytes(msg.data) == pattern(100 + k, size)
            for rid, n in ((1, MiB // 8 * 3), (2, MiB // 8 * 6)):  # then the skipped-tail case
                msg = srv.receive(timeout=60)
                assert msg.request_id == rid and bytes(msg.data) == pattern(rid, n)
                msg.reply(bytes(msg.data))
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err.decode(errors="replace")
        assert out.startswith(b"ok arena 6 messages")
        assert srv.stats.dropped_total == 0 and srv.stats.received == count + 2


# -- arena registration (spec §5.3, receiver rule 1) ---------------------------------------


def _arena_packet(kind: int, rid: int, arena_id: int, length: int, offset: int = 0, release: int = 0, fd: bool = False) -> bytes:
    flags = Flag.ARENA | (Flag.PAYLOAD_FD if fd else 0)
    return header(kind, rid, length, flags) + REF.pack(arena_id, 0, offset, release or offset + length)


def _sized_arena(file_size: int) -> int:
    fd = os.memfd_create("conformance-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, file_size)
    os.posix_fallocate(fd, 0, file_size)  # receivers refuse arenas with holes
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ARENA_SEALS)
    return fd


@pytest.mark.parametrize("file_size, accepted", [(4096, False), (4097, True), (4096 + 128 * MiB, True), (4096 + 128 * MiB + 1, False)])
def test_arena_file_size_bounds(raw, file_size, accepted):
    _srv, connect = raw
    conn = connect()
    fd = _sized_arena(file_size)
    conn.send(_arena_packet(R, 5, 1, 1, fd=True), (fd,))
    os.close(fd)
    kind, rid, payload = conn.answer()
    if accepted:
        assert (kind, rid, payload) == (Kind.REPLY, 5, b"got 1")
    else:
        assert (kind, rid, wire.unpack_error(payload)[0]) == (Kind.ERROR, 5, ErrorCode.MALFORMED)


def test_arena_announcements(serve):
    srv = serve(echo_bytes)
    conn = Raw(srv.path)
    first, second = RawArena(), RawArena()
    first.map[4096:4100] = b"ONE!"
    second.map[4096:4100] = b"TWO!"
    try:
        # Registered even though this first packet is refused (region past the ring) ...
        conn.send(_arena_packet(R, 1, 7, 10, offset=MiB - 5, release=11, fd=True), (first.fd,))
        assert conn.answer()[0] == Kind.ERROR and first.release == 11
        conn.send(_arena_packet(R, 2, 7, 4, release=22))  # ... so a packet without the fd finds it
        assert conn.answer() == (Kind.REPLY, 2, b"ONE!") and first.release == 22
        # A repeated announcement of a held id: the fd is ignored, the held arena is used.
        conn.send(_arena_packet(R, 3, 7, 4, release=33, fd=True), (second.fd,))
        assert conn.answer() == (Kind.REPLY, 3, b"ONE!") and first.release == 33 and second.release == 0
        # A refused announcement registers nothing: the id stays unknown.
        unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
        os.ftruncate(unsealed, 4096 + MiB)
        conn.send(_arena_packet(R, 4, 8, 4, fd=True), (unsealed,))
        os.close(unsealed)
        assert conn.answer()[0] == Kind.ERROR
        conn.send(_arena_packet(R, 5, 8, 4))
        kind, rid, payload = conn.answer()
        assert (kind, rid, wire.unpack_error(payload)[0]) == (Kind.ERROR, 5, ErrorCode.MALFORMED)
        assert srv.stats.dropped["BAD_ARENA"] == 3
    finally:
        conn.close()
        first.close()
        second.close()


# -- what a client checks (spec §9), in both transports' client side ------------------------

from machipc import _backend, naming  # noqa: E402
from machipc.client import decode_reply  # noqa: E402
from machipc.wire import Drop  # noqa: E402

TRANSPORTS = ["py"] + (["c"] if _backend._compiled is not None else [])
REPLY_HEADER = header(Kind.REPLY, 9, BIG, Flag.PAYLOAD_FD)
CLIENT_CASES = {
    # name: (packet, fds, (status, error class or None))
    "inline reply": (header(Kind.REPLY, 9, 2) + b"ok", lambda: (), Drop.OK),
    "sealed memfd reply": (REPLY_HEADER, lambda: (_memfd(b"r" * BIG),), Drop.OK),
    "error of version 1": (header(Kind.ERROR, 9, 3, version=1) + b"\x03\x00x", lambda: (), Drop.OK),
    "error of version 9": (header(Kind.ERROR, 9, 3, version=9) + b"\x03\x00x", lambda: (), Drop.OK),
    "reply of version 1": (header(Kind.REPLY, 9, 2, version=1) + b"ok", lambda: (), Drop.BAD_VERSION),
    "request sent to a client": (header(Kind.REQUEST, 9, 2) + b"ok", lambda: (), Drop.BAD_KIND),
    "HELLO with an id": (header(Kind.HELLO, 9, 28) + wire.pack_hello(1, 2, 3), lambda: (), Drop.BAD_REQUEST_ID),
    "reply with flag bit 2": (header(Kind.REPLY, 9, 0, 4), lambda: (), Drop.BAD_FLAGS),
    "memfd reply without F_SEAL_WRITE": (REPLY_HEADER, lambda: (_memfd(b"r" * BIG, ARENA_SEALS),), Drop.BAD_PAYLOAD_FD),
    "memfd reply of the wrong size": (REPLY_HEADER, lambda: (_memfd(b"r" * (BIG + 1)),), Drop.BAD_PAYLOAD_FD),
    "memfd reply over the client's limit": (header(Kind.REPLY, 9, 3 * MiB, Flag.PAYLOAD_FD), lambda: (_memfd(b"r" * 3 * MiB),), Drop.OVERSIZE),
    "reply with two fds": (REPLY_HEADER, lambda: (_memfd(b"r" * BIG), _memfd(b"r" * BIG)), Drop.UNEXPECTED_FDS),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(CLIENT_CASES))
def test_client_side_checks(transport, case):
    packet, make_fds, expected = CLIENT_CASES[case]
    server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = _backend.transport(transport).Conn(client_end, False, False)
    conn.max_payload = 2 * MiB
    fds = make_fds()
    server_end.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
    for fd in fds:
        os.close(fd)
    got = conn.recv(10)
    assert got.status == expected
    rid, data, error = decode_reply("conformance", got)
    assert rid == 9  # a malformed answer still fails the request it names
    assert (error is None) == (expected == Drop.OK and HEADER.unpack_from(packet)[2] == Kind.REPLY)
    server_end.close()
    conn.close()


def test_client_treats_an_unknown_error_code_as_a_failure():
    _rid, data, error = decode_reply("conformance", Received(Drop.OK, None, Kind.ERROR, 0, 9, wire.pack_error(999, "new")))
    assert data is None and isinstance(error, machipc.RemoteError) and "new" in str(error)


# -- addresses (spec §11) ---------------------------------------------------------------------


def test_empty_runtime_variables_count_as_unset(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(os, "getuid", lambda: 1000)  # the effective uid names the directory
    monkeypatch.setenv("MACHIPC_RUNTIME_DIR", "")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "")
    monkeypatch.delenv("MACHIPC_SYSTEM_DIR", raising=False)
    assert naming.lookup_dirs() == ["/tmp/machipc-4242", "/run/machipc"]


def test_socket_paths_up_to_107_bytes(tmp_path):
    directory = str(tmp_path / "d")
    room = 107 - len(directory) - 1
    assert len(naming.service_path("n" * room, directory=directory)) == 107
    with pytest.raises(machipc.InvalidArgument, match="longer than 107"):
        naming.service_path("n" * (room + 1), directory=directory)


def test_a_rejected_senders_arena_is_never_mapped(serve):
    srv = serve(count, policy=lambda peer: machipc.policies.Decision.deny("conformance"))
    conn = Raw(srv.path)
    ring = RawArena()
    try:
        conn.send(_arena_packet(R, 5, 1, 1000, release=1000, fd=True), (ring.fd,))
        kind, rid, payload = conn.answer()
        assert (kind, rid, wire.unpack_error(payload)[0]) == (Kind.ERROR, 5, ErrorCode.REJECTED)
        assert ring.release == 0  # nothing mapped it, so nothing released it
        assert srv.stats.dropped_total == 0 and srv.stats.rejected == 1
    finally:
        conn.close()
        ring.close()


# -- the text and the code name the same things ---------------------------------------------

import re  # noqa: E402


def _spec() -> str:
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")) as f:
        return f.read()


def _section(text: str, number: int) -> str:
    return text.split(f"\n## {number} ", 1)[1].split("\n## ", 1)[0]


def test_the_spec_has_its_sections_in_order():
    """The contents line's sections 1-14 are all there, once each, in order (§5's subsections too)."""
    text = _spec()
    assert re.findall(r"^## (\d+) ", text, re.M) == [str(n) for n in range(1, 15)]
    assert re.findall(r"^### (5\.\d) ", text, re.M) == ["5.1", "5.2", "5.3", "5.4"]


def test_the_spec_names_every_drop_reason_error_code_kind_and_counter():
    text = _spec()
    outcomes = _section(text, 7)
    for reason in wire.Drop:
        if reason not in (wire.Drop.OK, wire.Drop.CLOSED):
            assert f"`{reason.name}`" in outcomes or f'["{reason.name}"]' in outcomes, f"§7 does not name {reason.name}"
    codes = dict(re.findall(r"^\| (\d+) +\| `([A-Z_]+)`", _section(text, 8), re.M))
    assert codes == {str(int(c)): c.name for c in ErrorCode}, "§8 and wire.ErrorCode differ"
    kinds = dict(re.findall(r"^\| (\d+) +\| `([A-Z]+)`", _section(text, 4), re.M))
    assert kinds == {str(int(k)): k.name for k in Kind}, "§4 and wire.Kind differ"
    counters = set(re.findall(r"`(\w+)`", re.sub(r"`dropped\[[^]]*\]`", "", outcomes)))
    stats = set(machipc.ServerStats.__dataclass_fields__)
    for name in ("received", "rejected", "would_reject", "too_large", "cooled_down", "handler_errors", "reply_errors"):
        assert name in stats and name in counters, name
    assert "version 2" in text.splitlines()[0] and wire.VERSION == 2
