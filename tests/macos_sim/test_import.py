"""Finding 1 and 2 of the macOS review: the package imports and a graceful stop works."""

import fcntl
import os
import select
import sys
import threading

import machipc
from machipc import _backend, mach, payload
from machipc.wire import Kind
from tests.macos_sim.fakekernel import KERNEL


def test_the_simulation_is_what_cpython_on_macos_has():
    assert sys.platform == "darwin"
    assert not hasattr(fcntl, "F_SEAL_SHRINK") and not hasattr(os, "memfd_create") and not hasattr(select, "epoll")
    assert _backend._compiled is None and mach._mach is sys.modules["machipc._mach"]


def test_whole_package_imports():
    import machipc.aio  # noqa: F401
    import machipc.cli  # noqa: F401
    import machipc.policies  # noqa: F401
    import machipc.workers  # noqa: F401

    assert machipc.Server and machipc.Client


def test_request_reply_and_graceful_stop():
    srv = machipc.Server("org.machipc.sim.import")
    assert srv.implementation == "mach"
    t = threading.Thread(target=srv.serve, args=(lambda m: b"echo:" + bytes(m.data),), daemon=True)
    t.start()
    with machipc.Client("org.machipc.sim.import", timeout=30) as cli:
        assert cli.request(b"hi") == b"echo:hi"
        big = os.urandom(100_000)
        assert cli.request(big) == b"echo:" + big
    srv.stop()  # drains through Server._stop_accepting: no select.epoll on macOS
    t.join(60)
    assert not t.is_alive()
    srv.close()


def test_send_many_on_macos_sends_one_message_each():
    """Mach has no HELLO, so no server announces BATCH: send_many sends each message as
    send() would (large ones out of line), in order."""
    srv = machipc.Server("org.machipc.sim.many")
    got = []
    t = threading.Thread(target=srv.serve, args=(lambda m: got.append(bytes(m.data)),), daemon=True)
    t.start()
    items = [b"%d" % i for i in range(50)] + [os.urandom(100_000), b"last"]
    with machipc.Client("org.machipc.sim.many", timeout=30) as cli:
        assert cli.server_limits is None
        assert cli.send_many(items) == len(items)
        assert cli.request(b"sync?") == b""  # the handler's None: an empty reply, after every message
    srv.stop()
    t.join(60)
    srv.close()
    assert got == items + [b"sync?"] and srv.stats.received == len(items) + 1


def test_client_buffer_on_macos():
    """Finding 16: Client.buffer() / Message.buffer() without memfds (anonymous mapping, sent OOL)."""
    srv = machipc.Server("org.machipc.sim.buffer")
    got = []
    t = threading.Thread(target=srv.serve, args=(lambda m: got.append(bytes(m.data)),), daemon=True)
    t.start()
    with machipc.Client("org.machipc.sim.buffer", timeout=30) as cli:
        with cli.buffer(50_000) as buf:
            buf[:5] = b"hello"
            cli.send(buf)
            assert buf.sent
    srv.stop()
    t.join(60)
    srv.close()
    assert got and got[0][:5] == b"hello" and len(got[0]) == 50_000
    assert not payload.HAVE_SEALED_MEMFD
    assert KERNEL.self_task.mapped() == 0  # the server's copy was unmapped after the handler


def test_pure_python_flag_is_false_on_macos():
    """The Mach transport is Cython and has no pure twin: PURE_PYTHON must not say otherwise."""
    assert machipc.PURE_PYTHON is False
