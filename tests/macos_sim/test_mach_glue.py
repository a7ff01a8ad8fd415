"""machipc/mach.py (the Mach transport glue) over the fake kernel.

(It replaces the FakeMach of the former tests/test_mach_glue.py: one model of
the kernel, tests/macos_sim/fakekernel.py.)
"""

import os

import pytest

from machipc import _mach, errors, mach
from machipc import machmsg as mm
from machipc.wire import Drop, ErrorCode, Kind, pack_header, unpack_error
from tests.macos_sim.fakekernel import KERNEL, Task
from tests.macos_sim.sim_child import transport_pair

NAME = "org.machipc.glue"


@pytest.fixture
def pair():
    yield from transport_pair(NAME)


def raw_send(header, payload=b"", reply=0, reply_disposition=0):
    service = _mach.look_up(NAME)
    try:
        _mach.send(service, mm.MACH_MSG_TYPE_COPY_SEND, reply, reply_disposition, header, payload, 1.0)
    finally:
        _mach.deallocate(service)


def test_one_way_message(pair):
    server, client = pair
    client.send(Kind.MESSAGE, 0, b"hello", 1.0)
    _got = server.recv(0)
    status, conn, kind, flags, rid, payload, pid, uid, gid, peer = (
        _got.status, _got.conn, _got.kind, _got.flags, _got.request_id, _got.payload, _got.pid, _got.uid, _got.gid, _got.peer)
    me = KERNEL.self_task
    assert (status, kind, rid, bytes(payload)) == (Drop.OK, Kind.MESSAGE, 0, b"hello")
    assert (pid, uid, gid) == (me.pid, me.uid, me.gid)
    assert peer.pid == me.pid and peer.guard == me.pidversion and peer.guard_kind == "pidversion"
    with pytest.raises(errors.InvalidArgument):
        conn.send(Kind.REPLY, 1, b"", 1.0)
    assert server.recv(0) is None


@pytest.mark.parametrize("size", [0, 5, 32 * 1024, 32 * 1024 + 1, 200_000])
def test_request_reply(pair, size):
    server, client = pair
    data = os.urandom(size)
    client.send(Kind.REQUEST, 11, data, 1.0)
    _got = server.recv(0)
    status, conn, kind, rid, payload = _got.status, _got.conn, _got.kind, _got.request_id, _got.payload
    assert (status, kind, rid) == (Drop.OK, Kind.REQUEST, 11) and bytes(payload) == data
    assert isinstance(payload, memoryview) == (size > 32 * 1024)
    conn.send(Kind.REPLY, 11, data[::-1], 1.0)
    with pytest.raises(errors.PeerGone):
        conn.send(Kind.REPLY, 11, b"twice", 1.0)
    _got = client.recv(0)
    status, kind, rid, payload = _got.status, _got.kind, _got.request_id, _got.payload
    assert (status, kind, rid) == (Drop.OK, Kind.REPLY, 11) and bytes(payload) == data[::-1]


def test_reply_ports_are_reused(pair):
    server, client = pair
    for i in range(1, 4):
        client.send(Kind.REQUEST, i, b"x", 1.0)
        server.recv(0).conn.send(Kind.REPLY, i, b"y", 1.0)
        assert client.recv(0).request_id == i
    assert len(client._free) == 1 and not client._waiting


def test_dropped_reply_right_becomes_an_error(pair):
    server, client = pair
    client.send(Kind.REQUEST, 5, b"x", 1.0)
    server.recv(0).conn.close()
    _got = client.recv(0)
    status, kind, rid, payload = _got.status, _got.kind, _got.request_id, _got.payload
    assert (status, kind, rid) == (Drop.OK, Kind.ERROR, 5)
    code, text = unpack_error(payload)
    assert code == ErrorCode.SHUTTING_DOWN and "MACH_NOTIFY_SEND_ONCE" in text


def test_request_without_reply_right_is_dropped(pair):
    server, _client = pair
    raw_send(pack_header(Kind.REQUEST, 3, 1), b"x")
    assert server.recv(0).status == Drop.BAD_REQUEST_ID


def test_message_with_reply_right_is_dropped_and_right_released(pair):
    server, client = pair
    reply = client._reply_port()
    raw_send(pack_header(Kind.MESSAGE, 0, 1), b"x", reply, mm.MACH_MSG_TYPE_MAKE_SEND_ONCE)
    got = server.recv(0)
    assert got.status == Drop.BAD_REQUEST_ID and got.conn is mach.ONE_WAY
    queue = KERNEL.self_task.space[reply][0].queue
    assert len(queue) == 1 and queue[0].msgh_id == mm.MACH_NOTIFY_SEND_ONCE


def test_malformed_wire_header_answerable(pair):
    server, client = pair
    bad = bytearray(pack_header(Kind.REQUEST, 4, 1))
    bad[2] = 9  # version
    reply = client._reply_port()
    client._waiting[reply] = 4
    raw_send(bytes(bad), b"x", reply, mm.MACH_MSG_TYPE_MAKE_SEND_ONCE)
    _got = server.recv(0)
    status, conn, kind, rid = _got.status, _got.conn, _got.kind, _got.request_id
    assert status == Drop.BAD_VERSION and rid == 4
    conn.send(Kind.ERROR, 4, b"\x03\x00malformed", 1.0)  # what Server._drop does
    assert client.recv(0).kind == Kind.ERROR


def test_kernel_sender_rejected(pair):
    server, _client = pair
    kernel_like = Task()
    kernel_like.pid = kernel_like.pidversion = kernel_like.uid = kernel_like.gid = 0
    with KERNEL.as_task(kernel_like):
        raw_send(pack_header(Kind.MESSAGE, 0, 1), b"x")
    assert server.recv(0).status == Drop.NO_CREDENTIALS


def test_wakeup_and_shutdown(pair):
    server, client = pair
    server.wakeup()
    assert server.recv(0) is None
    client.shutdown()
    assert client.recv(0).status == Drop.CLOSED
    with pytest.raises(errors.PeerGone):
        client.send(Kind.MESSAGE, 0, b"x", 1.0)


def test_errors():
    with pytest.raises(errors.ServiceNotFound, match="BOOTSTRAP_UNKNOWN_SERVICE"):
        mach.client_conn("org.machipc.none", 1.0)
    s = mach.server_transport(NAME)
    with pytest.raises(errors.ServiceInUse):
        mach.server_transport(NAME)
    with pytest.raises(errors.InvalidArgument):
        mach.server_transport("x" * 128)
    with pytest.raises(errors.InvalidArgument):
        mach.server_transport("org.machipc.q", queue_limit=5000)
    s.close()


def test_fork_generation(pair, monkeypatch):
    _server, client = pair
    monkeypatch.setattr(_mach, "_generation", _mach._generation + 1)  # as os.register_at_fork does in a child
    with pytest.raises(errors.IPCError, match="fork"):
        client.send(Kind.MESSAGE, 0, b"x", 1.0)


def test_too_large_inline_message_is_destroyed_and_its_sender_told(pair):
    """Over RECV_INLINE_LIMIT inline: received without MACH_RCV_LARGE, so the kernel
    destroys it (mach_msg_receive_error) and its reply right notifies the client."""
    server, client = pair
    reply = client._reply_port()
    client._waiting[reply] = 7
    with KERNEL.cond:
        task = KERNEL.self_task
        service = KERNEL.look_up(task, NAME)
        bits = mm.MACH_MSGH_BITS(mm.MACH_MSG_TYPE_COPY_SEND, mm.MACH_MSG_TYPE_MAKE_SEND_ONCE)
        kr, _ = KERNEL.msg_send(task, bits, service, reply, mm.MACHIPC_MSGH_ID,
                                pack_header(Kind.REQUEST, 7, 300 * 1024) + bytes(300 * 1024), [], mm.SEND_OPTIONS, 0)
        KERNEL.release(task, service)
    assert kr == mm.MACH_MSG_SUCCESS
    assert server.recv(0).status == Drop.TRUNCATED
    got = client.recv(0)
    assert got.kind == Kind.ERROR and got.request_id == 7
