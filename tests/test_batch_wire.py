"""BATCH packets (docs/protocol.md §5.4): several one-way messages in one packet.

The decoder in both twins, a hand-written client against a server process,
what the server does with a batch (one decision, each item a Message, counts),
and the sender's side: batches only to a server whose HELLO announces them.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import machipc
from machipc import _backend, wire
from machipc.policies import Decision
from machipc.wire import HEADER_SIZE, Drop, Flag, Kind

from conftest import raw_connect, wait_for

IMPLS = ["py"] + (["c"] if _backend._compiled is not None else [])
DECODERS = {impl: _backend.transport(impl).split_batch if impl == "c" else wire.split_batch for impl in IMPLS}


def encode(items) -> bytes:
    """A BATCH body written from the spec, independently of wire.pack_batch."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def batch_packet(body: bytes, kind: int = Kind.MESSAGE, rid: int = 0, flags: int = Flag.BATCH) -> bytes:
    return wire.HEADER.pack(wire.MAGIC, wire.VERSION, kind, flags, rid, len(body)) + body


# -- the decoder, both twins ----------------------------------------------------

items_st = st.lists(st.binary(max_size=40), max_size=8)


@settings(max_examples=300, deadline=None)
@given(items=items_st)
def test_a_whole_body_decodes_to_its_items(items):
    for impl, split in DECODERS.items():
        assert split(encode(items)) == (items or None), impl  # an empty body is no batch
    if items:
        assert wire.pack_batch(items) == encode(items)


@settings(max_examples=300, deadline=None)
@given(items=st.lists(st.binary(max_size=40), min_size=1, max_size=8), data=st.data())
def test_a_body_cut_anywhere_but_an_item_boundary_is_malformed(items, data):
    body = encode(items)
    cut = data.draw(st.integers(0, len(body) - 1))
    ends = [sum(4 + len(i) for i in items[:k]) for k in range(1, len(items) + 1)]
    expected = items[: ends.index(cut) + 1] if cut in ends else None
    for impl, split in DECODERS.items():
        assert split(body[:cut]) == expected, impl


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.binary(max_size=40), min_size=1, max_size=8), extra=st.integers(1, 2**32 - 1), tail=st.binary(min_size=1, max_size=3))
def test_trailing_bytes_and_a_last_item_past_the_end_are_malformed(items, extra, tail):
    body = encode(items)
    last = len(body) - 4 - len(items[-1])
    overflow = body[:last] + struct.pack("<I", min(len(items[-1]) + extra, 2**32 - 1)) + items[-1]
    for impl, split in DECODERS.items():
        assert split(body + tail) is None, impl  # a length prefix cut short
        assert split(overflow) is None, impl  # the last item's size runs past the end


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=64))
def test_both_decoders_agree_on_any_bytes(body):
    results = {impl: split(body) for impl, split in DECODERS.items()}
    assert len({repr(r) for r in results.values()}) == 1, results
    got = results["py"]
    assert wire.batch_count(body) == (0 if got is None else len(got))
    if got is not None:
        assert encode(got) == body  # what decodes is exactly a whole sequence of items


def test_the_largest_batch_fits_one_packet():
    body = encode([b""] * (wire.INLINE_MAX // 4))  # 16,384 empty items: 65,536 bytes
    for impl, split in DECODERS.items():
        assert split(body) == [b""] * 16384, impl


@settings(max_examples=100, deadline=None)
@given(items=items_st, cut=st.integers(0, 3))
def test_both_transports_hand_up_a_batch_or_drop_it_whole(items, cut):
    body = encode(items)
    body = body[: len(body) - cut] if cut < len(body) else body
    expected = wire.split_batch(body)
    for impl in IMPLS:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        conn = _backend.transport(impl).Conn(b, True, False)
        a.send(batch_packet(body))
        got = conn.recv(5.0)
        a.close()
        if expected is None:
            assert (got.status, got.payload) == (Drop.BAD_BATCH, b""), impl
        else:
            assert got.status == Drop.OK and got.flags == Flag.BATCH, impl
            assert len(got.payload) == len(expected) and got.payload.items() == expected, impl
            assert got.pid == os.getpid()  # one set of credentials for the packet
        conn.close()


# -- a hand-written client against a server process -----------------------------

SERVER = """
import json, sys, machipc
sockdir, impl = sys.argv[1:3]
srv = machipc.Server("org.test.batch", directory=sockdir, impl=impl)
got = []

def handle(msg):
    if msg.expects_reply:
        return json.dumps({"got": [bytes(m).hex() for m in got], "dropped": dict(srv.stats.dropped),
                           "received": srv.stats.received, "pid": [msg.sender.pid]}).encode()
    got.append(msg.data)

print("ready", flush=True)
srv.serve(handle)
"""


@pytest.mark.parametrize("impl", IMPLS)
def test_malformed_batches_are_dropped_whole_by_a_server_process(impl, sockdir):
    proc = subprocess.Popen([sys.executable, "-c", SERVER, sockdir, impl], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        path = os.path.join(sockdir, "org.test.batch")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        s.settimeout(20)
        hello = s.recv(wire.PACKET_MAX)
        assert wire.HEADER.unpack_from(hello)[2] == Kind.HELLO
        assert wire.unpack_hello(hello[HEADER_SIZE:]).features & wire.FEATURE_BATCH
        malformed = [
            b"",  # no item
            encode([b"abc"])[:-1],  # the item runs past the end
            encode([b"abc"]) + b"\x00\x00",  # a length prefix cut short (trailing bytes)
            encode([b"ok"]) + struct.pack("<I", 2**32 - 1) + b"x",  # a size that overflows the body
        ]
        for body in malformed:
            s.send(batch_packet(body))
        s.send(batch_packet(encode([b"one", b"", b"three"])))
        s.send(wire.pack_header(Kind.MESSAGE, 0, 4) + b"four")
        s.send(wire.pack_header(Kind.REQUEST, 1, 6) + b"report")
        packet = s.recv(wire.PACKET_MAX)
        assert wire.HEADER.unpack_from(packet)[2:5] == (Kind.REPLY, 0, 1)
        report = json.loads(packet[HEADER_SIZE:])
        # Nothing of a malformed batch was handed on, not even the whole items before the fault.
        assert report["got"] == [b"one".hex(), b"".hex(), b"three".hex(), b"four".hex()]
        assert report["dropped"] == {"BAD_BATCH": 4} and report["received"] == 5
        s.close()
    finally:
        proc.terminate()
        assert proc.wait(20) == 0  # SIGTERM: a graceful stop, so it never crashed


# -- the server: one decision per packet, each item a Message --------------------


def _connected(srv, cli) -> None:
    """Let the server accept ``cli`` and the client read its HELLO (a request does both)."""
    assert cli.request(b"hello?", timeout=10) is not None
    assert cli.server_limits.features & wire.FEATURE_BATCH


@pytest.mark.parametrize("serve_kw", [None, {"workers": 2, "ordered": True}], ids=["serve", "ordered-workers"])
def test_send_many_items_come_out_one_message_each_in_order(impl, sockdir, serve, client, serve_kw):
    got = []
    srv = serve(lambda m: (got.append((bytes(m.data), m.sender.pid, m.expects_reply)) if not m.expects_reply else b"ok"),
                serve_kw=serve_kw)
    cli = client()
    _connected(srv, cli)
    items = [b"%d" % i for i in range(500)] + [b"y" * wire.INLINE_MAX] + [b"z" * 1000] * 100
    assert cli.send_many(items) == len(items)
    assert wait_for(lambda: len(got) == len(items), 30)
    assert got == [(item, os.getpid(), False) for item in items]
    assert srv.stats.received == len(items) + 1 and srv.stats.dropped_total == 0


def test_receive_hands_out_a_batch_one_message_at_a_time(impl, sockdir, client):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        cli = client()
        with pytest.raises(TimeoutError):
            srv.receive(timeout=0.2)  # accepts the client: its HELLO goes out
        assert cli.send_many([b"%d" % i for i in range(10)]) == 10  # reads the HELLO first
        assert cli.server_limits.features & wire.FEATURE_BATCH
        first = srv.receive(timeout=10)
        assert first.data == b"0" and not first.expects_reply
        assert [m.data for m in srv.receive_many(3, timeout=10)] == [b"1", b"2", b"3"]
        assert [srv.receive(timeout=10).data for _ in range(6)] == [b"%d" % i for i in range(4, 10)]
        with pytest.raises(TimeoutError):
            srv.receive(timeout=0.05)
        assert cli.send_many([b"a", b"b", b"c"]) == 3 and cli.send_many([b"d", b"e"]) == 2  # two packets
        assert [m.data for m in srv.receive_many(2, timeout=10)] == [b"a", b"b"]
        assert [m.data for m in srv.receive_many(3, timeout=10)] == [b"c", b"d", b"e"]  # never more than asked
        assert srv.stats.received == 15


def test_a_rejected_batch_counts_each_item_and_one_packet_toward_max_rejections(impl, serve):
    srv = serve(policy=lambda peer: Decision.deny("test"), max_rejections=3)
    s = raw_connect(srv.path)
    s.send(batch_packet(encode([b"a"] * 5)))
    s.send(batch_packet(encode([b"b"] * 7)))
    assert wait_for(lambda: srv.stats.rejected == 12)
    assert srv.stats.disconnected["rejected"] == 0  # two packets, not twelve
    s.send(batch_packet(encode([b"c"] * 2)))
    assert s.recv(wire.PACKET_MAX) == b""  # the third packet: hung up on
    assert srv.stats.rejected == 14 and srv.stats.disconnected["rejected"] == 1 and srv.stats.received == 0


def test_max_size_applies_to_each_item(impl, serve):
    got = []
    srv = serve(lambda m: got.append(bytes(m.data)), max_size=10)
    s = raw_connect(srv.path)
    s.send(batch_packet(encode([b"short", b"x" * 11, b"", b"y" * 10])))
    assert wait_for(lambda: srv.stats.too_large == 1 and len(got) == 3)
    assert got == [b"short", b"", b"y" * 10] and srv.stats.received == 3


# -- the sender: batches only to a server that announces them ---------------------


class FakeServer:
    """A listening socket speaking the protocol by hand: sends ``hello``, answers one
    request, then records every packet's (flags, body)."""

    def __init__(self, sockdir: str, hello: bytes) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(os.path.join(sockdir, "org.test.fake"))
        self.listener.listen(1)
        self.hello = hello
        self.packets: list[tuple[int, bytes]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        conn.send(wire.pack_header(Kind.HELLO, 0, len(self.hello)) + self.hello)
        request = conn.recv(wire.PACKET_MAX)
        conn.send(wire.pack_header(Kind.REPLY, wire.HEADER.unpack_from(request)[4], 0))
        conn.settimeout(20)
        while True:
            packet = conn.recv(wire.PACKET_MAX)
            if not packet:
                return
            self.packets.append((wire.HEADER.unpack_from(packet)[3], packet[HEADER_SIZE:]))


@pytest.mark.parametrize("features", [True, False], ids=["announced", "older-server"])
def test_a_client_batches_only_for_a_server_that_announces_it(impl, sockdir, features):
    hello = wire.pack_hello(64 * 2**20, 2**27, 4)
    fake = FakeServer(sockdir, hello if features else hello[: wire.HELLO.size])
    cli = machipc.Client("org.test.fake", directory=sockdir, impl=impl)
    assert cli.request(b"limits?", timeout=10) == b""  # the HELLO is read before this reply
    small = [b"%03d" % i for i in range(3)]
    big = [bytes([i]) * 1000 for i in range(100)]  # 100 x (4 + 1000) bytes: more than one packet holds
    assert cli.send_many(small + [bytearray(b"own packet")] + big) == 104
    cli.close()
    fake.thread.join(20)
    if features:
        assert fake.packets[0] == (Flag.BATCH, encode(small))
        assert fake.packets[1] == (0, b"own packet")  # not bytes: sent as send() sends it
        assert [flags for flags, _ in fake.packets[2:]] == [Flag.BATCH, Flag.BATCH]
        assert [len(wire.split_batch(body)) for _, body in fake.packets[2:]] == [65, 35]  # 65 x 1004 <= 65,536
        assert sum((wire.split_batch(body) for _, body in fake.packets[2:]), []) == big
    else:
        assert fake.packets == [(0, item) for item in small + [b"own packet"] + big]
