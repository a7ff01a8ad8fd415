"""Large payloads: sealed memfds, the loan API, and every hostile memfd case."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import subprocess
import threading

import pytest

import machipc
from machipc import payload, wire
from machipc.wire import Flag, Kind

from conftest import python_client, raw_connect, wait_for

MiB = 1024 * 1024


def pattern(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


@pytest.mark.parametrize("size", [wire.INLINE_MAX + 1, 1 * MiB, 16 * MiB])
def test_large_request_and_reply(serve, client, size):
    seen = []

    def handler(msg):
        seen.append((type(msg.data), msg.data.readonly if isinstance(msg.data, memoryview) else True))
        return bytes(msg.data[::-1])

    serve(handler)
    data = pattern(size)
    assert client().request(data, timeout=30) == data[::-1]
    assert seen == [(memoryview, True)]  # a read-only view (of the memfd, or of our arena copy)


def test_large_one_way_from_another_process(impl, sockdir):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        proc = subprocess.Popen(python_client(sockdir, impl, "c.send(bytes(range(256)) * 8192)"))
        msg = srv.receive(timeout=20)
        assert proc.wait(20) == 0
        assert msg.sender.pid == proc.pid and msg.data == bytes(range(256)) * 8192
        with pytest.raises(TypeError):
            msg.data[0] = 1  # the receiver's view cannot be written...


def test_sealed_memfd_cannot_change():
    fd = payload.sealed_memfd(b"abc" * 100_000)
    try:
        with pytest.raises(PermissionError):
            os.write(fd, b"x")  # ...and nobody can write the file behind it
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 10)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & payload.REQUIRED_SEALS == payload.REQUIRED_SEALS
    finally:
        os.close(fd)


def test_loan_api_sends_without_copy(serve, client):
    serve(lambda m: b"%d:%d" % (len(m.data), m.data[-1]))
    cli = client()
    with cli.buffer(2 * MiB) as buf:
        buf[:] = pattern(2 * MiB)
        cli.send(buf)
        with pytest.raises(machipc.InvalidArgument, match="already sent"):
            cli.send(buf)
    with cli.buffer(1000) as buf:  # small loans work too
        buf[:] = b"z" * 1000
        assert cli.request(buf, timeout=10) == b"1000:122"
    with cli.buffer(MiB) as buf:
        view = memoryview(buf)
        with pytest.raises(machipc.InvalidArgument, match="release every memoryview"):
            cli.send(buf)
        view.release()
        assert cli.request(buf, timeout=10) == b"%d:%d" % (MiB, 0)


def test_loaned_reply(serve, client):
    def handler(msg):
        buf = msg.buffer(3 * MiB)
        buf[:] = b"r" * (3 * MiB)
        msg.reply(buf)

    serve(handler)
    assert client().request(b"give", timeout=10) == b"r" * (3 * MiB)


def _raw_send(path: str, header: bytes, fds: list[int]) -> socket.socket:
    raw = raw_connect(path)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    raw.sendmsg([header], anc)
    return raw


def _memfd(data: bytes, seals: int) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


ALL = payload.REQUIRED_SEALS
F_SEAL_FUTURE_WRITE = 0x10  # Linux 5.1; not exported by Python 3.11's fcntl


def _sparse_memfd(size: int) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ALL)
    return fd


def _pipe_read_end() -> list[int]:
    r, w = os.pipe()
    os.close(w)
    return [r]


@pytest.mark.parametrize(
    "make, length, reason",
    [
        (lambda: [_memfd(b"x" * 100_000, 0)], 100_000, "BAD_PAYLOAD_FD"),  # unsealed
        (lambda: [_memfd(b"x" * 100_000, ALL & ~fcntl.F_SEAL_WRITE)], 100_000, "BAD_PAYLOAD_FD"),
        (lambda: [_memfd(b"x" * 100_000, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE)], 100_000, "BAD_PAYLOAD_FD"),
        (lambda: [_memfd(b"x" * 100_000, ALL)], 200_000, "BAD_PAYLOAD_FD"),  # header lies about the size
        (lambda: [_memfd(b"x" * 100_000, ALL)], 50_000, "BAD_PAYLOAD_FD"),  # too small a file
        (_pipe_read_end, 100_000, "UNEXPECTED_FDS"),  # not a memfd: a foreign fd
        (lambda: [_sparse_memfd(100_000)], 100_000, "SPARSE"),  # holes the server would have to fault in
        (lambda: [_memfd(b"x" * 100_000, ALL), _memfd(b"y", ALL)], 100_000, "UNEXPECTED_FDS"),  # two fds
        (lambda: [], 100_000, "BAD_PAYLOAD_FD"),  # flag without an fd
        (lambda: [_memfd(b"x" * 100_000, ALL)], 1 << 40, "OVERSIZE"),
    ],
    ids=["unsealed", "no-write-seal", "future-write-only", "size-lies-big", "size-lies-small", "pipe", "sparse", "two-fds", "no-fd", "oversize"],
)
def test_hostile_payload_fds(serve, client, make, length, reason):
    srv = serve()
    cli = client()
    assert cli.request(b"warm", timeout=5) == b"echo:warm"
    before = len(os.listdir("/proc/self/fd"))
    fds = make()
    raw = _raw_send(srv.path, wire.pack_header(Kind.REQUEST, 9, length, Flag.PAYLOAD_FD), fds)
    for fd in fds:
        os.close(fd)
    raw.settimeout(5)
    answer = raw.recv(1000)
    magic, version, kind, flags, rid, _ = wire.HEADER.unpack_from(answer)
    code, _text = wire.unpack_error(answer[wire.HEADER_SIZE :])
    assert (kind, rid) == (Kind.ERROR, 9)
    assert code == (wire.ErrorCode.TOO_LARGE if reason == "OVERSIZE" else wire.ErrorCode.MALFORMED)
    if reason == "OVERSIZE":
        assert srv.stats.too_large == 1
    else:
        assert wait_for(lambda: srv.stats.dropped[reason] == 1)
    assert cli.request(b"still serving", timeout=5) == b"echo:still serving"
    raw.close()
    # Every fd the server received was closed.
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before)


def test_no_fd_growth_over_many_large_messages(serve, client):
    serve(lambda m: b"ok")
    cli = client()
    data = pattern(300_000)
    cli.request(data, timeout=10)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        assert cli.request(data, timeout=10) == b"ok"
    # (A live mapping holds one fd: Python's mmap keeps a dup until the message is released.)
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before)


def test_concurrent_large_requests(serve, client):
    serve(lambda m: bytes(m.data[:8]) + b"%d" % len(m.data))
    cli = client()
    errors = []

    def worker(n):
        try:
            for i in range(10):
                data = bytes([n, i]) * (200_000 + n)
                assert cli.request(data, timeout=20) == data[:8] + b"%d" % len(data)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
