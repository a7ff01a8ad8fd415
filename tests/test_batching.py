"""Batched one-way messages: Client.send_many and Server.receive_many."""

import subprocess

import pytest

import machipc
from machipc import wire

from conftest import python_client


def test_send_many_then_receive_many_keeps_order(impl, sockdir, client):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        cli = client()
        assert cli.send_many(b"%d" % i for i in range(200)) == 200  # fits the socket queue
        got = []
        while len(got) < 200:
            batch = srv.receive_many(100, timeout=5)
            assert 1 <= len(batch) <= 100
            got.extend(int(m.data) for m in batch)
        assert got == list(range(200))
        with pytest.raises(TimeoutError):
            srv.receive_many(10, timeout=0.05)


def test_send_many_mixes_large_payloads_in_order(impl, sockdir, client):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        items = [b"a", b"b" * (wire.INLINE_MAX + 10), b"c", bytearray(b"d"), memoryview(b"e")]
        assert client().send_many(items) == 5
        got = []
        while len(got) < 5:
            got.extend(bytes(m.data) for m in srv.receive_many(10, timeout=5))
        assert got == [bytes(i) for i in items]


def test_send_many_from_many_processes_each_in_order(impl, sockdir):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        body = "c.send_many(b'%d %d' % (os.getpid(), i) for i in range(2000))"
        procs = [subprocess.Popen(python_client(sockdir, impl, body)) for _ in range(3)]
        seen: dict[int, list[int]] = {}
        while sum(map(len, seen.values())) < 6000:
            for m in srv.receive_many(256, timeout=20):
                pid, i = map(int, bytes(m.data).split())
                assert pid == m.sender.pid  # the kernel's pid, per packet
                seen.setdefault(pid, []).append(i)
        for p in procs:
            assert p.wait(20) == 0
        assert sorted(seen) == sorted(p.pid for p in procs)
        assert all(v == list(range(2000)) for v in seen.values())


def test_send_many_rejects_oversize_before_sending(impl, sockdir, client):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl):
        cli = client(max_size=1000)
        with pytest.raises(machipc.MessageTooLarge):
            cli.send_many([b"ok", b"x" * 1001])


def test_receive_many_validates_max_count(impl, sockdir):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        with pytest.raises(ValueError):
            srv.receive_many(0)
