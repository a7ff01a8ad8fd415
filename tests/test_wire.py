"""Header packing and validation, and agreement between wire.py and the Cython constants."""

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from machipc import _backend, wire
from machipc.wire import HEADER_SIZE, Drop, ErrorCode, Kind, check_header, pack_header


def packet(kind=Kind.REQUEST, rid=7, payload=b"abc", **override):
    fields = dict(magic=wire.MAGIC, version=wire.VERSION, kind=kind, flags=0, rid=rid, length=len(payload))
    fields.update(override)
    return wire.HEADER.pack(*fields.values()) + payload


def test_header_is_24_bytes_little_endian():
    h = pack_header(Kind.REQUEST, 0x0102030405060708, 5)
    assert len(h) == HEADER_SIZE == 24
    assert h[:2] == b"mi" and h[2] == 2 and h[3] == 2
    assert h[8:16] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert h[16:24] == (5).to_bytes(8, "little")


@pytest.mark.parametrize(
    "data, expected",
    [
        (packet(), Drop.OK),
        (packet(kind=Kind.MESSAGE, rid=0), Drop.OK),
        (b"mi\x01", Drop.SHORT),
        (packet(magic=0x1234), Drop.BAD_MAGIC),
        (packet(version=1), Drop.BAD_VERSION),
        (packet(version=3), Drop.BAD_VERSION),
        (packet(kind=Kind.ERROR, version=1), Drop.BAD_VERSION),  # a server reads no ERROR of any version
        (packet(kind=Kind.REPLY), Drop.BAD_KIND),
        (packet(kind=9), Drop.BAD_KIND),
        (packet(flags=8), Drop.BAD_FLAGS),
        (packet(kind=Kind.MESSAGE, rid=0, flags=4), Drop.OK),  # BATCH: the body is checked later (split_batch)
        (packet(flags=4), Drop.BAD_FLAGS),  # ... on a MESSAGE only
        (packet(kind=Kind.MESSAGE, rid=0, flags=5), Drop.BAD_FLAGS),  # ... and with no other flag
        (packet(kind=Kind.MESSAGE, rid=0, flags=6), Drop.BAD_FLAGS),
        (packet(flags=2), Drop.BAD_LENGTH),  # ARENA: the body must be the 24-byte reference
        (packet(flags=1), Drop.BAD_LENGTH),  # PAYLOAD_FD: the packet must be the header alone
        (packet(flags=1, payload=b"", length=10), Drop.OK),
        (packet(flags=1, payload=b"", length=0), Drop.BAD_LENGTH),
        (packet(length=4), Drop.BAD_LENGTH),
        (packet(length=2**64 - 1), Drop.BAD_LENGTH),
        (packet(kind=Kind.MESSAGE, rid=3), Drop.BAD_REQUEST_ID),
        (packet(kind=Kind.REQUEST, rid=0), Drop.BAD_REQUEST_ID),
    ],
)
def test_check_header(data, expected):
    assert check_header(data, wire.SERVER_ACCEPTS)[0] == expected


def test_error_payload_round_trip():
    assert wire.unpack_error(wire.pack_error(ErrorCode.REJECTED, "no")) == (ErrorCode.REJECTED, "no")
    assert wire.unpack_error(b"\x01")[0] == ErrorCode.MALFORMED


@pytest.mark.skipif(_backend._compiled is None, reason="Cython extension not built")
def test_cython_constants_match_wire():
    c = _backend._compiled.CONSTANTS
    assert c["MAGIC"] == wire.MAGIC and c["VERSION"] == wire.VERSION
    assert c["VERSION_ERROR_VERSION"] == wire.VERSION_ERROR_VERSION
    assert c["HEADER_SIZE"] == wire.HEADER_SIZE and c["INLINE_MAX"] == wire.INLINE_MAX
    assert c["KNOWN_FLAGS"] == wire.KNOWN_FLAGS
    for kind in Kind:
        assert c[kind.name] == kind
    for drop in Drop:
        if drop != Drop.OK:
            assert c[drop.name] == drop, drop


def _classify(impl: str, data: bytes, server_side: bool = True):
    """Send ``data`` over a real socketpair into a server-side (or client-side) Conn of ``impl``."""
    mod = _backend.transport(impl)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    conn = mod.Conn(b, server_side, False)
    a.send(data)
    got = conn.recv(1.0)
    a.close()
    if got is None:
        return None, conn.peer_limits, b""
    fields = (got.kind, got.flags, got.request_id)
    if got.status == Drop.OK and got.flags & wire.Flag.BATCH:  # a Batch: its items, packed again
        return got.status, fields, wire.pack_batch(got.payload.items())
    return got.status, fields, bytes(got.payload)


@pytest.mark.parametrize(
    "data, expected",
    [
        (packet(kind=Kind.REPLY), Drop.OK),
        (packet(kind=Kind.REPLY, version=1), Drop.BAD_VERSION),
        (packet(kind=Kind.ERROR, payload=b"\x03\x00no", version=1), Drop.OK),  # the ERROR layout never changes
        (packet(kind=Kind.ERROR, payload=b"\x03\x00no", version=7), Drop.OK),
        (packet(kind=Kind.HELLO, rid=5, payload=wire.pack_hello(1, 2, 3)), Drop.BAD_REQUEST_ID),
        (packet(kind=Kind.MESSAGE, rid=0), Drop.BAD_KIND),
        (packet(kind=Kind.REQUEST), Drop.BAD_KIND),
    ],
)
def test_client_side_header_rules_in_both_transports(data, expected):
    assert check_header(data, wire.CLIENT_ACCEPTS)[0] == expected
    for impl in ["py"] + (["c"] if _backend._compiled is not None else []):
        assert _classify(impl, data, server_side=False)[0] == expected, impl


@pytest.mark.parametrize("impl", ["py"] + (["c"] if _backend._compiled is not None else []))
def test_a_client_keeps_the_hello_and_hands_on_what_follows(impl):
    mod = _backend.transport(impl)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = mod.Conn(b, False, False)
    a.send(packet(kind=Kind.HELLO, rid=0, payload=wire.pack_hello(1000, 2000, 3) + b"later fields"))
    a.send(packet(kind=Kind.REPLY, rid=9, payload=b"r"))
    got = conn.recv(5.0)
    assert got.status == Drop.OK and (got.kind, got.flags, got.request_id) == (Kind.REPLY, 0, 9) and bytes(got.payload) == b"r"
    assert conn.peer_limits == (1000, 2000, 3, wire.INLINE_MAX, wire.FEATURE_BATCH)
    assert conn.batch_room == wire.INLINE_MAX
    a.send(packet(kind=Kind.HELLO, rid=0, payload=wire.HELLO.pack(1000, 2000, 3, 4096)))  # no features field
    assert conn.recv_nowait() is None
    assert conn.peer_limits == (1000, 2000, 3, 4096, 0) and conn.batch_room == 0  # an older server: no batches
    a.send(packet(kind=Kind.HELLO, rid=0, payload=b"short"))
    assert conn.recv_nowait() is None  # a HELLO is never handed on
    assert conn.peer_limits is None and conn.batch_room == 0  # ... and a short one announces nothing
    a.close()
    conn.close()


@settings(max_examples=150, deadline=None)
@given(
    kind=st.integers(0, 255),
    rid=st.sampled_from([0, 1, 2**64 - 1]),
    flags=st.sampled_from([0, 1, 2, 3, 4, 5, 8, 2**31]),
    payload=st.sampled_from([b""]) | st.binary(max_size=64),
    delta=st.sampled_from([0, 0, 0, 1, -1, 2**40]),
    version=st.sampled_from([2, 2, 0, 1, 3]),
    cut=st.integers(0, 30),
)
def test_both_transports_classify_packets_alike(kind, rid, flags, payload, delta, version, cut):
    length = max(0, len(payload) + delta)
    data = wire.HEADER.pack(wire.MAGIC, version, kind, flags, rid, length) + payload
    if cut < HEADER_SIZE and cut % 3 == 0:
        data = data[:cut]
    expected_status, header = check_header(data, wire.SERVER_ACCEPTS)
    if expected_status == Drop.OK and flags & wire.Flag.PAYLOAD_FD:
        expected_status = Drop.BAD_PAYLOAD_FD  # no fd came with it
    elif expected_status == Drop.OK and flags & wire.Flag.ARENA:
        expected_status = Drop.BAD_ARENA  # no such arena on this connection
    elif expected_status == Drop.OK and flags & wire.Flag.BATCH and wire.split_batch(payload) is None:
        expected_status = Drop.BAD_BATCH
    for impl in ["py"] + (["c"] if _backend._compiled is not None else []):
        status, fields, body = _classify(impl, data)
        assert status == expected_status, impl
        if status == Drop.OK:
            assert fields == (kind, flags, rid) and body == payload
