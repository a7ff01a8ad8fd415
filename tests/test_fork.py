"""fork(): a Client, Server or loaned buffer used in a forked child.

Each scenario runs in its own process (it forks, and a process with pytest's
threads is a poor parent), with a server thread answering every request with
the sender's pid, so a reply that reached the wrong process shows.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import os, sys, threading, time
import machipc
from machipc.policies import AllowAll
D, IMPL = sys.argv[1], sys.argv[2]
srv = machipc.Server("org.test.fork", AllowAll(), directory=D, impl=IMPL)
got = []
def handler(msg):
    got.append(bytes(msg.data))
    return b"%d:" % msg.sender.pid + bytes(msg.data)
threading.Thread(target=srv.serve, args=(handler,), daemon=True).start()
cli = machipc.Client("org.test.fork", directory=D, impl=IMPL, timeout=30)
assert cli.request(b"warm") == b"%d:warm" % os.getpid()

def in_child(body):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException as exc:
            print("child:", type(exc).__name__, exc, flush=True)
            code = 1
        os._exit(code)
    return pid

def wait(pid):
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
"""

SCENARIOS = {
    # parent and child both make requests on the same Client at once: each gets its own replies
    "client_requests": """
        def child():
            me = os.getpid()
            for i in range(200):
                assert cli.request(b"c%d" % i) == b"%d:c%d" % (me, i)
            cli.send(b"one-way from the child")
            cli.close()
        pid = in_child(child)
        for i in range(200):
            assert cli.request(b"p%d" % i) == b"%d:p%d" % (os.getpid(), i)
        wait(pid)
        assert cli.request(b"after") == b"%d:after" % os.getpid()
        deadline = time.monotonic() + 30
        while b"one-way from the child" not in got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b"one-way from the child" in got
    """,
    # a child that only closes the inherited Client leaves the parent's connection alone
    "client_close_in_child": """
        wait(in_child(cli.close))
        assert cli.request(b"still") == b"%d:still" % os.getpid()
    """,
    # the server in a child: a clear error, and closing it there does not touch the parent's
    "server_in_child": """
        def child():
            try:
                srv.receive(timeout=1)
            except machipc.ServerClosed as exc:
                assert "fork" in str(exc) and str(os.getppid()) in str(exc), exc
            else:
                raise AssertionError("a forked child received on its parent's Server")
            srv.close()
        wait(in_child(child))
        assert os.path.exists(srv.path)
        assert cli.request(b"alive") == b"%d:alive" % os.getpid()
        other = machipc.Client("org.test.fork", directory=D, impl=IMPL)
        assert other.request(b"new") == b"%d:new" % os.getpid()
    """,
    # a loaned buffer still mapped by a forked child is sent (as a sealed copy), no fd leaks
    "loan_held_by_child": """
        def fds():
            return len(os.listdir("/proc/self/fd"))
        size = 1 << 20
        buf = cli.buffer(size)
        buf[:] = b"L" * size
        r, w = os.pipe()
        pid = in_child(lambda: os.read(r, 1))  # holds the mapping until told
        before = fds()
        assert cli.request(buf) == b"%d:" % os.getpid() + b"L" * size
        after = fds()
        os.write(w, b"x")
        wait(pid)
        assert after <= before, (before, after)
    """,
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_fork(scenario, impl, sockdir):
    code = PRELUDE + textwrap.dedent(SCENARIOS[scenario]) + "\nprint('OK', flush=True)\n"
    done = subprocess.run([sys.executable, "-c", code, sockdir, impl], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr[-3000:]


def test_aio_client_in_forked_child(impl, sockdir):
    body = """
        from machipc import aio
        import asyncio
        acli = aio.Client("org.test.fork", directory=D, impl=IMPL)
        async def ask(tag):
            return await acli.request(tag)
        assert asyncio.run(ask(b"a")) == b"%d:a" % os.getpid()
        def child():
            assert asyncio.run(ask(b"c")) == b"%d:c" % os.getpid()
        wait(in_child(child))
        assert acli.sync.request(b"p") == b"%d:p" % os.getpid()  # the parent's connection is intact
    """
    code = PRELUDE + textwrap.dedent(body) + "\nprint('OK', flush=True)\n"
    done = subprocess.run([sys.executable, "-c", code, sockdir, impl], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr[-3000:]


def test_aio_server_in_forked_child(impl, sockdir):
    body = """
        from machipc import aio
        import asyncio
        asrv = aio.Server("org.test.fork.aio", directory=D, impl=IMPL)
        def child():
            async def use():
                try:
                    await asrv.receive(timeout=1)
                except machipc.ServerClosed as exc:
                    assert "fork" in str(exc), exc
                else:
                    raise AssertionError("a forked child received on its parent's aio.Server")
            asyncio.run(use())
            asrv.close()
        wait(in_child(child))
        assert os.path.exists(asrv.sync.path)
        other = machipc.Client("org.test.fork.aio", directory=D, impl=IMPL, timeout=30)
        async def serve_one():
            got = await asrv.receive(timeout=30)
            return bytes(got.data)
        other.send(b"to the parent")
        assert asyncio.run(serve_one()) == b"to the parent"
    """
    code = PRELUDE + textwrap.dedent(body) + "\nprint('OK', flush=True)\n"
    done = subprocess.run([sys.executable, "-c", code, sockdir, impl], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr[-3000:]
