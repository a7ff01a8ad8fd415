"""Hostile clients (issue 8): fds, odd headers, forged credentials, dying senders, floods.

Complements test_server_client.py (short/bad magic/REPLY kind/lying length/bad
version, 20x2 fds, squatting, stale socket, oversized). Every case checks that
the server keeps serving a well-behaved client and counts what it dropped.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import machipc
from machipc import _closer, wire
from machipc.wire import Kind

from conftest import raw_connect, wait_for

MAX_FDS = 253  # SCM_MAX_FD


def nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_253_fds_in_one_packet_are_all_closed(serve, client):
    """Foreign fds break the protocol: answered MALFORMED, all closed, the sender hung up on."""
    srv = serve()
    good = client()
    raw = raw_connect(srv.path)
    assert good.request(b"warm", timeout=5) == b"echo:warm"
    r, w = os.pipe()
    _closer.flush()  # earlier tests' connections, closed on the closer threads
    before = nfds()
    fds = [r] * 126 + [w] * 127
    assert len(fds) == MAX_FDS
    socket.send_fds(raw, [wire.pack_header(Kind.REQUEST, 7, 1) + b"x"], fds)
    answer = raw.recv(200)
    assert wire.HEADER.unpack_from(answer)[2::2] == (Kind.ERROR, 7)
    assert wire.unpack_error(answer[24:])[0] == wire.ErrorCode.MALFORMED
    assert raw.recv(200) == b""  # then EOF: disconnected
    assert srv.stats.dropped["UNEXPECTED_FDS"] == 1
    assert srv.stats.disconnected["unexpected fds"] == 1
    assert good.request(b"sync", timeout=5) == b"echo:sync"
    # All 253 installed fds are closed again (pipes: on the closer thread, see machipc/_closer.py),
    # and so is the server's end of raw's connection with its pinned pidfd.
    assert wait_for(lambda: nfds() <= before - 2), (nfds(), before)
    # More than SCM_MAX_FD in one packet: the sending kernel refuses it outright.
    with pytest.raises(OSError) as info:
        socket.send_fds(raw, [wire.pack_header(Kind.MESSAGE, 0, 1) + b"x"], [r] * (MAX_FDS + 1))
    assert info.value.errno in (errno.EINVAL, errno.ETOOMANYREFS)
    assert good.request(b"sync", timeout=5) == b"echo:sync"
    raw.close()
    os.close(r)
    os.close(w)


CTRUNC_SERVER = r"""
import machipc, os, resource, sys
srv = machipc.Server("org.test.ctrunc", directory=sys.argv[1], impl=sys.argv[2])
base = len(os.listdir("/proc/self/fd"))
# Room for ~20 more fds: 253 passed fds cannot all be installed -> MSG_CTRUNC.
resource.setrlimit(resource.RLIMIT_NOFILE, (base + 24, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print("ready", flush=True)
msg = srv.receive(timeout=20)  # the bad packet is dropped; this is the good one after it
import time
for _ in range(500):  # the peer's pipe fds are closed on the closer thread: let it finish
    try:
        if len(os.listdir("/proc/self/fd")) - base <= 3:
            break
    except OSError:  # EMFILE until the closer has caught up
        pass
    time.sleep(0.01)
print(bytes(msg.data).decode(), dict(srv.stats.dropped), len(os.listdir("/proc/self/fd")) - base, flush=True)
srv.close()
"""


def test_ctrunc_when_fds_do_not_fit(impl, sockdir):
    """A receiver near RLIMIT_NOFILE gets MSG_CTRUNC: dropped, installed fds closed."""
    proc = subprocess.Popen([sys.executable, "-c", CTRUNC_SERVER, sockdir, impl], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        raw = raw_connect(os.path.join(sockdir, "org.test.ctrunc"))
        r, w = os.pipe()
        socket.send_fds(raw, [wire.pack_header(Kind.MESSAGE, 0, 1) + b"x"], [r] * MAX_FDS)
        raw.send(wire.pack_header(Kind.MESSAGE, 0, 2) + b"ok")
        out, _ = proc.communicate(timeout=30)
        word, dropped, grown = out.strip().split(" ", 1)[0], out.split(" ", 1)[1].rsplit(" ", 1)[0], int(out.split()[-1])
        print("server said:", out.strip())
        assert word == "ok"
        assert "CTRUNC" in dropped
        # The accepted connection, its pinned pidfd (SO_PEERPIDFD) and the held message's
        # sender pidfd (a dup of it); ~20 if the installed fds leaked.
        assert grown <= 3
        raw.close()
        os.close(r)
        os.close(w)
    finally:
        proc.kill()
        proc.wait()


def test_zero_and_maximum_length_payloads(serve, client):
    srv = serve(lambda m: b"%d" % len(m.data))
    raw = raw_connect(srv.path)
    good = client()
    for n in (0, 1, wire.INLINE_MAX - 1, wire.INLINE_MAX):
        raw.send(wire.pack_header(Kind.REQUEST, n + 1, n) + b"z" * n)
        hdr = wire.HEADER.unpack(raw.recv(100)[:24])
        assert hdr[2] == Kind.REPLY and hdr[4] == n + 1
        assert good.request(b"x" * n, timeout=5) == b"%d" % n
    # One byte over the maximum packet is truncated by our receive buffer: dropped + MALFORMED.
    n = wire.INLINE_MAX + 1
    raw.send(wire.pack_header(Kind.REQUEST, 99, n) + b"z" * n)
    pkt = raw.recv(200)
    assert wire.HEADER.unpack_from(pkt)[2::2] == (Kind.ERROR, 99)
    assert wire.unpack_error(pkt[24:])[0] == wire.ErrorCode.MALFORMED
    assert wait_for(lambda: srv.stats.dropped["TRUNCATED"] == 1)
    # An empty one-way message is a message, not EOF.
    raw.send(wire.pack_header(Kind.MESSAGE, 0, 0))
    assert wait_for(lambda: srv.stats.received == 9)
    assert good.request(b"still", timeout=5) == b"5"
    raw.close()


def test_request_ids_kinds_and_flags(serve, client):
    srv = serve()
    raw = raw_connect(srv.path)
    good = client()
    hostile = [
        (wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.REQUEST, 0, 0, 1) + b"x", "BAD_REQUEST_ID", None),  # unanswerable
        (wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.MESSAGE, 0, 5, 1) + b"x", "BAD_REQUEST_ID", None),
        (wire.HEADER.pack(wire.MAGIC, wire.VERSION, 0, 0, 6, 0), "BAD_KIND", None),
        (wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.ERROR, 0, 7, 2) + b"\x01\x00", "BAD_KIND", None),
        (wire.HEADER.pack(wire.MAGIC, wire.VERSION, 5, 0, 8, 0), "BAD_KIND", None),
        (wire.HEADER.pack(wire.MAGIC, wire.VERSION, 255, 0, 9, 0), "BAD_KIND", None),
        (wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.REQUEST, 1 << 30, 10, 0), "BAD_FLAGS", 10),
        (wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.REQUEST, 0x80000000, 11, 0), "BAD_FLAGS", 11),
        (wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.MESSAGE, 0xFFFF0000, 0, 0), "BAD_FLAGS", None),  # high bits: never defined
        (wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.REQUEST, 0, 2**64 - 1, 2**64 - 1), "BAD_LENGTH", 2**64 - 1),
        (wire.HEADER.pack(wire.MAGIC, 0, Kind.REQUEST, 0, 12, 0), "BAD_VERSION", 12),
        (wire.HEADER.pack(wire.MAGIC, 255, Kind.MESSAGE, 0, 0, 0), "BAD_VERSION", None),
        (b"mi", "SHORT", None),
        (wire.pack_header(Kind.REQUEST, 13, 0)[:23], "SHORT", None),
    ]
    for pkt, _, _ in hostile:
        raw.send(pkt)
        assert good.request(b"alive", timeout=5) == b"echo:alive"
    expected = {}
    for _, reason, _ in hostile:
        expected[reason] = expected.get(reason, 0) + 1
    assert wait_for(lambda: dict(srv.stats.dropped) == expected), dict(srv.stats.dropped)
    answered = sorted(rid for _, _, rid in hostile if rid is not None)
    got = []
    raw.settimeout(2)
    for _ in answered:
        pkt = raw.recv(200)
        _, _, kind, flags, rid, length = wire.HEADER.unpack_from(pkt)
        assert (kind, flags, length) == (Kind.ERROR, 0, len(pkt) - 24)
        assert wire.unpack_error(pkt[24:])[0] == wire.ErrorCode.MALFORMED
        got.append(rid)
    assert sorted(got) == answered
    raw.settimeout(0.2)
    with pytest.raises(socket.timeout):
        raw.recv(200)  # nothing for the unanswerable ones
    assert srv.stats.received == len(hostile)  # only the good client's requests
    print(f"hostile headers tried: {len(hostile)}, dropped: {dict(srv.stats.dropped)}")
    raw.close()


FORGER = r"""
import os, socket, struct, sys
path, mode = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)
os.setgid(65534)
os.setuid(65534)
hdr = struct.pack("<HBBIQQ", 0x696D, 2, 2, 0, 1, 6)
results = []
for pid, uid, gid in [(1, 0, 0), (os.getppid(), 65534, 65534), (os.getpid(), 0, 0), (os.getpid(), 65534, 0)]:
    creds = struct.pack("=iII", pid, uid, gid)
    try:
        s.sendmsg([hdr + b"forged"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
        results.append("sent")
    except OSError as exc:
        results.append(exc.errno)
# Our own true ids are allowed: the server must see exactly these.
s.sendmsg([hdr + b"honest"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("=iII", os.getpid(), 65534, 65534))])
print(" ".join(map(str, results)), os.getpid(), flush=True)
s.settimeout(10)
hello = s.recv(200)  # the server's HELLO comes first
print(s.recv(200)[3], flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to uid 65534 in a child")
def test_unprivileged_sender_cannot_forge_credentials(impl, sockdir):
    os.chmod(sockdir, 0o755)
    policy = machipc.policies.Allowlist(uids={65534})
    with machipc.Server("org.test.forge", policy, directory=sockdir, impl=impl) as srv:
        proc = subprocess.Popen([sys.executable, "-c", FORGER, srv.path, "x"], stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline().split()
        results, child_pid = line[:-1], int(line[-1])
        # The kernel refuses every foreign pid/uid/gid from an unprivileged process.
        assert results == [str(errno.EPERM)] * 4, results
        msg = srv.receive(timeout=10)
        assert bytes(msg.data) == b"honest"
        assert (msg.sender.pid, msg.sender.uid, msg.sender.gid) == (child_pid, 65534, 65534)
        msg.reply(b"ok")
        assert int(proc.stdout.readline()) == Kind.REPLY
        proc.wait(10)
        assert srv.stats.received == 1 and srv.stats.dropped_total == 0


def test_sender_exiting_right_after_send(serve, impl, sockdir):
    """A sender gone before the server looks: no crash; kernel pid/uid still reported."""
    seen = []

    def handler(m):
        seen.append((m.sender.pid, m.sender.uid, bytes(m.data), m.sender.is_alive()))

    with machipc.Server("org.test.gone", directory=sockdir, impl=impl) as srv:
        pids = []
        for i in range(5):
            p = subprocess.Popen(
                [sys.executable, "-c", f"import machipc; c = machipc.Client('org.test.gone', directory={sockdir!r}, impl={impl!r}); c.send(b'bye{i}'); c.close()"]
            )
            p.wait(20)
            pids.append(p.pid)
        # All five are reaped before the server reads a single packet.
        for _ in range(5):
            msg = srv.receive(timeout=10)
            handler(msg)
        assert sorted(s[2] for s in seen) == [b"bye%d" % i for i in range(5)]
        assert sorted(s[0] for s in seen) == sorted(pids)
        assert all(s[1] == os.geteuid() for s in seen)
        assert not any(s[3] for s in seen)  # the pidfd (if any) reports the process dead


def test_flooding_client_that_never_reads_cannot_stall_others(serve, client):
    """Slowloris: requests flooded, replies never read. The server hangs up on it
    once its unread replies pass the bound (machipc.outbox), never waiting for it."""
    srv = serve(lambda m: b"r" * 512, reply_timeout=0.5, reply_queue_bytes=256 * 1024)
    raw = raw_connect(srv.path)
    raw.setblocking(False)
    sent = 0
    for i in range(1, 3000):
        try:
            raw.send(wire.pack_header(Kind.REQUEST, i, 1) + b"x")
            sent += 1
        except BlockingIOError:
            time.sleep(0.002)
        except (BrokenPipeError, ConnectionResetError):
            break  # already hung up on
    good = client()
    for i in range(20):
        assert good.request(b"%d" % i, timeout=20) == b"r" * 512
    # The bad peer was disconnected once, when it went over its bound.
    assert wait_for(lambda: srv.connections == 1, 20)
    assert srv.stats.unread_replies == 1
    print(f"flood: {sent} requests sent, {srv.stats.reply_errors} replies failed, connections {srv.connections}")
    raw.close()


def test_many_idle_connections_do_not_stall(serve, client):
    srv = serve()
    idle = [raw_connect(srv.path) for _ in range(200)]
    good = client()
    for i in range(10):
        assert good.request(b"x", timeout=5) == b"echo:x"
    assert wait_for(lambda: srv.connections == 201)
    for s in idle:
        s.close()
    assert wait_for(lambda: srv.connections == 1)
