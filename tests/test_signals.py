"""PEP 475 for every blocking call, with real signals sent to a child process.

The child blocks in one call (send into a full queue, send_many, request with no
answer, receive with nothing to receive, connect to a full backlog) and the test
signals it:

* SIGINT: the default handler's KeyboardInterrupt must come out of the call,
  also when the handler is installed with SA_RESTART (``signal.siginterrupt``);
* SIGUSR1 with a handler that returns: the handler runs, and the call goes on
  with what is left of its timeout (IPCTimeoutError, not InterruptedError).

Signals are re-sent until the child answers, so a signal landing just before the
child enters its wait cannot hang the test.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

import machipc
from machipc.policies import AllowAll

NAME = "org.test.sig"

FULL_QUEUE = """
        c = machipc.Client(NAME, directory=D, impl=IMPL)
        try:
            while True:
                c.send(b"x" * 1000, timeout=0)
        except machipc.IPCTimeoutError:
            pass
"""

BLOCK = {
    "send": FULL_QUEUE + """
        call = lambda t: c.send(b"x" * 1000, timeout=t)
    """,
    "send_many": FULL_QUEUE + """
        call = lambda t: c.send_many([b"y" * 100] * 50, timeout=t)
    """,
    "request": """
        c = machipc.Client(NAME, directory=D, impl=IMPL)
        call = lambda t: c.request(b"never answered", timeout=t)
    """,
    "connect": """
        held = []
        try:
            while True:
                held.append(machipc.Client(NAME, directory=D, impl=IMPL, timeout=0))
        except machipc.IPCTimeoutError:
            pass
        call = lambda t: machipc.Client(NAME, directory=D, impl=IMPL, timeout=t)
    """,
    "receive": """
        srv = machipc.Server(NAME + ".own", directory=D, impl=IMPL)
        call = lambda t: srv.receive(timeout=t)
    """,
}

CHILD = """
import machipc, signal, sys, time
NAME, D, IMPL, MODE = sys.argv[1:5]
{setup}
if MODE.startswith("int"):
    if MODE == "int-restart":  # SA_RESTART: a system call the kernel restarts keeps waiting
        signal.siginterrupt(signal.SIGINT, False)
    try:
        print("ready", flush=True)
        call(None)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
else:
    hits = []
    signal.signal(signal.SIGUSR1, lambda *a: hits.append(1))
    print("ready", flush=True)
    start = time.monotonic()
    try:
        call(3.0)
        print("returned", flush=True)
    except Exception as exc:
        print(type(exc).__name__, len(hits) > 0, time.monotonic() - start >= 3.0, flush=True)
"""


def wait_until_blocked(pid: int) -> None:
    """Wait (up to 10 s) until ``pid`` sleeps in a system call, so the first signal finds it
    blocked in the call under test rather than on its way there."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "S":
                    return
        except OSError:
            return
        time.sleep(0.01)


def run_child(op: str, impl: str, sockdir: str, mode: str, signum: int) -> str:
    code = CHILD.format(setup=textwrap.dedent(BLOCK[op]))
    child = subprocess.Popen(
        [sys.executable, "-c", code, NAME, sockdir, impl, mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready", child.stdout.read()
        wait_until_blocked(child.pid)
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            child.send_signal(signum)
            try:
                child.wait(timeout=0.3)
            except subprocess.TimeoutExpired:
                continue
        assert child.poll() is not None, f"{op} ignored the signal"
        out, _ = child.communicate()  # what it wrote since the last timed-out wait, too
        return out.strip()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.fixture
def silent_server(impl, sockdir):
    """A server that accepts nothing and reads nothing: queues fill, requests go unanswered,
    the backlog fills."""
    srv = machipc.Server(NAME, AllowAll(), directory=sockdir, impl=impl, backlog=1)
    yield srv
    srv.close()


@pytest.mark.parametrize("op", sorted(BLOCK))
def test_sigint_interrupts_blocking_call(op, impl, sockdir, silent_server):
    assert run_child(op, impl, sockdir, "int", signal.SIGINT) == "KeyboardInterrupt"


@pytest.mark.parametrize("op", sorted(BLOCK))
def test_sigint_interrupts_blocking_call_under_sa_restart(op, impl, sockdir, silent_server):
    # A wait with no timeout must still come back to Python for the handler to run: a
    # blocking recvmsg without SO_RCVTIMEO would be restarted by the kernel and hang here.
    assert run_child(op, impl, sockdir, "int-restart", signal.SIGINT) == "KeyboardInterrupt"


@pytest.mark.parametrize("op", sorted(BLOCK))
def test_returning_handler_resumes_with_remaining_timeout(op, impl, sockdir, silent_server):
    assert run_child(op, impl, sockdir, "usr1", signal.SIGUSR1) == "IPCTimeoutError True True"


SERVER = """
import asyncio, os, sys, time
import machipc, machipc.aio
NAME, D, IMPL, HOW = sys.argv[1:5]

def handler(msg):
    print("handling", flush=True)
    time.sleep(60)  # far longer than the test waits: only a second signal ends this
    return b"late"

async def ahandler(msg):
    print("handling", flush=True)
    await asyncio.sleep(60)
    return b"late"

srv = machipc.Server(NAME, directory=D, impl=IMPL)
try:
    print("serving", flush=True)
    if HOW == "plain":
        srv.serve(handler)
    elif HOW == "workers":
        srv.serve(handler, workers=2)
    else:
        asyncio.run(machipc.aio.Server(NAME, server=srv).serve(ahandler))
except KeyboardInterrupt:
    print("KeyboardInterrupt", srv.closed, os.path.exists(srv.path), flush=True)
"""


@pytest.mark.parametrize("how", ["plain", "workers", "aio"])
def test_second_sigint_ends_graceful_stop_at_once(how, impl, sockdir):
    import threading

    child = subprocess.Popen(
        [sys.executable, "-c", SERVER, NAME, sockdir, impl, how], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert child.stdout.readline().strip() == "serving", child.stdout.read()

        def ask():
            try:
                with machipc.Client(NAME, directory=sockdir, impl=impl, timeout=90) as cli:
                    cli.request(b"slow")
            except machipc.IPCError:
                pass

        threading.Thread(target=ask, daemon=True).start()
        assert child.stdout.readline().strip() == "handling"
        child.send_signal(signal.SIGINT)  # graceful: waits for the 60 s handler
        deadline = time.monotonic() + 30
        # Spaced out: a signal landing while the child is already printing its result
        # would interrupt that, not the graceful stop. Under load the first SIGINT may
        # take a while to be handled, so a later one stands in for the second.
        while child.poll() is None and time.monotonic() < deadline:
            try:
                child.wait(timeout=3)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)  # the second Ctrl-C
        assert child.poll() is not None, "a second SIGINT did not end the graceful stop"
        out, _ = child.communicate()
        assert out.strip() and out.strip().splitlines()[-1] == "KeyboardInterrupt True False", repr(out)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
