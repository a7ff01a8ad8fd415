"""End-to-end tests of the Mach transport (machipc/mach.py + _mach.pyx).

They need macOS (the macOS workflow runs them on arm64 and x86_64 runners);
everywhere else they skip. Each test checks in a random service name.
"""

import os
import select
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

if sys.platform != "darwin":
    pytest.skip("Mach transport end-to-end tests need macOS", allow_module_level=True)

from machipc import errors, mach  # noqa: E402
from machipc.wire import Drop, ErrorCode, Kind, unpack_error  # noqa: E402


def test_extension_is_built():
    import machipc._mach as ext

    assert ext.IMPLEMENTATION == "mach" and mach._mach is ext


@pytest.fixture
def name():
    return f"org.machipc.test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def server(name):
    st = mach.server_transport(name)
    yield st
    st.close()


def client_proc(name: str, code: str) -> subprocess.Popen:
    script = textwrap.dedent(
        f"""
        from machipc import mach
        from machipc.wire import Kind
        c = mach.client_conn({name!r}, 5.0)
        """
    ) + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_one_way_from_subprocess_has_real_pid(server, name):
    p = client_proc(name, "c.send(Kind.MESSAGE, 0, b'hello', 5.0)")
    got = server.recv(10.0)
    p.wait(10)
    assert got is not None, p.stderr.read()
    status, conn, kind, flags, rid, payload, pid, uid, gid, peer = got
    assert status == Drop.OK and kind == Kind.MESSAGE and rid == 0 and bytes(payload) == b"hello"
    assert pid == p.pid == peer.pid
    assert uid == os.geteuid() and peer.guard_kind == "pidversion" and peer.guard
    with pytest.raises(errors.InvalidArgument):
        conn.send(Kind.REPLY, 1, b"", 1.0)


def test_request_reply_from_subprocess(server, name):
    p = client_proc(name, """
        c.send(Kind.REQUEST, 7, b'ping', 5.0)
        got = c.recv(10.0)
        print(got[0], got[2], got[4], bytes(got[5]).decode())
    """)
    status, conn, kind, _f, rid, payload, pid, *_ = server.recv(10.0)
    assert (status, kind, rid, bytes(payload), pid) == (Drop.OK, Kind.REQUEST, 7, b"ping", p.pid)
    conn.send(Kind.REPLY, 7, b"pong", 5.0)
    out, err = p.communicate(timeout=10)
    assert out.decode().split() == [str(int(Drop.OK)), str(int(Kind.REPLY)), "7", "pong"], err


@pytest.mark.parametrize("size", [0, 1, 3, 4096, mach._mach.OOL_THRESHOLD if mach._mach else 0, 100_000, 4 << 20])
def test_payload_sizes_inline_and_ool(server, name, size):
    data = os.urandom(size)
    c = mach.client_conn(name, 5.0)
    try:
        c.send(Kind.REQUEST, 1, data, 5.0)
        status, conn, kind, _f, rid, payload, pid, *_ = server.recv(10.0)
        assert status == Drop.OK and pid == os.getpid()
        assert bytes(payload) == data
        if size > mach._mach.OOL_THRESHOLD:
            assert isinstance(payload, memoryview) and payload.readonly
        conn.send(Kind.REPLY, 1, data, 5.0)
        got = c.recv(10.0)
        assert got[0] == Drop.OK and bytes(got[5]) == data
    finally:
        c.close()


def test_dropped_reply_right_fails_the_request(server, name):
    c = mach.client_conn(name, 5.0)
    try:
        c.send(Kind.REQUEST, 3, b"x", 5.0)
        got = server.recv(10.0)
        got[1].close()  # the server drops the send-once right unanswered
        status, _c, kind, _f, rid, payload, *_ = c.recv(5.0)
        assert (status, kind, rid) == (Drop.OK, Kind.ERROR, 3)
        code, text = unpack_error(payload)
        assert code == ErrorCode.SHUTTING_DOWN and "MACH_NOTIFY_SEND_ONCE" in text
    finally:
        c.close()


def test_server_exit_fails_outstanding_requests(name):
    st = mach.server_transport(name)
    c = mach.client_conn(name, 5.0)
    try:
        c.send(Kind.REQUEST, 5, b"x", 5.0)
        st.close()  # the queued request (and its reply right) is destroyed
        got = c.recv(5.0)
        assert got is not None and got[2] == Kind.ERROR and got[4] == 5
        with pytest.raises(errors.PeerGone):
            c.send(Kind.MESSAGE, 0, b"x", 1.0)
    finally:
        c.close()


def test_unknown_service(name):
    with pytest.raises(errors.ServiceNotFound, match="BOOTSTRAP_UNKNOWN_SERVICE"):
        mach.client_conn(name, 1.0)


def test_name_in_use(server, name):
    with pytest.raises(errors.ServiceInUse):
        mach.server_transport(name)


def test_name_too_long():
    with pytest.raises(errors.InvalidArgument):
        mach.server_transport("x" * 128)


def test_timeout_and_wakeup(server):
    t0 = time.monotonic()
    assert server.recv(0.2) is None
    assert 0.15 < time.monotonic() - t0 < 2
    threading.Timer(0.2, server.wakeup).start()
    t0 = time.monotonic()
    assert server.recv(30.0) is None
    assert time.monotonic() - t0 < 5


def test_queue_limit_raised(server, name):
    c = mach.client_conn(name, 5.0)
    try:
        for i in range(50):  # the default limit is 5 messages
            c.send(Kind.MESSAGE, 0, b"%d" % i, 0)
        assert [bytes(server.recv(1.0)[5]) for _ in range(50)] == [b"%d" % i for i in range(50)]
    finally:
        c.close()


def test_send_timeout_when_queue_full(name):
    st = mach.server_transport(name, queue_limit=2)
    c = mach.client_conn(name, 5.0)
    try:
        with pytest.raises(errors.IPCTimeoutError, match="MACH_SEND_TIMED_OUT"):
            for _ in range(10):
                c.send(Kind.MESSAGE, 0, b"x", 0.05)
    finally:
        c.close()
        st.close()


def test_kqueue_fileno_turns_readable(server, name):
    fd = server.fileno()
    assert select.select([fd], [], [], 0)[0] == []
    c = mach.client_conn(name, 5.0)
    try:
        c.send(Kind.MESSAGE, 0, b"x", 1.0)
        assert select.select([fd], [], [], 5)[0] == [fd]
        assert server.recv(0)[0] == Drop.OK
    finally:
        c.close()


def test_fork_gives_clear_error(server, name):
    c = mach.client_conn(name, 5.0)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                c.send(Kind.MESSAGE, 0, b"x", 1.0)
                os._exit(1)
            except errors.IPCError as exc:
                os._exit(0 if "fork" in str(exc) else 2)
            except BaseException:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        c.close()


def test_inline_vs_ool_timing(name):
    """Prints round-trip times per payload size and mode: the data behind OOL_THRESHOLD (docs/macos.md)."""
    st = mach.server_transport(name)
    c = mach.client_conn(name, 5.0)
    ext = mach._mach
    rows = []
    try:
        for size in (1024, 4096, 16384, 32768, 65536, 262144):
            data = os.urandom(size)
            for mode, threshold in (("inline", 1 << 30), ("ool", 0)):
                n, t0 = 200, time.perf_counter()
                for _ in range(n):
                    ext.send(c._service, 19, 0, 0, mach.pack_header(Kind.MESSAGE, 0, size), data, 5.0, threshold,
                             c._gen)
                    got = st.recv(5.0)
                    assert got[0] == Drop.OK
                    del got
                rows.append((size, mode, (time.perf_counter() - t0) / n * 1e6))
    finally:
        c.close()
        st.close()
    print("\nsize     mode    us/message")
    for size, mode, us in rows:
        print(f"{size:<8} {mode:<7} {us:8.1f}")
