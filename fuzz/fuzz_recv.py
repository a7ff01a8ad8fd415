"""atheris target: the server's receive-path parser, Cython vs pure Python.

Each input is sent as one SOCK_SEQPACKET packet (kernel credentials attached,
optionally with SCM_RIGHTS fds chosen by the first byte) through a socketpair
into a server-side ``Conn`` of each transport. Both must return the same
verdict, never raise, and close every fd they received.

    python fuzz/fuzz_recv.py -max_total_time=60 fuzz/corpus   # make fuzz
"""

from __future__ import annotations

import os
import socket
import sys

import atheris

with atheris.instrument_imports():
    from machipc import unix as py_unix
    from machipc import wire
    from machipc.payload import Untaken

from machipc import _closer
from machipc import _unix as c_unix

SO_PASSPIDFD = 76
CHECK_FDS_EVERY = 256


def pair():
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    try:
        rx.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
    except OSError:
        pass
    tx.setblocking(False)
    return rx, tx


PY_RX, PY_TX = pair()
C_RX, C_TX = pair()
PY = py_unix.Conn(PY_RX, True, True)
C = c_unix.Conn(C_RX, True, True)
R, W = os.pipe()
BASELINE = None
runs = 0


def nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def feed(tx, conn, data: bytes, fds: list[int]):
    try:
        if fds:
            socket.send_fds(tx, [data], fds)
        else:
            tx.send(data)
    except OSError:  # too big for the socket buffer: nothing to parse
        return "unsent"
    got = conn.recv_nowait()
    assert got is not None, "a sent packet must be received"
    if fds:
        # Let the closer thread finish with this packet's fds first: if they piled up,
        # the next packet's fds would hit RLIMIT_NOFILE and the kernel would cut the
        # control data (CTRUNC) for one twin and not the other, a harness artefact.
        _closer.flush()
    status, kind, flags, rid, payload, pid, uid, gid, pidfd = (
        got.status, got.kind, got.flags, got.request_id, got.payload, got.pid, got.uid, got.gid, got.pidfd)
    if pidfd >= 0:
        os.close(pidfd)
    if isinstance(payload, Untaken):  # a large payload, left for the server to take once allowed
        status, payload = payload.take()
        payload = b"" if payload is None else payload
    elif status == wire.Drop.OK and flags & wire.Flag.BATCH:  # a Batch: compared by its items
        payload = wire.pack_batch(payload.items())
    return (status, kind, flags, rid, bytes(payload), pid, uid, gid)


def TestOneInput(data: bytes) -> None:
    global BASELINE, runs
    if not data:
        return
    nfd = data[0] % 8
    nfd = 253 if nfd == 7 else nfd  # sometimes the kernel maximum
    packet = data[1:]
    if len(packet) > wire.PACKET_MAX + 64:
        packet = packet[: wire.PACKET_MAX + 64]
    fds = [R] * nfd
    a = feed(PY_TX, PY, packet, fds)
    b = feed(C_TX, C, packet, fds)
    assert a == b, f"transports disagree: py={a!r} c={b!r}"
    flagged = len(packet) >= 8 and packet[4:8] != b"\0\0\0\0"
    if a != "unsent" and not flagged:  # flag bits (e.g. payload-in-memfd) have their own rules
        status = a[0]
        ref, header = wire.check_header(packet, wire.SERVER_ACCEPTS)
        if nfd:  # never handed on; the fds were closed (checked below)
            assert status not in (wire.Drop.OK, wire.Drop.CLOSED), a
            assert status == wire.Drop.UNEXPECTED_FDS or status == ref, (status, ref)
        elif status != wire.Drop.TRUNCATED:
            assert status == ref, (status, ref)
        if status == wire.Drop.OK:
            assert a[4] == packet[wire.HEADER_SIZE:]
        assert a[5] == os.getpid() and a[6] == os.geteuid()
    runs += 1
    if runs % CHECK_FDS_EVERY == 0:
        _closer.flush()  # fds that are not memfds are closed on the closer thread
        now = nfds()
        if BASELINE is None:
            BASELINE = now
        assert now <= BASELINE + 2, f"fd leak: {BASELINE} -> {now}"


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
