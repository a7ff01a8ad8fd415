"""machipc.machmsg: the portable Mach message / audit trailer validator.

Synthetic buffers laid out as the kernel lays out a received message, well-formed
and hostile. Runs on every platform.
"""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machipc import errors, machmsg as mm
from machipc.wire import HEADER_SIZE, Drop, Kind, pack_header

AUDIT = mm.AuditToken(auid=501, euid=501, egid=20, ruid=501, rgid=20, pid=4242, asid=100007, pidversion=77)
KERNEL = mm.AuditToken(0, 0, 0, 0, 0, 0, 0, 0)


def packet(payload=b"hello", kind=Kind.MESSAGE, rid=0):
    return pack_header(kind, rid, len(payload)) + payload


def set_u32(buf: bytes, off: int, value: int) -> bytes:
    b = bytearray(buf)
    struct.pack_into("<I", b, off, value)
    return bytes(b)


# -- layout constants --------------------------------------------------------


def test_layout_constants():
    assert mm.MSG_HEADER.size == mm.MSG_HEADER_SIZE == 24
    assert mm.OOL_DESCRIPTOR.size == mm.OOL_DESCRIPTOR_SIZE == 16
    assert mm.COMPLEX_PREFIX_SIZE == 44
    assert mm.AUDIT_TOKEN.size == mm.AUDIT_TOKEN_SIZE == 32
    assert mm.OFF_TRAILER_AUDIT + mm.AUDIT_TOKEN_SIZE == mm.AUDIT_TRAILER_SIZE == 52
    assert mm.RCV_TRAILER_OPTIONS == 0x03000000
    assert [mm.round_msg(x) for x in (24, 25, 27, 28)] == [24, 28, 28, 28]


def test_layout_constants_match_the_c_header():
    """Every MACHMSG_* value in _mach_layout.h equals this module's constant."""
    import pathlib
    import re

    text = (pathlib.Path(mm.__file__).parent / "_mach_layout.h").read_text()
    found = dict(re.findall(r"#define MACHMSG_(\w+)\s+\(?(0x[0-9A-Fa-f]+|\d+)u?\)?", text))
    assert len(found) > 20
    for name, value in found.items():
        assert getattr(mm, name) == int(value, 0), name


# -- well-formed -------------------------------------------------------------


def test_parse_simple_message():
    buf = mm.build_simple(packet(b"hello"), AUDIT)
    reason, p = mm.parse(buf)
    assert reason == mm.Reject.OK
    assert p.audit == AUDIT and p.audit.pid == 4242 and p.audit.pidversion == 77
    assert bytes(p.inline(buf)) == packet(b"hello")
    assert p.remote_port == 0 and p.ool_address == 0 and not p.complex


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5])
def test_parse_strips_sender_padding(n):
    buf = mm.build_simple(packet(b"x" * n), AUDIT)
    reason, p = mm.parse(buf)
    assert reason == mm.Reject.OK and bytes(p.inline(buf)) == packet(b"x" * n)
    assert p.msgh_size % 4 == 0


def test_parse_leaves_bad_length_to_wire_check():
    from machipc.wire import SERVER_ACCEPTS, check_header

    wire = pack_header(Kind.MESSAGE, 0, 100) + b"x" * 8
    buf = mm.build_simple(wire, AUDIT)
    reason, p = mm.parse(buf)
    assert reason == mm.Reject.OK
    assert check_header(bytes(p.inline(buf)), SERVER_ACCEPTS)[0] == Drop.BAD_LENGTH


def test_parse_request_with_reply_right():
    buf = mm.build_simple(packet(b"q", Kind.REQUEST, 9), AUDIT, reply_port=0x1307)
    reason, p = mm.parse(buf)
    assert reason == mm.Reject.OK and p.remote_port == 0x1307


def test_parse_ool_message():
    hdr = pack_header(Kind.MESSAGE, 0, 1 << 20)
    buf = mm.build_ool(hdr, 0x1_2345_0000, 1 << 20, AUDIT)
    reason, p = mm.parse(buf)
    assert reason == mm.Reject.OK
    assert p.complex and p.ool_address == 0x1_2345_0000 and p.ool_size == 1 << 20
    assert bytes(p.inline(buf)) == hdr


def test_parse_ignores_bytes_past_the_trailer():
    buf = mm.build_simple(packet(), AUDIT) + b"\xa5" * 500  # receive buffer larger than the message
    assert mm.parse(buf)[0] == mm.Reject.OK


def test_parse_accepts_larger_trailer():
    buf = mm.build_simple(packet(), AUDIT)
    toff = mm.round_msg(struct.unpack_from("<I", buf, 4)[0])
    buf = set_u32(buf, toff + 4, mm.MAX_TRAILER_SIZE) + bytes(mm.MAX_TRAILER_SIZE - mm.AUDIT_TRAILER_SIZE)
    assert mm.parse(buf)[0] == mm.Reject.OK


def test_send_once_notification_only_when_allowed():
    buf = mm.build_send_once_notification()
    reason, p = mm.parse(buf, allow_notification=True)
    assert reason == mm.Reject.OK and p.notification
    assert mm.parse(buf)[0] == mm.Reject.BAD_ID


def test_notification_from_a_process_is_refused():
    buf = mm.build_send_once_notification()
    toff = 24
    buf = set_u32(buf, toff + mm.OFF_TRAILER_AUDIT + 5 * 4, 999)  # pid 999
    assert mm.parse(buf, allow_notification=True)[0] == mm.Reject.BAD_NOTIFICATION


# -- hostile -----------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 23])
def test_truncated_header(n):
    assert mm.parse(mm.build_simple(packet(), AUDIT)[:n]) == (mm.Reject.SHORT_HEADER, None)


@pytest.mark.parametrize("size", [0, 23, 10_000])
def test_msgh_size_lies(size):
    buf = set_u32(mm.build_simple(packet(), AUDIT), 4, size)
    assert mm.parse(buf)[0] == mm.Reject.BAD_SIZE


def test_msgh_size_shorter_moves_trailer():
    buf = set_u32(mm.build_simple(packet(b"x" * 40), AUDIT), 4, 48)
    assert mm.parse(buf)[0] in (mm.Reject.BAD_TRAILER_TYPE, mm.Reject.TRAILER_TOO_SMALL)


def test_no_trailer():
    buf = mm.build_simple(packet(), None)
    assert mm.parse(buf)[0] == mm.Reject.NO_TRAILER


def test_trailer_wrong_type():
    buf = mm.build_simple(packet(), AUDIT)
    toff = len(buf) - mm.AUDIT_TRAILER_SIZE
    assert mm.parse(set_u32(buf, toff, 1))[0] == mm.Reject.BAD_TRAILER_TYPE


@pytest.mark.parametrize("tsize", [0, 8, 20, 32, 51])
def test_trailer_too_small(tsize):
    buf = mm.build_simple(packet(), AUDIT)
    toff = len(buf) - mm.AUDIT_TRAILER_SIZE
    assert mm.parse(set_u32(buf, toff + 4, tsize))[0] == mm.Reject.TRAILER_TOO_SMALL


def test_trailer_truncated():
    buf = mm.build_simple(packet(), AUDIT)
    assert mm.parse(buf[:-1])[0] == mm.Reject.TRAILER_TRUNCATED
    toff = len(buf) - mm.AUDIT_TRAILER_SIZE
    assert mm.parse(set_u32(buf, toff + 4, 4096))[0] == mm.Reject.TRAILER_TRUNCATED


def test_kernel_sender_refused():
    assert mm.parse(mm.build_simple(packet(), KERNEL))[0] == mm.Reject.KERNEL_SENDER


def test_wrong_msgh_id():
    reason, p = mm.parse(mm.build_simple(packet(), AUDIT, msgh_id=1234))
    assert reason == mm.Reject.BAD_ID and p.audit == AUDIT  # still loggable


def test_unexpected_voucher():
    buf = set_u32(mm.build_simple(packet(), AUDIT), mm.OFF_MSGH_VOUCHER_PORT, 0x707)
    assert mm.parse(buf)[0] == mm.Reject.UNEXPECTED_VOUCHER


@pytest.mark.parametrize("remote_type", [mm.MACH_MSG_TYPE_MOVE_SEND, mm.MACH_MSG_TYPE_MOVE_RECEIVE, 19])
def test_unexpected_header_right(remote_type):
    buf = mm.build_simple(packet(), AUDIT, reply_port=0x1307)
    bits = struct.unpack_from("<I", buf)[0] & ~mm.MACH_MSGH_BITS_REMOTE_MASK | remote_type
    assert mm.parse(set_u32(buf, 0, bits))[0] == mm.Reject.UNEXPECTED_RIGHT


def test_body_shorter_than_wire_header():
    buf = mm.build_simple(b"\0" * (HEADER_SIZE - 4), AUDIT)
    assert mm.parse(buf)[0] == mm.Reject.SHORT_BODY


def test_complex_bit_without_descriptors():
    buf = mm.build_simple(b"", AUDIT)  # 24-byte message
    buf = set_u32(buf, 0, mm.MACH_MSGH_BITS_COMPLEX)
    assert mm.parse(buf)[0] == mm.Reject.COMPLEX_WITHOUT_BODY


def test_complex_bit_on_simple_layout():
    buf = mm.build_simple(packet(), AUDIT)
    bits = struct.unpack_from("<I", buf)[0] | mm.MACH_MSGH_BITS_COMPLEX
    # the first bytes of the wire header are read as a descriptor count
    assert mm.parse(set_u32(buf, 0, bits))[0] == mm.Reject.BAD_DESCRIPTOR_COUNT


@pytest.mark.parametrize("count", [0, 2, 0xFFFFFFFF])
def test_wrong_descriptor_count(count):
    hdr = pack_header(Kind.MESSAGE, 0, 100_000)
    buf = mm.build_ool(hdr, 0x1000, 100_000, AUDIT, count=count)
    assert mm.parse(buf)[0] == mm.Reject.BAD_DESCRIPTOR_COUNT


@pytest.mark.parametrize(
    "dtype",
    [mm.MACH_MSG_PORT_DESCRIPTOR, mm.MACH_MSG_OOL_PORTS_DESCRIPTOR, mm.MACH_MSG_OOL_VOLATILE_DESCRIPTOR,
     mm.MACH_MSG_GUARDED_PORT_DESCRIPTOR, 200],
)
def test_wrong_descriptor_type(dtype):
    hdr = pack_header(Kind.MESSAGE, 0, 100_000)
    assert mm.parse(mm.build_ool(hdr, 0x1000, 100_000, AUDIT, dtype=dtype))[0] == mm.Reject.BAD_DESCRIPTOR_TYPE


def test_descriptor_truncated():
    hdr = pack_header(Kind.MESSAGE, 0, 100_000)
    good = mm.build_ool(hdr, 0x1000, 100_000, AUDIT)
    for size in (28 + 11, 28 + 15):  # descriptor cut before / after the type byte
        buf = good[:size] + bytes(mm.round_msg(size) - size) + good[-mm.AUDIT_TRAILER_SIZE:]
        buf = set_u32(buf, 4, size)
        assert mm.parse(buf)[0] == mm.Reject.DESCRIPTOR_TRUNCATED, size


def test_ool_size_mismatch():
    hdr = pack_header(Kind.MESSAGE, 0, 100_000)
    assert mm.parse(mm.build_ool(hdr, 0x1000, 99_999, AUDIT))[0] == mm.Reject.BAD_OOL_SIZE


def test_ool_with_inline_payload_too():
    hdr = pack_header(Kind.MESSAGE, 0, 100_000) + b"extra"
    assert mm.parse(mm.build_ool(hdr, 0x1000, 100_000, AUDIT))[0] == mm.Reject.BAD_OOL_SIZE


def test_ool_body_short():
    assert mm.parse(mm.build_ool(b"\0" * 10, 0x1000, 100, AUDIT))[0] == mm.Reject.SHORT_BODY


def test_empty_ool():
    hdr = pack_header(Kind.MESSAGE, 0, 0)
    assert mm.parse(mm.build_ool(hdr, 0, 0, AUDIT))[0] == mm.Reject.EMPTY_OOL


def test_every_reject_has_text_and_drop():
    for r in mm.Reject:
        assert r in mm.REJECT_DROP
        if r != mm.Reject.OK:
            assert mm.REJECT_TEXT[r]
            assert mm.REJECT_DROP[r] != Drop.OK


# -- fuzz --------------------------------------------------------------------


def _check_invariants(buf, reason, p):
    assert isinstance(reason, mm.Reject)
    if reason != mm.Reject.OK:
        return
    n = len(buf)
    assert p.audit is not None
    assert mm.round_msg(p.msgh_size) + p.trailer_size <= n
    assert p.trailer_size >= mm.AUDIT_TRAILER_SIZE
    if p.notification:
        return
    assert p.audit.pid != 0
    assert 0 <= p.msgh_size - (p.inline_offset + p.inline_size) <= 3 and p.msgh_size <= n
    assert p.inline_size >= HEADER_SIZE
    if p.complex:
        assert p.ool_size > 0 and p.inline_size == HEADER_SIZE
        assert buf[mm.OFF_FIRST_DESCRIPTOR + mm.OFF_OOL_TYPE] == mm.MACH_MSG_OOL_DESCRIPTOR
    else:
        assert p.ool_address == 0 and p.ool_size == 0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.booleans())
def test_parse_fuzz_random_bytes(data, notif):
    reason, p = mm.parse(data, allow_notification=notif)
    _check_invariants(data, reason, p)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["simple", "ool", "notif"]),
    st.lists(st.tuples(st.integers(0, 150), st.integers(0, 255)), max_size=6),
    st.integers(0, 160),
)
def test_parse_fuzz_mutated_messages(shape, flips, cut):
    if shape == "simple":
        buf = bytearray(mm.build_simple(packet(b"abc" * 7, Kind.REQUEST, 3), AUDIT, reply_port=0x1307))
    elif shape == "ool":
        buf = bytearray(mm.build_ool(pack_header(Kind.MESSAGE, 0, 70_000), 0x7000_0000, 70_000, AUDIT))
    else:
        buf = bytearray(mm.build_send_once_notification())
    for off, value in flips:
        if off < len(buf):
            buf[off] = value
    data = bytes(buf[: len(buf) - cut if cut < len(buf) else 0])
    reason, p = mm.parse(data, allow_notification=True)
    _check_invariants(data, reason, p)


# -- errors ------------------------------------------------------------------


def test_kern_error_names_and_classes():
    e = mm.kern_error(0x10000003, "send")
    assert isinstance(e, errors.PeerGone) and "MACH_SEND_INVALID_DEST (0x10000003)" in str(e)
    assert isinstance(mm.kern_error(0x10000004, "send"), TimeoutError)
    assert isinstance(mm.kern_error(0x10004003, "recv"), errors.IPCTimeoutError)
    assert isinstance(mm.kern_error(0x1000000E, "send"), errors.MessageTooLarge)
    e = mm.kern_error(0x12345, "x")
    assert type(e) is errors.IPCError and "0x12345" in str(e)


def test_bootstrap_errors_explain_themselves():
    e = mm.bootstrap_error(1102, "bootstrap_look_up", "com.example.x")
    assert isinstance(e, FileNotFoundError) and "BOOTSTRAP_UNKNOWN_SERVICE (0x44e)" in str(e) and "start the server" in str(e)
    e = mm.bootstrap_error(1103, "bootstrap_check_in", "com.example.x")
    assert isinstance(e, FileExistsError) and "another" in str(e)
    e = mm.bootstrap_error(1100, "bootstrap_check_in", "com.example.x")
    assert isinstance(e, PermissionError) and "dead login session" in str(e)


def test_check_service_name():
    assert mm.check_service_name("com.example.svc") == b"com.example.svc"
    assert len(mm.check_service_name("a" * 127)) == 127
    for bad in ("", "a" * 128, "é" * 64, "a\0b"):
        with pytest.raises(errors.InvalidArgument):
            mm.check_service_name(bad)
