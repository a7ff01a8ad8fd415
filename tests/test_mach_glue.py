"""machipc/mach.py (the Mach transport glue) on any platform, over a simulated kernel.

``FakeMach`` stands in for the ``machipc._mach`` extension: it queues messages
per port, hands out send-once rights and notifications the way the kernel
does, lays received messages out with ``machmsg.build_*`` and validates them
with ``machmsg.parse`` exactly as ``_mach.pyx`` does. The real extension is
exercised by tests/test_mach_e2e.py on macOS.
"""

import itertools
import os
from collections import deque

import pytest

from machipc import errors, mach
from machipc import machmsg as mm
from machipc.wire import Drop, ErrorCode, Kind, pack_header, unpack_error


class FakeRegion(bytes):
    def release(self):
        pass


class FakeMach:
    WOKEN, TOO_LARGE, OOL_THRESHOLD = -2, -1, 32 * 1024

    def __init__(self, pid=4321, uid=501):
        self.gen = 0
        self.names = itertools.count(0x1103, 4)
        self.queues: dict[int, deque] = {}
        self.sets: dict[int, list[int]] = {}
        self.send_once: dict[int, int] = {}  # send-once right name -> receiving port
        self.services: dict[str, int] = {}
        self.audit = mm.AuditToken(uid, uid, 20, uid, 20, pid, 1, 99)
        self.regions: dict[int, bytes] = {}

    # ports
    def generation(self):
        return self.gen

    def check_in(self, name):
        mm.check_service_name(name)
        if name in self.services:
            raise mm.bootstrap_error(mm.BOOTSTRAP_SERVICE_ACTIVE, "bootstrap_check_in", name)
        self.services[name] = port = self.allocate_receive()
        return port

    def look_up(self, name):
        if name not in self.services:
            raise mm.bootstrap_error(mm.BOOTSTRAP_UNKNOWN_SERVICE, "bootstrap_look_up", name)
        return self.services[name]

    def set_queue_limit(self, port, limit):
        pass

    def allocate_receive(self):
        port = next(self.names)
        self.queues[port] = deque()
        return port

    def allocate_port_set(self):
        pset = next(self.names)
        self.sets[pset] = []
        return pset

    def move_member(self, port, pset):
        self.sets[pset].append(port)

    def make_send(self, port):
        pass

    def destroy_receive(self, port):
        for msg in self.queues.pop(port, ()):
            if msg[0] == "msg" and msg[3]:
                self.deallocate(msg[3])  # queued reply rights die with the queue
        self.services = {k: v for k, v in self.services.items() if v != port}
        for members in self.sets.values():
            if port in members:
                members.remove(port)

    def destroy_port_set(self, pset):
        self.sets.pop(pset, None)

    def deallocate(self, name):
        target = self.send_once.pop(name, None)
        if target is not None and target in self.queues:
            self.queues[target].append(("notify",))

    # messages
    def send(self, dest, disp, reply, reply_disp, header, payload, timeout, ool_threshold=None, gen=0):
        if gen != self.gen:
            raise errors.IPCError("created before fork()")
        target = self.send_once.pop(dest, None) if disp == mm.MACH_MSG_TYPE_MOVE_SEND_ONCE else dest
        if target not in self.queues:
            raise mm.kern_error(mm.MACH_SEND_INVALID_DEST, "send")
        so = 0
        if reply:
            so = next(self.names)
            self.send_once[so] = reply
        threshold = self.OOL_THRESHOLD if ool_threshold is None else ool_threshold
        self.queues[target].append(("msg", bytes(header), bytes(payload), so, len(payload) > threshold))

    def send_wake(self, port):
        self.queues[port].append(("wake",))

    def Receiver(self, wake_port=0):
        fake = self

        class Receiver:
            def recv(self, port, timeout, allow_notification=False):
                for member in fake.sets.get(port, [port]):
                    if fake.queues.get(member):
                        return fake._deliver(member, fake.queues[member].popleft(), wake_port, allow_notification)
                return None

        return Receiver()

    def _deliver(self, port, msg, wake_port, allow_notification):
        if msg[0] == "wake" or port == wake_port:
            return (self.WOKEN, None, b"", None, 0)
        if msg[0] == "notify":
            buf = mm.build_send_once_notification(local_port=port)
        else:
            _, header, payload, so, ool = msg
            if ool:
                address = 0x7000_0000 + len(self.regions) * 0x10000
                self.regions[address] = payload
                buf = mm.build_ool(header, address, len(payload), self.audit, reply_port=so, local_port=port)
            else:
                buf = mm.build_simple(header + payload, self.audit, reply_port=so, local_port=port)
        reason, parsed = mm.parse(buf, allow_notification=allow_notification)
        if reason != mm.Reject.OK:
            if parsed is not None and parsed.remote_port:
                self.deallocate(parsed.remote_port)  # mach_msg_destroy
            return (reason, parsed, b"", None, 0)
        inline = bytes(parsed.inline(buf))
        region = FakeRegion(self.regions.pop(parsed.ool_address)) if parsed.ool_address else None
        return (reason, parsed, inline, region, parsed.remote_port)


@pytest.fixture
def fake(monkeypatch):
    f = FakeMach()
    monkeypatch.setattr(mach, "_mach", f)
    return f


@pytest.fixture
def pair(fake):
    server = mach.server_transport("org.machipc.glue")
    client = mach.client_conn("org.machipc.glue", 5.0)
    yield server, client
    client.close()
    server.close()


def test_one_way_message(pair, fake):
    server, client = pair
    client.send(Kind.MESSAGE, 0, b"hello", 1.0)
    status, conn, kind, flags, rid, payload, pid, uid, gid, peer = server.recv(0)
    assert (status, kind, rid, bytes(payload)) == (Drop.OK, Kind.MESSAGE, 0, b"hello")
    assert (pid, uid, gid) == (4321, 501, 20)
    assert peer.pid == 4321 and peer.uid == 501 and peer.guard == 99 and peer.guard_kind == "pidversion"
    with pytest.raises(errors.InvalidArgument):
        conn.send(Kind.REPLY, 1, b"", 1.0)
    assert server.recv(0) is None


@pytest.mark.parametrize("size", [0, 5, 32 * 1024, 32 * 1024 + 1, 200_000])
def test_request_reply(pair, size):
    server, client = pair
    data = os.urandom(size)
    client.send(Kind.REQUEST, 11, data, 1.0)
    status, conn, kind, _f, rid, payload, *_ = server.recv(0)
    assert (status, kind, rid) == (Drop.OK, Kind.REQUEST, 11) and bytes(payload) == data
    assert isinstance(payload, memoryview) == (size > 32 * 1024)
    conn.send(Kind.REPLY, 11, data[::-1], 1.0)
    with pytest.raises(errors.PeerGone):
        conn.send(Kind.REPLY, 11, b"twice", 1.0)
    status, _c, kind, _f, rid, payload, *_ = client.recv(0)
    assert (status, kind, rid) == (Drop.OK, Kind.REPLY, 11) and bytes(payload) == data[::-1]


def test_reply_ports_are_reused(pair, fake):
    server, client = pair
    for i in range(1, 4):
        client.send(Kind.REQUEST, i, b"x", 1.0)
        server.recv(0)[1].send(Kind.REPLY, i, b"y", 1.0)
        assert client.recv(0)[4] == i
    assert len(client._free) == 1 and not client._waiting


def test_dropped_reply_right_becomes_an_error(pair):
    server, client = pair
    client.send(Kind.REQUEST, 5, b"x", 1.0)
    server.recv(0)[1].close()
    status, _c, kind, _f, rid, payload, *_ = client.recv(0)
    assert (status, kind, rid) == (Drop.OK, Kind.ERROR, 5)
    code, text = unpack_error(payload)
    assert code == ErrorCode.SHUTTING_DOWN and "MACH_NOTIFY_SEND_ONCE" in text


def test_server_close_fails_queued_requests(fake):
    server = mach.server_transport("org.machipc.glue")
    client = mach.client_conn("org.machipc.glue", 5.0)
    client.send(Kind.REQUEST, 8, b"x", 1.0)
    server.close()
    got = client.recv(0)
    assert got[2] == Kind.ERROR and got[4] == 8
    with pytest.raises(errors.PeerGone, match="MACH_SEND_INVALID_DEST"):
        client.send(Kind.MESSAGE, 0, b"x", 1.0)
    client.close()


def test_request_without_reply_right_is_dropped(pair, fake):
    server, _client = pair
    port = fake.services["org.machipc.glue"]
    fake.send(port, mm.MACH_MSG_TYPE_COPY_SEND, 0, 0, pack_header(Kind.REQUEST, 3, 1), b"x", 1.0)
    assert server.recv(0)[0] == Drop.BAD_REQUEST_ID


def test_message_with_reply_right_is_dropped_and_right_released(pair, fake):
    server, client = pair
    reply = client._reply_port()
    fake.send(fake.services["org.machipc.glue"], mm.MACH_MSG_TYPE_COPY_SEND, reply, 21,
              pack_header(Kind.MESSAGE, 0, 1), b"x", 1.0)
    got = server.recv(0)
    assert got[0] == Drop.BAD_REQUEST_ID and got[1] is mach.ONE_WAY
    assert fake.queues[reply] and fake.queues[reply][0] == ("notify",)


def test_malformed_wire_header_answerable(pair, fake):
    server, client = pair
    bad = bytearray(pack_header(Kind.REQUEST, 4, 1))
    bad[2] = 9  # version
    port = fake.services["org.machipc.glue"]
    reply = client._reply_port()
    client._waiting[reply] = 4
    fake.send(port, mm.MACH_MSG_TYPE_COPY_SEND, reply, 21, bytes(bad), b"x", 1.0)
    status, conn, kind, _f, rid, *_ = server.recv(0)
    assert status == Drop.BAD_VERSION and rid == 4
    conn.send(Kind.ERROR, 4, b"\x03\x00malformed", 1.0)  # what Server._drop does
    assert client.recv(0)[2] == Kind.ERROR


def test_kernel_sender_rejected(pair, fake):
    server, client = pair
    fake.audit = mm.AuditToken(0, 0, 0, 0, 0, 0, 0, 0)
    client.send(Kind.MESSAGE, 0, b"x", 1.0)
    assert server.recv(0)[0] == Drop.NO_CREDENTIALS


def test_wakeup_and_shutdown(pair):
    server, client = pair
    server.wakeup()
    assert server.recv(0) is None
    client.shutdown()
    assert client.recv(0)[0] == Drop.CLOSED
    with pytest.raises(errors.PeerGone):
        client.send(Kind.MESSAGE, 0, b"x", 1.0)


def test_errors(fake):
    with pytest.raises(errors.ServiceNotFound, match="BOOTSTRAP_UNKNOWN_SERVICE"):
        mach.client_conn("org.machipc.none", 1.0)
    s = mach.server_transport("org.machipc.glue")
    with pytest.raises(errors.ServiceInUse):
        mach.server_transport("org.machipc.glue")
    with pytest.raises(errors.InvalidArgument):
        mach.server_transport("x" * 128)
    with pytest.raises(errors.InvalidArgument):
        mach.server_transport("org.machipc.q", queue_limit=5000)
    s.close()


def test_fork_generation(pair, fake):
    _server, client = pair
    fake.gen += 1  # as os.register_at_fork does in a child
    with pytest.raises(errors.IPCError, match="fork"):
        client.send(Kind.MESSAGE, 0, b"x", 1.0)
    fake.gen -= 1


def test_not_built_here():
    if mach._mach is None:
        with pytest.raises(ImportError, match="macOS"):
            mach.server_transport("org.machipc.x")
