"""Replies never stall the server (issue 12 items 8 and 9): machipc.outbox, machipc.cooldown.

The non-readers are real processes speaking the wire protocol by hand, run as
uid 65534 (setpriv) so their strikes and cool-down fall on a uid of their own;
the well-behaved client is this process (another uid, both allowed).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

import machipc
from machipc import aio, wire
from machipc.cooldown import Cooldown
from machipc.errors import UnreadReplies
from machipc.outbox import ENTRY_COST, Outbox

from conftest import wait_for

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")  # one uid 65534 can run (not a venv under /root)
needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or SYSTEM_PYTHON is None,
    reason="needs root, setpriv and /usr/bin/python3 to run the non-reader as uid 65534",
)
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# Connects, floods 1-byte requests and never reads a reply; when hung up on, reconnects.
NON_READER = r"""
import socket, struct, sys, time
path, seconds, version = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
end = time.monotonic() + seconds
conns = sent = 0
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(path)
    except OSError:
        time.sleep(0.01)
        continue
    conns += 1
    s.setblocking(False)
    rid = 0
    while time.monotonic() < end:
        rid += 1
        try:
            s.send(struct.pack("<HBBIQQ", 0x696D, version, 2, 0, rid, 1) + b"x")
            sent += 1
        except BlockingIOError:
            time.sleep(0.001)
        except OSError:
            break  # hung up on: reconnect for free
    s.close()
print(conns, sent, flush=True)
"""

REPLY = b"r" * 32 * 1024  # inline replies: the socket fills after a few


def _non_readers(path: str, n: int, seconds: float) -> list:
    return [subprocess.Popen(NOBODY + [SYSTEM_PYTHON, "-c", NON_READER, path, str(seconds), str(wire.VERSION)], stdout=subprocess.PIPE, text=True) for _ in range(n)]


def _good_requests(name: str, sockdir: str, impl: str, count: int, timeout: float) -> list:
    """Latencies (s) of ``count`` requests, each with ``timeout`` (an IPCTimeoutError fails the test)."""
    latencies = []
    with machipc.Client(name, directory=sockdir, impl=impl, timeout=timeout) as cli:
        for i in range(count):
            start = time.monotonic()
            assert cli.request(b"%d" % i) == REPLY
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)
    return latencies


def _finish(procs: list) -> list:
    out = []
    for proc in procs:
        out.append(proc.communicate(timeout=60)[0].split())
    return out


@needs_setpriv
@pytest.mark.parametrize("workers", [None, 4], ids=["serve", "workers4"])
def test_non_readers_do_not_delay_others(impl, sockdir, workers):
    os.chmod(sockdir, 0o755)
    policy = machipc.policies.Allowlist(uids={os.geteuid(), 65534})
    # reply_timeout=5: before the outbox each unread reply held the serve loop (or a worker) that long.
    # A small bound so every non-reader goes over it (and collects strikes) within seconds even
    # on a loaded machine; the bound's value is not what this test is about.
    srv = machipc.Server("org.test.outbox", policy, directory=sockdir, impl=impl, reply_timeout=5.0, reply_queue_bytes=4 << 20)
    thread = threading.Thread(target=srv.serve, args=(lambda m: REPLY,), kwargs={"workers": workers}, daemon=True)
    thread.start()
    try:
        procs = _non_readers(srv.path, 2 if workers is None else 8, 6.0)
        time.sleep(1.0)  # let them fill their sockets
        latencies = _good_requests("org.test.outbox", sockdir, impl, 100, timeout=4.0)
        results = _finish(procs)
    finally:
        srv.close()
        thread.join(10)
    print(f"good requests: max {max(latencies) * 1000:.1f} ms, median {sorted(latencies)[50] * 1000:.1f} ms; "
          f"non-readers (connections, requests): {results}; stats {srv.stats}")
    assert srv.stats.unread_replies >= 1
    assert srv.stats.cooled_down >= 1  # they kept coming back: their uid was refused for a while


@needs_setpriv
def test_non_readers_do_not_delay_others_aio(impl, sockdir):
    os.chmod(sockdir, 0o755)
    policy = machipc.policies.Allowlist(uids={os.geteuid(), 65534})
    ready = threading.Event()
    box = {}

    async def run_server() -> None:
        async with aio.Server("org.test.outbox", policy, directory=sockdir, impl=impl, reply_timeout=5.0, reply_queue_bytes=4 << 20) as srv:
            box["srv"], box["loop"] = srv, asyncio.get_running_loop()
            ready.set()
            await srv.serve(lambda m: REPLY, signals=False)

    thread = threading.Thread(target=asyncio.run, args=(run_server(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    srv = box["srv"]
    try:
        procs = _non_readers(srv.path, 2, 6.0)
        time.sleep(1.0)
        latencies = _good_requests("org.test.outbox", sockdir, impl, 100, timeout=4.0)
        results = _finish(procs)
    finally:
        box["loop"].call_soon_threadsafe(srv.stop)
        thread.join(20)
    print(f"aio good requests: max {max(latencies) * 1000:.1f} ms; non-readers: {results}; stats {srv.stats}")
    assert srv.stats.unread_replies >= 1


# Sends ``count`` requests that all carry the same sealed 32 MiB memfd (it pays for
# 32 MiB once), reads nothing, then on a line from stdin counts the replies that
# reached its socket (each a fresh 32 MiB memfd the server wrote).
BIG_NON_READER = r"""
import array, fcntl, os, socket, struct, sys
path, count, version = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = 32 << 20
fd = os.memfd_create("big", os.MFD_ALLOW_SEALING)
os.ftruncate(fd, size)
os.posix_fallocate(fd, 0, size)  # allocated: servers refuse memfds with holes
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)
sent = 0
for rid in range(1, count + 1):
    header = struct.pack("<HBBIQQ", 0x696D, version, 2, 1, rid, size)  # flags 1: PAYLOAD_FD
    try:
        s.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        sent += 1
    except OSError:
        break
print("sent", sent, flush=True)
sys.stdin.readline()
replies = 0
s.settimeout(5)
while True:
    try:
        data, anc, _, _ = s.recvmsg(64, socket.CMSG_SPACE(4))
    except OSError:
        break
    if not data:
        break
    for _, _, fds in anc:
        replies += 1
        for got in array.array("i", fds[: len(fds) - len(fds) % 4]):
            os.close(got)
print("replies", replies, flush=True)
"""


def _shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))


def test_non_reader_of_big_replies_is_cut_off_at_the_bound(serve, impl):
    """Item 9: replies written as fresh memfds stay charged to the server while unread."""
    srv = serve(lambda m: m.data, reply_timeout=60)  # echo: each reply is a new 32 MiB memfd
    bound = srv.reply_queue_bytes
    before = _shmem_kib()
    proc = subprocess.Popen([sys.executable, "-c", BIG_NON_READER, srv.path, "30", str(wire.VERSION)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().split()[0] == "sent"
    assert wait_for(lambda: srv.stats.unread_replies == 1, 120), srv.stats
    peak = _shmem_kib()
    proc.stdin.write("\n")
    proc.stdin.flush()
    replies = int(proc.stdout.readline().split()[1])
    proc.wait(30)
    print(f"32 MiB requests, never read: {replies} replies reached the client ({replies * 32} MiB; bound {bound >> 20} MiB), "
          f"system Shmem +{(peak - before) >> 10} MiB; stats {srv.stats}")
    assert replies * (32 << 20) <= bound
    assert srv.stats.received <= 30


def test_cooldown_counts_strikes_per_uid():
    now = [0.0]
    cd = Cooldown(strikes=3, cooldown=60, clock=lambda: now[0])
    assert not cd.strike(1000) and not cd.strike(1000)
    assert not cd.refused(1000)
    now[0] = 61.0  # the first two strikes expired
    assert not cd.strike(1000) and not cd.strike(1000)
    assert cd.strike(1000)
    assert cd.refused(1000) and not cd.refused(1001)
    now[0] = 122.0
    assert not cd.refused(1000)


class FakeConn:
    """A connection whose socket is full while ``full`` is set; records what was sent."""

    def __init__(self) -> None:
        self.fd = -1
        self.full = False
        self.sent: list = []

    def try_send(self, header: bytes, body, fd: int = -1) -> bool:
        if self.full:
            return False
        self.sent.append(bytes(header) + bytes(body))
        return True


def test_outbox_queues_while_full_and_flushes_in_order():
    watched = []
    box = Outbox(10_000, None, watched.append)
    conn = FakeConn()
    box.send(conn, b"h", b"0")
    conn.full = True
    box.send(conn, b"h", b"1")
    box.send(conn, b"h", b"2")
    conn.full = False
    box.send(conn, b"h", b"3")  # behind the queued ones, not around them
    assert conn.sent == [b"h0"] and box.waiting == 3 and watched == [True]
    box.flush(conn)
    assert conn.sent == [b"h0", b"h1", b"h2", b"h3"] and box.waiting == 0 and box.queued == 0
    assert watched == [True, False]


def test_outbox_bound_and_age_disconnect():
    box = Outbox(3 * (ENTRY_COST + 2), None, lambda on: None)
    conn = FakeConn()
    conn.full = True
    for _ in range(3):
        box.send(conn, b"h", b"x")
    with pytest.raises(UnreadReplies):
        box.send(conn, b"h", b"x")
    assert box.waiting == 0 and box.closed  # what waited is freed at once
    with pytest.raises(machipc.PeerGone):
        box.send(conn, b"h", b"x")
    aged = Outbox(1 << 20, 0.05, lambda on: None)
    aged.send(conn, b"h", b"x")
    time.sleep(0.1)
    with pytest.raises(UnreadReplies, match="waited over"):
        aged.send(conn, b"h", b"x")


def test_outbox_check_refuses_before_a_memfd_is_written():
    box = Outbox(1000, None, lambda on: None)
    conn = FakeConn()
    box.check(conn, 1000)  # fits
    with pytest.raises(UnreadReplies):
        box.check(conn, 1001)
    assert box.closed


def test_outbox_counts_memfd_payloads_left_unread(tmp_path):
    """Memfd replies the peer has not read count against the bound (SIOCOUTQ on a real socket)."""
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)

    class Conn(FakeConn):
        def try_send(self, header, body, fd=-1):
            a.sendmsg([header, body])
            return True

    box = Outbox(100 << 20, None, lambda on: None)
    conn = Conn()
    conn.fd = a.fileno()
    box.send(conn, b"h", b"", 3, 40 << 20)
    box.send(conn, b"h", b"", 3, 40 << 20)
    with pytest.raises(UnreadReplies):
        box.send(conn, b"h", b"", 3, 40 << 20)  # 120 MiB unread
    box = Outbox(100 << 20, None, lambda on: None)
    box.send(conn, b"h", b"", 3, 40 << 20)
    while True:  # the peer reads everything: the memfd bytes no longer count
        try:
            b.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    box.send(conn, b"h", b"", 3, 40 << 20)
    box.send(conn, b"h", b"", 3, 40 << 20)
    assert box.in_flight == 80 << 20
    a.close()
    b.close()


@pytest.mark.parametrize("front", ["sync", "aio"])
def test_graceful_stop_delivers_replies_queued_for_a_slow_reader(impl, sockdir, front):
    """stop() still answers what was asked: queued replies go out while the client reads, then EOF."""
    import socket

    if front == "sync":
        srv = machipc.Server("org.test.outbox", directory=sockdir, impl=impl)
        thread = threading.Thread(target=srv.serve, args=(lambda m: REPLY,), daemon=True)
        stop = srv.stop
    else:
        box, ready = {}, threading.Event()

        async def run() -> None:
            async with aio.Server("org.test.outbox", directory=sockdir, impl=impl) as asrv:
                box["srv"], box["loop"] = asrv, asyncio.get_running_loop()
                ready.set()
                await asrv.serve(lambda m: REPLY, signals=False)

        thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    if front == "aio":
        assert ready.wait(10)
        srv = box["srv"].sync

        def stop() -> None:
            box["loop"].call_soon_threadsafe(box["srv"].stop)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.connect(srv.path)
        raw.settimeout(30)
        n = 100
        for rid in range(1, n + 1):
            raw.send(wire.pack_header(wire.Kind.REQUEST, rid, 1) + b"x")
        assert wait_for(lambda: srv.stats.received == n, 30)
        assert wait_for(lambda: srv._transport.waiting_conns(), 30)  # the socket is full: replies wait
        stop()
        kinds = []
        while True:
            pkt = raw.recv(64 * 1024)
            if not pkt:
                break
            kinds.append(pkt[3])
    thread.join(30)
    assert kinds.count(wire.Kind.REPLY) == n
