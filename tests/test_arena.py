"""The arena fast path for large payloads: reuse, copy-out immutability, hostile references."""

from __future__ import annotations

import array
import fcntl
import os
import socket

import pytest

import machipc
from machipc import arena, wire
from machipc.wire import Flag, Kind

from conftest import raw_connect, wait_for

MiB = 1024 * 1024


def test_many_large_messages_reuse_one_arena(impl, sockdir, client):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        cli = client()
        for i in range(30):
            data = bytes([i]) * (MiB + i)
            cli.send(data)
            msg = srv.receive(timeout=10)
            assert msg.data == data and msg.data.readonly
        assert cli._arenas.made == 1  # one arena, reused as a ring
        assert cli._arenas.arena.released() == cli._arenas.arena.head  # everything released


def test_received_copy_cannot_change(impl, sockdir, client):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        cli = client()
        cli.send(b"a" * (2 * MiB))
        msg = srv.receive(timeout=10)
        # The sender scribbles over its arena after the server took its copy.
        sender_arena = cli._arenas.arena
        sender_arena.view[arena.CONTROL : arena.CONTROL + 2 * MiB] = b"b" * (2 * MiB)
        assert msg.data == b"a" * (2 * MiB)
        with pytest.raises(TypeError):
            msg.data[0] = 0


def test_arena_grows_for_a_bigger_payload(serve, client):
    serve(lambda m: b"%d" % len(m.data))
    cli = client()
    assert cli.request(b"x" * MiB, timeout=10) == b"%d" % MiB
    assert cli.request(b"x" * (20 * MiB), timeout=10) == b"%d" % (20 * MiB)
    assert cli.request(b"x" * MiB, timeout=10) == b"%d" % MiB
    assert cli._arenas.made == 2


def test_sender_waits_for_the_receiver_then_times_out(impl, sockdir, client):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        cli = client()
        cli.send(b"x" * (5 * MiB))  # half of the 10 MiB ring; nobody receives it yet
        with pytest.raises(machipc.IPCTimeoutError, match="arena space"):
            cli.send(b"y" * (5 * MiB + 1), timeout=0.3)  # does not fit the other half
        assert srv.receive(timeout=5).data == b"x" * (5 * MiB)
        cli.send(b"z" * (5 * MiB), timeout=5)  # space is back
        assert srv.receive(timeout=5).data == b"z" * (5 * MiB)


def test_arenas_off_uses_sealed_memfds(serve, client):
    serve(lambda m: b"%d" % len(m.data))
    cli = client(arenas=False)
    assert cli.request(b"x" * MiB, timeout=10) == b"%d" % MiB
    assert cli._arenas is None


def _arena_fd(size: int, seals: int = arena.ARENA_SEALS, sparse: bool = False) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if not sparse:
        os.posix_fallocate(fd, 0, size)  # allocated, as a real sender's pre-faulted ring
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd




CASES = {
    "unknown-arena": (lambda: -1, Flag.ARENA, 0, 1000, "BAD_ARENA"),
    "unsealed-arena": (lambda: _arena_fd(arena.CONTROL + MiB, 0), Flag.ARENA | Flag.PAYLOAD_FD, 0, 1000, "BAD_ARENA"),
    "shrinkable-arena": (lambda: _arena_fd(arena.CONTROL + MiB, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL), Flag.ARENA | Flag.PAYLOAD_FD, 0, 1000, "BAD_ARENA"),
    "huge-arena": (lambda: _arena_fd(arena.CONTROL + 1024 * MiB), Flag.ARENA | Flag.PAYLOAD_FD, 0, 1000, "BAD_ARENA"),
    "out-of-bounds": (lambda: _arena_fd(arena.CONTROL + MiB), Flag.ARENA | Flag.PAYLOAD_FD, MiB - 10, 1000, "BAD_ARENA"),
    "not-a-memfd": (lambda: os.open("/dev/null", os.O_RDONLY), Flag.ARENA | Flag.PAYLOAD_FD, 0, 1000, "UNEXPECTED_FDS"),
    "sparse-arena": (lambda: _arena_fd(arena.CONTROL + MiB, sparse=True), Flag.ARENA | Flag.PAYLOAD_FD, 0, 1000, "SPARSE"),
    "fd-without-flag": (lambda: _arena_fd(arena.CONTROL + MiB), Flag.ARENA, 0, 1000, "UNEXPECTED_FDS"),
    "flag-without-fd": (lambda: -1, Flag.ARENA | Flag.PAYLOAD_FD, 0, 1000, "BAD_PAYLOAD_FD"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_arena_references(serve, client, case):
    make, flags, offset, length, reason = CASES[case]
    srv = serve()
    cli = client()
    assert cli.request(b"warm", timeout=5) == b"echo:warm"
    before = len(os.listdir("/proc/self/fd"))
    raw = raw_connect(srv.path)
    fd = make()
    header = wire.pack_header(Kind.REQUEST, 7, length, flags)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd >= 0 else []
    raw.sendmsg([header, arena.REF.pack(1, 0, offset, offset + length)], anc)
    if fd >= 0:
        os.close(fd)
    raw.settimeout(5)
    answer = raw.recv(1000)
    assert wire.HEADER.unpack_from(answer)[2:5:2] == (Kind.ERROR, 7)
    assert wire.unpack_error(answer[wire.HEADER_SIZE :])[0] == wire.ErrorCode.MALFORMED
    assert wait_for(lambda: srv.stats.dropped[reason] == 1)
    assert cli.request(b"still serving", timeout=5) == b"echo:still serving"
    raw.close()
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before)


def test_too_many_arenas_on_one_connection(serve, client):
    srv = serve(lambda m: b"ok")
    raw = raw_connect(srv.path)
    codes = []
    for i in range(arena.MAX_ARENAS + 1):
        fd = _arena_fd(arena.CONTROL + MiB)
        header = wire.pack_header(Kind.REQUEST, i + 1, 100_000, Flag.ARENA | Flag.PAYLOAD_FD)
        raw.sendmsg([header, arena.REF.pack(100 + i, 0, 0, 100_000)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        os.close(fd)
        answer = raw.recv(1000)
        codes.append(wire.HEADER.unpack_from(answer)[2])
    assert codes == [Kind.REPLY] * arena.MAX_ARENAS + [Kind.ERROR]
    assert srv.stats.dropped["BAD_ARENA"] == 1
    raw.close()


def test_a_client_learns_the_server_limit_from_its_hello(serve, client):
    srv = serve(lambda m: b"%d" % len(m.data), max_size=MiB)
    cli = client()
    assert cli.server_limits is None  # nothing read from the server yet
    with pytest.raises(machipc.MessageTooLarge, match="over the server's limit of 1048576"):
        cli.request(b"x" * (2 * MiB), timeout=5)  # sent, refused by the server, region released
    assert srv.stats.too_large == 1
    assert cli.server_limits == (MiB, arena.MAX_CAPACITY, arena.MAX_ARENAS, wire.INLINE_MAX, wire.FEATURES)
    for _ in range(10):  # now refused before anything is sent
        with pytest.raises(machipc.MessageTooLarge, match="server's limit"):
            cli.send(b"x" * (2 * MiB), timeout=5)
    assert cli.request(b"x" * MiB, timeout=5) == b"%d" % MiB  # the ring was not wedged
    assert srv.stats.too_large == 1


def test_a_region_that_needs_the_skipped_tail_fits_once_the_ring_is_empty(impl, sockdir, client):
    # 3 MiB then 6 MiB in the 8 MiB ring: the second skips the 5 MiB tail, and tail +
    # region (11 MiB) exceed the capacity. Once the first is released the ring is
    # empty, so the sender must go on instead of waiting for a release that never comes.
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        cli = client()
        cli.send(b"a" * (3 * MiB))
        assert srv.receive(timeout=10).data == b"a" * (3 * MiB)
        cli.send(b"b" * (6 * MiB), timeout=10)
        assert srv.receive(timeout=10).data == b"b" * (6 * MiB)
        assert cli._arenas.made == 1  # the same ring, reused


@pytest.mark.parametrize("size", [1, 100, 5 * MiB + 7])  # 5 MiB: the streaming copy, with a ragged head and tail
def test_copy_into_writes_exactly_the_bytes_at_the_offset(impl, size):
    from machipc import _backend

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = _backend.transport(impl).Conn(b, False, False)
    try:
        src = array.array("H", os.urandom(size + size % 2))  # any buffer, copied as bytes
        dst = bytearray(b"\xee" * (src.itemsize * len(src) + 40))
        conn.copy_into(dst, 3, src)
        n = src.itemsize * len(src)
        assert dst[:3] == b"\xee" * 3 and dst[3 : 3 + n] == src.tobytes() and dst[3 + n :] == b"\xee" * 37
        for offset in (-1, 41):
            with pytest.raises(ValueError):
                conn.copy_into(dst, offset, src)
    finally:
        conn.close()
        a.close()
