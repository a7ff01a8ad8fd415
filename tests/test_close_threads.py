"""close() from another thread while a thread is blocked in the client.

The blocked call raises PeerGone saying the client was closed (not that the
server went away), and that close() releases the socket.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

import machipc
from machipc.policies import AllowAll

NAME = "org.test.close"


def socket_inode(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def open_sockets() -> set:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return found


def fill(cli):
    try:
        while True:
            cli.send(b"x" * 1000, timeout=0)
    except machipc.IPCTimeoutError:
        pass


BLOCKING = {
    "request": lambda cli: cli.request(b"never answered", timeout=None),
    "send": lambda cli: (fill(cli), cli.send(b"x" * 1000, timeout=None)),
    "send_many": lambda cli: (fill(cli), cli.send_many([b"y"] * 100, timeout=None)),
    "two_requests": None,  # a leader and a follower both waiting
}


@pytest.mark.parametrize("what", sorted(BLOCKING))
def test_close_from_another_thread(what, impl, sockdir):
    with machipc.Server(NAME, AllowAll(), directory=sockdir, impl=impl):  # never reads
        cli = machipc.Client(NAME, directory=sockdir, impl=impl)
        sock = socket_inode(cli._conn.fd)
        errors = []
        entered = threading.Barrier(3 if what == "two_requests" else 2)

        def blocked(call):
            entered.wait()
            try:
                call(cli)
            except machipc.IPCError as exc:
                errors.append(exc)

        calls = [BLOCKING["request"]] * 2 if what == "two_requests" else [BLOCKING[what]]
        threads = [threading.Thread(target=blocked, args=(c,), daemon=True) for c in calls]
        for t in threads:
            t.start()
        entered.wait()
        # the threads are in (or about to enter) their wait; close must wake them either way
        time.sleep(0.2)
        cli.close()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "close() did not wake the blocked call"
        assert len(errors) == len(calls)
        for exc in errors:
            assert isinstance(exc, machipc.PeerGone) and "client was closed" in str(exc), repr(exc)
        assert sock not in open_sockets(), "the socket is still open after close()"
        with pytest.raises(machipc.PeerGone, match="client was closed"):
            cli.request(b"after")
