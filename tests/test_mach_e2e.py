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
    status, conn, kind, flags, rid, payload, pid, uid, gid, peer = (
        got.status, got.conn, got.kind, got.flags, got.request_id, got.payload, got.pid, got.uid, got.gid, got.peer)
    assert status == Drop.OK and kind == Kind.MESSAGE and rid == 0 and bytes(payload) == b"hello"
    assert pid == p.pid == peer.pid
    assert uid == os.geteuid() and peer.guard_kind == "pidversion" and peer.guard
    with pytest.raises(errors.InvalidArgument):
        conn.send(Kind.REPLY, 1, b"", 1.0)


def test_request_reply_from_subprocess(server, name):
    p = client_proc(name, """
        c.send(Kind.REQUEST, 7, b'ping', 5.0)
        got = c.recv(10.0)
        print(got.status, got.kind, got.request_id, bytes(got.payload).decode())
    """)
    _got = server.recv(10.0)
    status, conn, kind, rid, payload, pid = _got.status, _got.conn, _got.kind, _got.request_id, _got.payload, _got.pid
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
        _got = server.recv(10.0)
        status, conn, kind, rid, payload, pid = _got.status, _got.conn, _got.kind, _got.request_id, _got.payload, _got.pid
        assert status == Drop.OK and pid == os.getpid()
        assert bytes(payload) == data
        if size > mach._mach.OOL_THRESHOLD:
            assert isinstance(payload, memoryview) and payload.readonly
        conn.send(Kind.REPLY, 1, data, 5.0)
        got = c.recv(10.0)
        assert got.status == Drop.OK and bytes(got.payload) == data
    finally:
        c.close()


def test_dropped_reply_right_fails_the_request(server, name):
    c = mach.client_conn(name, 5.0)
    try:
        c.send(Kind.REQUEST, 3, b"x", 5.0)
        got = server.recv(10.0)
        got.conn.close()  # the server drops the send-once right unanswered
        _got = c.recv(5.0)
        status, kind, rid, payload = _got.status, _got.kind, _got.request_id, _got.payload
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
        assert got is not None and got.kind == Kind.ERROR and got.request_id == 5
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
        assert [bytes(server.recv(1.0).payload) for _ in range(50)] == [b"%d" % i for i in range(50)]
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
        assert server.recv(0).status == Drop.OK
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
                    assert got.status == Drop.OK
                    del got
                rows.append((size, mode, (time.perf_counter() - t0) / n * 1e6))
    finally:
        c.close()
        st.close()
    print("\nsize     mode    us/message")
    for size, mode, us in rows:
        print(f"{size:<8} {mode:<7} {us:8.1f}")


# -- the macOS review's findings (docs/macos.md), on the real kernel -----------------------------

import ctypes  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402

import machipc  # noqa: E402
from machipc import machmsg as mm  # noqa: E402
from machipc.wire import pack_header  # noqa: E402

_libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib", use_errno=True)
_TASK_VM_INFO = 22  # <mach/task_info.h>


def port_names() -> int:
    """mach_port_names(mach_task_self()): how many names this task's IPC space holds."""
    names, types = ctypes.c_void_p(), ctypes.c_void_p()
    n_names, n_types = ctypes.c_uint32(), ctypes.c_uint32()
    task = ctypes.c_uint32.in_dll(_libc, "mach_task_self_").value
    kr = _libc.mach_port_names(task, ctypes.byref(names), ctypes.byref(n_names), ctypes.byref(types),
                               ctypes.byref(n_types))
    assert kr == 0, kr
    _libc.vm_deallocate(task, names, ctypes.c_size_t(n_names.value * 4))
    _libc.vm_deallocate(task, types, ctypes.c_size_t(n_types.value * 4))
    return n_names.value


def virtual_size() -> int:
    """task_info(TASK_VM_INFO).virtual_size: grows with every region left mapped."""
    info = (ctypes.c_uint32 * 128)()
    count = ctypes.c_uint32(128)
    task = ctypes.c_uint32.in_dll(_libc, "mach_task_self_").value
    assert _libc.task_info(task, _TASK_VM_INFO, info, ctypes.byref(count)) == 0
    return struct.unpack_from("<Q", bytes(info), 0)[0]


HOSTILE = r"""
import ctypes, struct, sys
from machipc import machmsg as mm
from machipc.wire import Kind, pack_header
libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
bp = ctypes.c_uint32.in_dll(libc, "bootstrap_port").value
port = ctypes.c_uint32()
assert libc.bootstrap_look_up(bp, sys.argv[1].encode(), ctypes.byref(port)) == 0
copy, dtype, msgh_id = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
size = 8 << 20
region = ctypes.create_string_buffer(size)
for _ in range(int(sys.argv[5])):
    body = struct.pack("<I", 1) + struct.pack("<QBBBBI", ctypes.addressof(region), 0, copy, 0, dtype, size)
    wire = pack_header(Kind.MESSAGE, 0, size)
    n = 24 + len(body) + len(wire)
    bits = mm.MACH_MSGH_BITS(mm.MACH_MSG_TYPE_COPY_SEND, 0) | mm.MACH_MSGH_BITS_COMPLEX
    msg = ctypes.create_string_buffer(struct.pack("<IIIIIi", bits, n, port.value, 0, 0, msgh_id) + body + wire)
    kr = libc.mach_msg(msg, mm.MACH_SEND_MSG | mm.MACH_SEND_TIMEOUT, n, 0, 0, 5000, 0)
    assert kr == 0, hex(kr)
"""


@pytest.mark.parametrize("copy, dtype, msgh_id", [
    (mm.MACH_MSG_PHYSICAL_COPY, mm.MACH_MSG_OOL_DESCRIPTOR, 0x1234),  # refused: wrong msgh_id
    (mm.MACH_MSG_VIRTUAL_COPY, mm.MACH_MSG_OOL_VOLATILE_DESCRIPTOR, mm.MACHIPC_MSGH_ID),  # refused: volatile
    (mm.MACH_MSG_PHYSICAL_COPY, mm.MACH_MSG_OOL_DESCRIPTOR, mm.MACHIPC_MSGH_ID),  # accepted, then released
])
def test_hostile_ool_senders_leave_nothing_mapped(server, name, copy, dtype, msgh_id):
    """Finding 5: 8 MiB regions the kernel marks deallocate=FALSE must still be unmapped."""
    assert server.recv(0) is None
    before = virtual_size()
    p = subprocess.run([sys.executable, "-c", HOSTILE, name, str(copy), str(dtype), str(msgh_id), "40"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for _ in range(40):
        got = server.recv(10.0)
        assert got is not None
        del got
    grown = virtual_size() - before
    assert grown < 40 * (8 << 20) // 2, f"{grown} bytes stayed mapped after 40 x 8 MiB hostile messages"


def test_fileno_not_readable_after_the_port_is_emptied(server, name):
    """Finding 3: the kqueue fd must go unreadable, or asyncio spins."""
    fd = server.fileno()
    c = mach.client_conn(name, 5.0)
    try:
        c.send(Kind.MESSAGE, 0, b"x", 1.0)
        assert select.select([fd], [], [], 5)[0] == [fd]
        assert server.recv(0).status == Drop.OK
        assert server.recv(0) is None
        assert select.select([fd], [], [], 0)[0] == []
    finally:
        c.close()


def test_port_names_flat_when_requests_time_out(name):
    """Finding 8: a REQUEST whose send times out must not leave its reply right behind."""
    st = mach.server_transport(name, queue_limit=1)
    c = mach.client_conn(name, 5.0)
    try:
        c.send(Kind.MESSAGE, 0, b"fill", 1.0)
        for _ in range(5):  # warm up the client's free list
            with pytest.raises(errors.IPCTimeoutError):
                c.send(Kind.REQUEST, 1, b"x", 0)
        before = port_names()
        for i in range(500):
            with pytest.raises(errors.IPCTimeoutError):
                c.send(Kind.REQUEST, i + 2, b"x", 0)
        assert port_names() - before < 5
    finally:
        c.close()
        st.close()


SERVE = """
import sys, time, machipc
srv = machipc.Server(sys.argv[1])
print("ready", flush=True)
srv.serve(lambda m: b"ok")
print("stopped", flush=True)
srv.close()
"""


def test_sigterm_stops_serve(name):
    """Finding 4: SIGTERM reaches a serve() blocked in mach_msg (MACH_RCV_INTERRUPT)."""
    p = subprocess.Popen([sys.executable, "-c", SERVE, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with machipc.Client(name, timeout=30) as cli:
            assert cli.request(b"x") == b"ok"  # serve() is running, its handlers installed
        time.sleep(0.5)  # back inside mach_msg(receive)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0 and "stopped" in out, err


def test_second_server_process_gets_service_in_use(name):
    """Finding 9: launchd answers BOOTSTRAP_NOT_PRIVILEGED; machipc says ServiceInUse."""
    p = subprocess.Popen([sys.executable, "-c", SERVE, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(errors.ServiceInUse):
            mach.server_transport(name)
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)


def test_serve_stop_and_server_identity_on_replies(name):
    """Findings 2, 6, 7: a graceful stop, server_policy checked on replies, no per-request state."""
    srv = machipc.Server(name)
    t = threading.Thread(target=srv.serve, args=(lambda m: b"ok",), daemon=True)
    t.start()
    try:
        with machipc.Client(name, timeout=30) as cli:
            for _ in range(100):
                assert cli.request(b"x") == b"ok"
        with machipc.Client(name, timeout=30, server_policy=machipc.policies.Allowlist(uids={424242})) as cli:
            with pytest.raises(errors.NotPermitted):
                cli.request(b"x")
        assert len(srv._peers) == 0
    finally:
        srv.stop()
        t.join(30)
        srv.close()
    assert not t.is_alive()


def test_client_buffer_sends_out_of_line(server, name):
    """Finding 16: Client.buffer() works without memfds."""
    with machipc.Client(name, timeout=30) as cli:
        with cli.buffer(100_000) as buf:
            buf[:3] = b"abc"
            cli.send(buf)
    got = server.recv(10.0)
    assert got.status == Drop.OK and bytes(got.payload[:3]) == b"abc" and len(got.payload) == 100_000


def test_sender_identity_is_its_running_image(server, name):
    """Finding 11: exe_id is the (dev, ino) of the sender's executable mapping
    (PROC_PIDREGIONPATHINFO), equal to the interpreter file it runs; finding 19:
    the token-checked liveness says alive while it runs and gone after."""
    from machipc.policies import _macos

    p = client_proc(name, "c.send(Kind.MESSAGE, 0, b'who', 5.0); import time; time.sleep(3)")
    try:
        got = server.recv(10.0)
        assert got is not None and got.status == Drop.OK, p.stderr.read()
        peer = got.peer
        exe = os.path.realpath(peer.exe)
        st = os.stat(exe)
        assert peer.exe_id == (st.st_dev, st.st_ino), peer.unknown_reason
        assert _macos.pidversion_alive(peer.pid, peer.guard)
    finally:
        p.wait(30)
    assert not _macos.pidversion_alive(peer.pid, peer.guard)
