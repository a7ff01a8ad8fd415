"""The macOS review's findings 5-10, 13, 15, 20 on the fake kernel (one test per rule)."""

import threading

import pytest

import machipc
from machipc import errors, mach
from machipc import machmsg as mm
from machipc.wire import Drop, Flag, Kind, pack_header
from tests.macos_sim.fakekernel import KERNEL, Task
from tests.macos_sim.sim_child import transport_pair

NAME = "org.machipc.sim.findings"


@pytest.fixture
def pair():
    yield from transport_pair(NAME)


def hostile_send(task, name, *, copy, dtype=mm.MACH_MSG_OOL_DESCRIPTOR, msgh_id=mm.MACHIPC_MSGH_ID, count=1,
                 size=1 << 20):
    """A process sending a complex message with ``count`` descriptors of ``dtype``/``copy``."""
    with KERNEL.cond, KERNEL.as_task(task):
        port = KERNEL.look_up(task, name)
        descs = [{"type": dtype, "copy": copy, "data": bytes(size)} for _ in range(count)]
        header = pack_header(Kind.MESSAGE, 0, size)
        bits = mm.MACH_MSGH_BITS(mm.MACH_MSG_TYPE_COPY_SEND, 0) | mm.MACH_MSGH_BITS_COMPLEX
        kr, _ = KERNEL.msg_send(task, bits, port, 0, msgh_id, header, descs, mm.SEND_OPTIONS, 0)
        assert kr == mm.MACH_MSG_SUCCESS


# -- finding 5: OOL regions of refused messages --------------------------------------------

@pytest.mark.parametrize("copy", [mm.MACH_MSG_PHYSICAL_COPY, mm.MACH_MSG_VIRTUAL_COPY])
@pytest.mark.parametrize("how", ["bad_id", "two_descriptors", "volatile", "good"])
def test_mapped_memory_stays_flat_under_hostile_senders(pair, copy, how):
    server, _client = pair
    attacker = Task()
    kw = {"bad_id": {"msgh_id": 0x1234}, "two_descriptors": {"count": 2},
          "volatile": {"dtype": mm.MACH_MSG_OOL_VOLATILE_DESCRIPTOR}, "good": {}}[how]
    for _ in range(50):
        hostile_send(attacker, NAME, copy=copy, **kw)
        got = server.recv(0)
        assert got is not None
        del got
    assert server.recv(0) is None
    assert KERNEL.self_task.mapped() == 0, f"{KERNEL.self_task.mapped()} bytes stay mapped after {how} senders"


@pytest.mark.parametrize("copy", [mm.MACH_MSG_PHYSICAL_COPY, mm.MACH_MSG_VIRTUAL_COPY])
def test_client_unmaps_hostile_replies(copy):
    """The client receives through the same path: a server answering with a refused
    complex message (wrong msgh_id, PHYSICAL_COPY) leaves nothing mapped in it."""
    hostile = Task()
    with KERNEL.as_task(hostile):
        server = mach.server_transport(NAME)
    client = mach.client_conn(NAME, 5.0)
    try:
        for i in range(1, 21):
            client.send(Kind.REQUEST, i, b"x", 1.0)
            with KERNEL.as_task(hostile):
                reply = server.recv(0).conn._take()
            with KERNEL.cond:
                bits = mm.MACH_MSGH_BITS(mm.MACH_MSG_TYPE_MOVE_SEND_ONCE, 0) | mm.MACH_MSGH_BITS_COMPLEX
                descs = [{"type": mm.MACH_MSG_OOL_DESCRIPTOR, "copy": copy, "data": bytes(1 << 20)}]
                kr, _ = KERNEL.msg_send(hostile, bits, reply, 0, 0x1234, pack_header(Kind.REPLY, i, 1 << 20), descs,
                                        mm.SEND_OPTIONS, 0)
            assert kr == mm.MACH_MSG_SUCCESS
            assert client.recv(0).status != Drop.OK
        assert KERNEL.self_task.mapped() == 0
    finally:
        client.close()
        with KERNEL.as_task(hostile):
            server.close()


def test_take_regions_frees_each_region_once():
    buf = bytearray(mm.build_ool(pack_header(Kind.MESSAGE, 0, 9), 0x7000_0000, 9, mm.AuditToken(*range(1, 9)),
                                 dtype=mm.MACH_MSG_OOL_VOLATILE_DESCRIPTOR))
    assert mm.take_regions(buf) == [(0x7000_0000, 9)]
    assert mm.take_regions(buf) == []  # zeroed: mach_msg_destroy and a second call skip it


# -- finding 6: the client checks the server ------------------------------------------------

def test_server_policy_is_enforced_on_replies():
    squatter = machipc.Server(NAME)  # the process that checked the name in first
    t = threading.Thread(target=squatter.serve, args=(lambda m: b"trust me",), daemon=True)
    t.start()
    try:
        with machipc.Client(NAME, timeout=30, server_policy=machipc.policies.Allowlist(uids={12345})) as cli:
            with pytest.raises(errors.NotPermitted, match="not trusted"):
                cli.request(b"secret?")
        with machipc.Client(NAME, timeout=30) as cli:  # default: root or this user
            assert cli.request(b"x") == b"trust me"
    finally:
        squatter.stop()
        t.join(60)
        squatter.close()


# -- finding 7: Server._peers ---------------------------------------------------------------

def test_server_keeps_nothing_per_request():
    srv = machipc.Server(NAME)
    t = threading.Thread(target=srv.serve, args=(lambda m: b"ok",), daemon=True)
    t.start()
    try:
        with machipc.Client(NAME, timeout=30) as cli:
            for _ in range(200):
                assert cli.request(b"x") == b"ok"
                cli.send(b"y")
        assert len(srv._peers) == 0
    finally:
        srv.stop()
        t.join(60)
        srv.close()


# -- finding 8: a failed request send leaks its reply right ------------------------------------

def test_port_names_stay_flat_when_requests_time_out():
    server = mach.server_transport(NAME, queue_limit=1)
    client = mach.client_conn(NAME, 5.0)
    try:
        client.send(Kind.MESSAGE, 0, b"fill", 1.0)
        before = KERNEL.self_task.port_names()
        for i in range(100):
            with pytest.raises(errors.IPCTimeoutError):
                client.send(Kind.REQUEST, i + 1, b"x" * (i % 2 * 40_000), 0)
        assert KERNEL.self_task.port_names() == before
    finally:
        client.close()
        server.close()


def test_masked_send_errors_are_classified():
    server = mach.server_transport(NAME, queue_limit=1)
    client = mach.client_conn(NAME, 5.0)
    try:
        client.send(Kind.MESSAGE, 0, b"fill", 1.0)
        task = KERNEL.self_task
        task.space_limit = len(task.space) + 1  # the reply port fits, its pseudo-received right does not
        with pytest.raises(errors.IPCTimeoutError, match="MACH_SEND_TIMED_OUT"):
            client.send(Kind.REQUEST, 1, b"x", 0)
    finally:
        KERNEL.self_task.space_limit = 1 << 20
        client.close()
        server.close()


# -- finding 9: a second server ---------------------------------------------------------------

def test_second_server_in_another_process_gets_service_in_use():
    srv = mach.server_transport(NAME)
    try:
        with KERNEL.as_task(Task()):
            with pytest.raises(errors.ServiceInUse, match="another process"):
                mach.server_transport(NAME)
        with pytest.raises(errors.ServiceInUse):
            mach.server_transport(NAME)  # the same process twice: BOOTSTRAP_SERVICE_ACTIVE
    finally:
        srv.close()


def test_dead_session_stays_not_permitted(monkeypatch):
    def refuse(name):
        raise mm.bootstrap_error(mm.BOOTSTRAP_NOT_PRIVILEGED, "bootstrap_check_in", name)

    monkeypatch.setattr(mach._mach, "check_in", refuse)
    with pytest.raises(errors.NotPermitted, match="dead login session"):
        mach.server_transport(NAME)


# -- finding 10: launchd MachServices keep the queue --------------------------------------------

def test_machservices_close_hands_the_queue_back_to_launchd():
    name = NAME + ".plist"
    KERNEL.declare_machservice(name, KERNEL.self_task)
    server = mach.server_transport(name)
    client = mach.client_conn(name, 5.0)
    try:
        client.send(Kind.REQUEST, 9, b"queued", 1.0)
        server.close()  # under launchd: the receive right and its queue go back to launchd
        assert client.recv(0) is None  # no MACH_NOTIFY_SEND_ONCE: the request is still queued
        server = mach.server_transport(name)  # the next instance gets it
        _got = server.recv(0)
        status, conn, kind, rid, payload = _got.status, _got.conn, _got.kind, _got.request_id, _got.payload
        assert (status, rid, bytes(payload)) == (Drop.OK, 9, b"queued")
        conn.send(Kind.REPLY, 9, b"answered by the next instance", 1.0)
        assert client.recv(0).request_id == 9
    finally:
        client.close()
        server.close()


def test_checking_in_again_right_after_close_waits_for_launchd(monkeypatch):
    """launchd learns of the closed port from an asynchronous dead-name notification;
    until then the same process's check-in reads BOOTSTRAP_SERVICE_ACTIVE."""
    monkeypatch.setattr(KERNEL, "launchd_lag", 5)
    mach.server_transport(NAME).close()
    monkeypatch.setattr(KERNEL, "launchd_lag", 0)
    mach.server_transport(NAME).close()


def test_dynamic_name_close_fails_queued_requests(pair):
    server, client = pair
    client.send(Kind.REQUEST, 8, b"x", 1.0)
    server.close()
    got = client.recv(0)
    assert got.kind == Kind.ERROR and got.request_id == 8


# -- finding 13: an exception between receive and hand-off ---------------------------------------

def test_exception_after_receive_destroys_the_message(pair, monkeypatch):
    server, client = pair
    client.send(Kind.REQUEST, 4, b"x" * 100_000, 1.0)

    def boom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(mm, "parse", boom)
    with pytest.raises(MemoryError):
        server.recv(0)
    monkeypatch.undo()
    assert KERNEL.self_task.mapped() == 0
    got = client.recv(0)  # the reply right was destroyed: the client is told at once
    assert got.kind == Kind.ERROR and got.request_id == 4


# -- finding 15: Linux-only wire flags --------------------------------------------------------

@pytest.mark.parametrize("flag, length, body", [(Flag.PAYLOAD_FD, 5, b""), (Flag.ARENA, 1000, bytes(24)),
                                                (Flag.BATCH, 7, b"\x03\x00\x00\x00abc")])
def test_linux_only_flags_are_refused(pair, flag, length, body):
    """Laid out as on Linux (a bare header for a memfd payload, an arena reference, a batch
    no Mach server announces): before, Mach took them as an empty payload or as data."""
    server, _client = pair
    service = mach._mach.look_up(NAME)
    mach._mach.send(service, mm.MACH_MSG_TYPE_COPY_SEND, 0, 0, pack_header(Kind.MESSAGE, 0, length, flags=flag),
                    body, 1.0)
    mach._mach.deallocate(service)
    assert server.recv(0).status == Drop.BAD_FLAGS


# -- finding 20: one request answered from two threads ---------------------------------------------

def test_reply_conn_answers_once_from_many_threads(pair):
    server, client = pair
    client.send(Kind.REQUEST, 6, b"x", 1.0)
    conn = server.recv(0).conn
    results = []

    def answer():
        try:
            conn.send(Kind.REPLY, 6, b"y", 1.0)
            results.append("sent")
        except errors.PeerGone:
            results.append("refused")

    threads = [threading.Thread(target=answer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 7 + ["sent"]
