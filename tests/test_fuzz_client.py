"""Property tests (issue 8): the client's reply path and ``wire.unpack_error``.

A fake server answers each real ``Client.request`` with an arbitrary packet
(optionally carrying the right request id) followed by a well-formed sentinel
reply. The client must give exactly what the protocol says: the payload of a
valid REPLY, the mapped exception of a valid ERROR, ProtocolError for a
malformed answer addressed to it, and otherwise ignore the packet.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import struct
import tempfile
import threading
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import machipc
from machipc import client as client_mod
from machipc import wire
from machipc.wire import Kind

SENTINEL = b"sentinel"


@contextmanager
def fake_server(impl):
    d = tempfile.mkdtemp(prefix="mi-")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lst.bind(os.path.join(d, "org.test.fake"))
    lst.listen()
    packets: queue.Queue = queue.Queue()
    cli = machipc.Client("org.test.fake", directory=d, impl=impl, timeout=10)
    conn, _ = lst.accept()
    conn.settimeout(10)

    def run():
        while True:
            try:
                req = conn.recv(wire.PACKET_MAX)
            except OSError:
                return
            if not req:
                return
            rid = wire.HEADER.unpack_from(req)[4]
            pkt, addressed = packets.get()
            if addressed and len(pkt) >= 16:
                pkt = pkt[:8] + struct.pack("<Q", rid) + pkt[16:]
            conn.send(pkt)
            conn.send(wire.pack_header(Kind.REPLY, rid, len(SENTINEL)) + SENTINEL)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield cli, packets
    finally:
        cli.close()
        conn.close()
        lst.close()
        t.join(5)
        shutil.rmtree(d, ignore_errors=True)


def expected(pkt: bytes, rid: int):
    """What the protocol says the request returns (bytes) or raises (class)."""
    status, header = wire.check_header(pkt, wire.CLIENT_ACCEPTS)
    got_rid = header.request_id if header is not None else 0
    if got_rid != rid:
        return SENTINEL
    if status != wire.Drop.OK or header.flags:  # a flagged answer with no fd attached is never valid
        return machipc.ProtocolError
    if header.kind == Kind.REPLY:
        return pkt[wire.HEADER_SIZE :]
    code, _ = wire.unpack_error(pkt[wire.HEADER_SIZE :])
    return client_mod._ERRORS.get(code, machipc.RemoteError)


def headers():
    return st.builds(
        wire.HEADER.pack,
        st.sampled_from([wire.MAGIC, wire.MAGIC, wire.MAGIC, 0, 0x6D69, 0xFFFF]),
        st.sampled_from([1, 1, 1, 0, 2, 255]),
        st.sampled_from([0, 1, 2, 3, 4, 5, 255]),
        st.sampled_from([0, 0, 0, 1, 2**31]),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
    )


@st.composite
def answers(draw):
    kind = draw(st.sampled_from(["raw", "header", "valid"]))
    if kind == "raw":
        return draw(st.binary(min_size=1, max_size=80))  # empty: EOF on SEQPACKET, not a packet
    payload = draw(st.binary(max_size=64))
    if kind == "valid":
        k = draw(st.sampled_from([Kind.REPLY, Kind.ERROR]))
        if k == Kind.ERROR and draw(st.booleans()):
            payload = wire.pack_error(draw(st.integers(0, 65535)), draw(st.text(max_size=20)))
        return wire.pack_header(k, 1, len(payload)) + payload
    return draw(headers()) + payload


@pytest.mark.parametrize("impl", ["py", "c"] if machipc._backend._compiled is not None else ["py"])
def test_client_reply_path(impl):
    with fake_server(impl) as (cli, packets):

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(pkt=answers(), addressed=st.booleans())
        def check(pkt, addressed):
            rid = next(cli._ids)  # peek: the request takes the next id
            cli._ids = iter(range(rid, 2**62))  # put it back
            if addressed and len(pkt) >= 16:
                pkt = pkt[:8] + struct.pack("<Q", rid) + pkt[16:]
            want = expected(pkt, rid)
            packets.put((pkt, False))
            if isinstance(want, bytes):
                assert cli.request(b"q", timeout=10) == want
            else:
                with pytest.raises(want):
                    cli.request(b"q", timeout=10)
            assert cli._dead is None  # a bad answer never kills the connection

        check()


@given(st.binary(max_size=300))
def test_unpack_error_never_raises(payload):
    code, text = wire.unpack_error(payload)
    assert isinstance(code, int) and 0 <= code <= 65535 and isinstance(text, str)
    if len(payload) < 2:
        assert code == wire.ErrorCode.MALFORMED


@given(st.integers(0, 65535), st.text())
def test_error_round_trip(code, text):
    payload = wire.pack_error(code, text)
    assert len(payload) <= wire.INLINE_MAX
    got_code, got_text = wire.unpack_error(payload)
    assert got_code == code
    assert got_text == text.encode("utf-8", "replace").decode("utf-8", "replace")


@given(st.integers(0, 65535), st.text(min_size=1, max_size=8, alphabet="é€😀a"), st.integers(0, 3))
@settings(max_examples=30, deadline=None)
def test_long_error_text_is_cut_to_fit(code, unit, shift):
    text = "a" * shift + unit * (wire.INLINE_MAX // len(unit.encode()) + 1)
    payload = wire.pack_error(code, text)
    assert len(payload) <= wire.INLINE_MAX
    got_code, got_text = wire.unpack_error(payload)  # a cut inside a character is replaced, not raised
    assert got_code == code and isinstance(got_text, str)
