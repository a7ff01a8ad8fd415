"""machipc.connecting: a full listen backlog is waited out (issue 12, item 7; audit F12).

The flood is real: another process runs blocking ``connect()/close()`` loops on
several threads against a server with a tiny backlog, so the backlog is full
nearly all the time, and machipc clients must still get in within their timeout.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

import machipc
from machipc import aio, connecting

FLOODER = r"""
import socket, sys, threading
path = sys.argv[1]
def flood():
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(path)
        except OSError:
            pass
        s.close()
for _ in range(8):
    threading.Thread(target=flood, daemon=True).start()
print("flooding", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def flood():
    """flood(path): start a connect() flood on ``path`` in another process until the test ends."""
    procs = []

    def start(path: str) -> None:
        proc = subprocess.Popen([sys.executable, "-c", FLOODER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "flooding"
        time.sleep(0.3)  # let the flood fill the backlog

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def _backlog_full(path: str) -> bool:
    """True when a non-blocking connect finds the backlog full right now (the pre-fix failure)."""
    s = connecting.seqpacket_socket()
    try:
        connecting.connect(s, path, 0)
        return False
    except machipc.IPCTimeoutError:
        return True
    finally:
        s.close()


def test_client_waits_out_a_connect_flood(serve, client, flood):
    srv = serve(backlog=1)
    flood(srv.path)
    full = sum(_backlog_full(srv.path) for _ in range(20))
    print(f"non-blocking connects that found the backlog full: {full} of 20")
    assert full > 0, "the flood never filled the backlog: this test would prove nothing"
    for i in range(5):
        start = time.monotonic()
        cli = client(timeout=10)
        waited = time.monotonic() - start
        assert cli.request(b"%d" % i, timeout=30) == b"echo:%d" % i
        print(f"client {i}: connected after {waited:.3f} s")


def test_connect_timeout_zero_tries_once(serve, flood):
    srv = serve(backlog=1)
    flood(srv.path)
    for _ in range(200):  # until one attempt meets a full backlog
        try:
            machipc.Client("org.test.svc", directory=srv.path.rsplit("/", 1)[0], impl=srv.implementation, connect_timeout=0).close()
        except machipc.IPCTimeoutError as exc:
            assert "backlog" in str(exc)
            return
    pytest.skip("the flood never filled the backlog at the right moment")


def test_aio_client_waits_out_a_connect_flood(serve, flood, sockdir, impl):
    srv = serve(backlog=1)
    flood(srv.path)

    async def main() -> list:
        got = []
        for i in range(5):
            async with aio.Client("org.test.svc", directory=sockdir, impl=impl, timeout=10) as cli:
                got.append(await cli.request(b"%d" % i, timeout=30))
        return got

    assert asyncio.run(main()) == [b"echo:%d" % i for i in range(5)]


def test_second_server_under_flood_is_service_in_use(serve, flood, sockdir, impl):
    """_clear_stale waits out the full backlog too: a live server is never taken for a stale one."""
    srv = serve(backlog=1)
    flood(srv.path)
    for _ in range(5):
        with pytest.raises(machipc.ServiceInUse):
            machipc.Server("org.test.svc", directory=sockdir, impl=impl)
