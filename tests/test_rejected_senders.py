"""A rejected sender costs the server nothing (issue 12): real-process attacks.

The server runs as root in its own process with the default ``SameUser()``
policy; the attacker is uid 65534 (``setpriv``) running the system
``python3`` and speaking the wire protocol by hand (docs/protocol.md), no
machipc code. Each test checks that the server survives, its fds / memory
stay bounded, and a trusted (root) client is served within its timeout.
Each prints the server's figures (RSS, fds, cgroup usage) for the record.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import machipc

from conftest import raw_connect, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"),
    reason="needs root, setpriv (util-linux) and /usr/bin/python3 to attack as uid 65534",
)

MiB = 1024 * 1024
NAME = "org.test.rejected"
ATTACKER = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"]

# The server: echo, plus b"stats" -> its counters as JSON. argv: sockdir impl options-json.
SERVER = r"""
import json, os, resource, sys
sockdir, impl, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if opts.get("cgroup"):
    with open(opts["cgroup"], "w") as f:
        f.write(str(os.getpid()))
if opts.get("nofile"):
    resource.setrlimit(resource.RLIMIT_NOFILE, (opts["nofile"], resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
import machipc
srv = machipc.Server("org.test.rejected", directory=sockdir, impl=impl, **opts.get("server", {}))
if opts.get("address_space"):  # after start-up: leave room for opts["address_space"] bytes more
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + opts["address_space"], resource.RLIM_INFINITY))

def handle(msg):
    if bytes(msg.data[:5]) == b"stats":
        s = srv.stats
        return json.dumps({"dropped": dict(s.dropped), "disconnected": dict(s.disconnected),
                           "rejected": s.rejected, "too_large": s.too_large, "received": s.received}).encode()
    return b"ok:%d" % len(msg.data)

print("ready", flush=True)
srv.serve(handle)
"""

# Attacker helpers, prepended to every attack script (system python3, stdlib only).
WIRE = r"""
import array, fcntl, mmap, os, socket, struct, sys, time
HDR = struct.Struct("<HBBIQQ")
MESSAGE, REQUEST, PAYLOAD_FD, ARENA = 1, 2, 1, 2
SEALS_ALL = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
SEALS_ARENA = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
CONTROL = 4096
REF = struct.Struct("<IIQQ")
path = sys.argv[1]

def header(kind, rid, length, flags=0):
    return HDR.pack(0x696D, 2, kind, flags, rid, length)  # wire version 2

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    deadline = time.monotonic() + 10
    while True:
        try:
            s.connect(path)
            return s
        except BlockingIOError:  # the backlog is full for now
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)

def send(s, data, fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    return s.sendmsg([data], anc)

def answer(s):
    kind = 5
    while kind == 5:  # skip the server's HELLO (first packet on a connection)
        try:
            pkt = s.recv(70000)
        except OSError as exc:
            return "gone (%s)" % exc.__class__.__name__
        if not pkt:
            return "EOF"
        kind = HDR.unpack_from(pkt)[2]
    if kind == 4:
        return "ERROR %d %s" % (struct.unpack_from("<H", pkt, 24)[0], pkt[26:].decode())
    return "REPLY %r" % pkt[24:]

def sparse_memfd(size, seals):
    fd = os.memfd_create("attack", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd

def say(*words):
    print(*words, flush=True)
"""


def _cgroup_parent() -> tuple[str, str]:
    """(kind, directory) of a writable memory cgroup hierarchy, or ("", reason)."""
    v1 = "/sys/fs/cgroup/memory"
    if os.path.exists(os.path.join(v1, "memory.limit_in_bytes")) and os.access(v1, os.W_OK):
        return "v1", v1
    for v2 in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        controllers = os.path.join(v2, "cgroup.controllers")
        if os.path.exists(controllers) and "memory" in open(controllers).read() and os.access(v2, os.W_OK):
            return "v2", v2
    return "", "no writable memory cgroup (v1 /sys/fs/cgroup/memory or v2 with the memory controller)"


class MemoryCgroup:
    """A memory cgroup with ``limit`` bytes (v1 or v2), removed on close."""

    def __init__(self, limit: int) -> None:
        kind, parent = _cgroup_parent()
        if not kind:
            pytest.skip(parent)
        self.kind = kind
        self.path = tempfile.mkdtemp(prefix="machipc-test-", dir=parent)
        try:
            if kind == "v1":
                self._write("memory.limit_in_bytes", limit)
                self.procs = os.path.join(self.path, "cgroup.procs")
            else:
                self._write("memory.max", limit)
                self._write("memory.swap.max", 0)
                self.procs = os.path.join(self.path, "cgroup.procs")
        except OSError as exc:
            self.close()
            pytest.skip(f"cannot set up a memory cgroup at {self.path}: {exc}")

    def _write(self, name: str, value) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(value))

    def _read(self, name: str) -> int:
        try:
            with open(os.path.join(self.path, name)) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError):
            return -1

    def usage(self) -> int:
        return self._read("memory.usage_in_bytes" if self.kind == "v1" else "memory.current")

    def peak(self) -> int:
        return self._read("memory.max_usage_in_bytes" if self.kind == "v1" else "memory.peak")

    def close(self) -> None:
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # the killed server is still leaving


class ServerProcess:
    """The root server in its own process (so it can be OOM-killed, limited, measured)."""

    def __init__(self, sockdir: str, impl: str, **opts) -> None:
        os.chmod(sockdir, 0o755)  # reachable by uid 65534
        self.path = os.path.join(sockdir, NAME)
        self.sockdir, self.impl = sockdir, impl
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, sockdir, impl, json.dumps(opts)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return -1

    def rss_kb(self) -> dict:
        out = {}
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in ("VmRSS", "RssAnon", "RssShmem"):
                        out[key] = int(line.split()[1])
        except OSError:
            pass
        return out

    def trusted_request(self, data: bytes = b"hello", timeout: float = 10.0) -> bytes:
        """A request of a root client (allowed by SameUser()), connected now."""
        with machipc.Client(NAME, directory=self.sockdir, impl=self.impl, timeout=timeout) as cli:
            return cli.request(data, timeout=timeout)

    def stats(self) -> dict:
        return json.loads(self.trusted_request(b"stats"))

    def close(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


def attack(server: ServerProcess, body: str, *args: str) -> subprocess.Popen:
    """Start ``body`` (with WIRE's helpers) as uid 65534; stdout is a pipe of text lines,
    stdin a pipe it may wait on (so it holds its fds until killed)."""
    return subprocess.Popen(ATTACKER + [WIRE + body, server.path, *args], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)


def read_until(proc: subprocess.Popen, word: str, timeout: float = 120.0) -> list[str]:
    """Lines the attacker printed up to the one starting with ``word`` (or until it exited;
    the caller checks the last line, after reporting what happened)."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith(word):
            break
    return lines


def report(title: str, server: ServerProcess, **extra) -> None:
    print(f"[{title}] server alive={server.alive()} fds={server.fds()} rss={server.rss_kb()}", *(f"{k}={v}" for k, v in extra.items()))


# -- (a) sparse memfds and sparse arenas: the server's memory ----------------------

SPARSE_MEMFDS = r"""
count = int(sys.argv[2])
s = connect()
held = []
for i in range(count):
    fd = sparse_memfd(64 << 20, SEALS_ALL)
    send(s, header(REQUEST, i + 1, 64 << 20, PAYLOAD_FD), [fd])
    held.append(fd)  # keep the file (and any page the server faulted in) alive
    say("memfd", i, answer(s))
say("done")
sys.stdin.readline()
"""

SPARSE_ARENAS = r"""
conns = int(sys.argv[2])
held = []
for c in range(conns):
    s = connect()
    held.append(s)
    for a in range(4):
        fd = sparse_memfd(CONTROL + (128 << 20), SEALS_ARENA)
        for r in range(2):
            ref = REF.pack(100 + a, 0, r * (64 << 20), (r + 1) * (64 << 20))
            send(s, header(REQUEST, 10 * a + r + 1, 64 << 20, ARENA | PAYLOAD_FD) + ref, [fd])
            say("arena", c, a, r, answer(s))
        os.close(fd)  # only the connection is kept: the server's mapping would hold the arena
say("done")
sys.stdin.readline()
"""


@pytest.mark.parametrize("kind", ["memfds", "arenas"])
def test_sparse_payloads_of_a_rejected_sender_cost_no_memory(impl, sockdir, kind):
    """F1: holes the server would fault in (or arenas it would keep) are never touched."""
    limit = 256 * MiB
    group = MemoryCgroup(limit)
    server = None
    attacker = None
    try:
        server = ServerProcess(sockdir, impl, cgroup=group.procs)
        base = group.usage()
        if kind == "memfds":
            attacker = attack(server, SPARSE_MEMFDS, "12")
        else:
            attacker = attack(server, SPARSE_ARENAS, "2")
        lines = read_until(attacker, "done")
        grown = group.usage() - base
        report(f"sparse {kind}", server, cgroup_base_MiB=base // MiB, cgroup_grown_MiB=grown // MiB,
               cgroup_peak_MiB=group.peak() // MiB, attacker_said=lines[:2] + lines[-2:])
        assert server.alive(), "the server was killed"
        assert lines[-1] == "done", lines
        assert all("ERROR 1 " in line or "EOF" in line or "gone" in line for line in lines[:-1]), lines
        # 12 x 64 MiB of holes (or 2 connections x 4 arenas x 128 MiB): nothing of it is charged to us.
        assert grown < 32 * MiB, f"the server's cgroup grew by {grown // MiB} MiB"
        assert server.rss_kb().get("RssShmem", 0) < 16 * 1024
        assert server.trusted_request() == b"ok:5"
        stats = server.stats()
        assert stats["rejected"] >= 1
        assert stats["received"] == 2  # the trusted request and this one: nothing of the attacker's
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.wait()
        if server is not None:
            server.close()
        group.close()


# -- (b) the wedged closer -------------------------------------------------------

WEDGE = r"""
import threading
rounds = int(sys.argv[2])
held = []

def wedge():
    # A loopback TCP connection whose receiver never reads: fill its send queue, linger forever.
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the never-accepted peer
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    held.append(lst)
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    tcp.connect(lst.getsockname())
    tcp.setblocking(False)
    full = 0
    while full < 5:  # until the peer's window is shut and our queue stays full
        try:
            tcp.send(b"x" * 65536)
            full = 0
        except BlockingIOError:
            full += 1
            time.sleep(0.05)
    unsent = struct.unpack("i", fcntl.ioctl(tcp.fileno(), 0x5411, b"\0" * 4))[0]  # SIOCOUTQ
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 2**31 - 1))
    # Park it in flight inside a socketpair: we hold no reference to it afterwards.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    send(a, b"p", [tcp.fileno()])
    tcp.close()
    a.close()
    s = connect()
    send(s, header(MESSAGE, 0, 1) + b"w", [b.fileno()])
    # Our close must not be the last one (then *we* would block in the TCP close):
    # when the server was quicker, try again.
    closing = threading.Thread(target=b.close, daemon=True)
    closing.start()
    closing.join(2.0)
    return unsent, not closing.is_alive(), s

for attempt in range(5):
    unsent, ours_returned, s = wedge()
    if ours_returned:
        break
say("tcp queue", unsent, "attempts", attempt + 1)
say("wedge sent", answer(s))
null = os.open("/dev/null", os.O_RDONLY)
outcomes = []
for r in range(rounds):
    try:
        s = connect()
        for p in range(3):
            send(s, header(REQUEST, p + 1, 1) + b"x", [null] * 253)
        outcomes.append(answer(s))
    except OSError as exc:
        outcomes.append("gone (%s)" % exc.__class__.__name__)
say("outcomes", " | ".join(sorted(set(outcomes))))
say("done")
sys.stdin.readline()  # keep the TCP listener (and so the wedge) alive until told
"""


def test_wedged_closer_and_fd_floods(impl, sockdir):
    """F2: a close that never returns plus packets of 253 fds: the attacker is cut off, fds bounded."""
    server = ServerProcess(sockdir, impl, nofile=1024)
    attacker = None
    try:
        assert server.trusted_request() == b"ok:5"
        base = server.fds()
        attacker = attack(server, WEDGE, "30")
        lines = read_until(attacker, "done")
        peak = server.fds()
        try:
            trusted = server.trusted_request(timeout=10)
        except machipc.IPCError as exc:
            trusted = repr(exc)
        report("wedged closer", server, base_fds=base, fds_during=peak, trusted=trusted, attacker_said=lines)
        assert lines[-1] == "done", lines
        assert int(lines[0].split()[2]) > 0, "the TCP FIN could be sent: no wedge"
        assert server.alive()
        assert trusted == b"ok:5"
        assert peak < 900, f"server fd table at {peak} of 1024"
        stats = server.stats()
        print("server stats:", stats)
        assert stats["disconnected"].get("unexpected fds", 0) >= 1
        assert stats["dropped"].get("CLOSE_BUDGET", 0) >= 1  # later connections of that uid refused
        assert "REPLY" not in " ".join(lines)
    finally:
        if attacker is not None:
            attacker.kill()  # resets the TCP connection: the stuck close returns
            attacker.wait()
        server.close()


# -- (c) idle connections ----------------------------------------------------------

IDLE = r"""
count = int(sys.argv[2])
held = []
for i in range(count):
    try:
        held.append(connect())
    except OSError as exc:
        say("connect", i, exc)
        break
say("holding", len(held))
say("done")
sys.stdin.readline()
"""


def test_idle_connections_of_one_uid_are_capped(impl, sockdir):
    """F3: ~600 idle connections of uid 65534 against a 1024-fd server."""
    server = ServerProcess(sockdir, impl, nofile=1024)
    attacker = None
    try:
        attacker = attack(server, IDLE, "600")
        lines = read_until(attacker, "done")
        settled = wait_for(lambda: server.fds() < 700 or not server.alive())  # refused ones close on the closer
        try:
            trusted = server.trusted_request(timeout=10)
        except machipc.IPCError as exc:
            trusted = repr(exc)
        report("idle connections", server, trusted=trusted, attacker_said=lines)
        assert lines[-1] == "done", lines
        assert settled and server.alive()
        assert trusted == b"ok:5"
        stats = server.stats()
        assert stats["dropped"].get("CONN_LIMIT", 0) >= 600 - 256
        assert server.fds() < 700
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.wait()
        server.close()


# -- (c2) batches: one decision per packet, never split for a refused sender ------------

BATCHES = r"""
conns = int(sys.argv[2])
largest = struct.pack("<I", 0) * 16384  # 16,384 empty items: the most one 65,536-byte body holds
malformed = struct.pack("<I", 0) * 16383 + b"\x01\x00"  # the same, its last prefix cut short
for c in range(conns):
    s = connect()
    sent = 0
    try:
        for i in range(4):
            send(s, header(MESSAGE, 0, len(malformed), 4) + malformed)  # BATCH = flag bit 2
        for i in range(40):
            send(s, header(MESSAGE, 0, len(largest), 4) + largest)
            sent += 1
    except OSError as exc:
        say("conn", c, "sent", sent, "then", exc.__class__.__name__)
    else:
        say("conn", c, "sent", sent, "then", answer(s))
    s.close()
say("done")
sys.stdin.readline()
"""


def test_a_refused_senders_batches_are_counted_per_item_and_hung_up_on_per_packet(impl, sockdir):
    """The largest batches (16,384 messages a packet) from uid 65534: each packet is one decision
    and one of max_rejections (16), each message one in ``rejected``; malformed ones are dropped
    whole; the server keeps serving."""
    server = ServerProcess(sockdir, impl)
    attacker = None
    try:
        attacker = attack(server, BATCHES, "3")
        lines = read_until(attacker, "done")
        asked = []  # the trusted stats requests: all the server may have received

        def stats() -> dict:
            asked.append(1)
            return server.stats()

        settled = wait_for(lambda: stats()["disconnected"].get("rejected", 0) == 3)
        report("batches", server, attacker_said=lines)
        assert lines[-1] == "done", lines
        assert settled and server.alive()
        figures = stats()
        assert figures["rejected"] == 3 * 16 * 16384  # 16 packets a connection, then hung up on
        assert figures["dropped"].get("BAD_BATCH", 0) == 3 * 4
        assert figures["received"] == len(asked)  # nothing of the attacker's
        assert server.trusted_request() == b"ok:5"
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.wait()
        server.close()


# -- (d) hugetlbfs arenas and payloads ---------------------------------------------

HUGE_ARENA = r"""
HUGE = 2 << 20
MFD_HUGETLB = 4
s = connect()
fd = os.memfd_create("attack", os.MFD_ALLOW_SEALING | MFD_HUGETLB)
os.ftruncate(fd, 2 * HUGE)
m = mmap.mmap(fd, 2 * HUGE)
m[:] = b"x" * (2 * HUGE)  # take the pool's pages
m.close()
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS_ARENA)
send(s, header(REQUEST, 1, 65536 + 1, ARENA | PAYLOAD_FD) + REF.pack(7, 0, 0, 65537), [fd])
say("announce", answer(s))
libc = __import__("ctypes").CDLL(None, use_errno=True)
# FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: the server's mapping (if any) loses its pages
say("punch", libc.fallocate(fd, 3, __import__("ctypes").c_long(0), __import__("ctypes").c_long(2 * HUGE)))
hogs = []
while True:  # use the pool up again: a fault of the server would find no page
    hog = os.memfd_create("hog", MFD_HUGETLB)
    os.ftruncate(hog, HUGE)
    try:
        h = mmap.mmap(hog, HUGE)  # a shared hugetlb mapping reserves its page here (ENOMEM when none)
    except OSError:
        break
    h[:] = b"y" * HUGE
    hogs.append((hog, h))
say("pool taken", len(hogs))
for i in range(3):
    try:
        send(s, header(REQUEST, 2 + i, 65537, ARENA) + REF.pack(7, 0, 0, 65537))
        say("reference", i, answer(s))
    except OSError as exc:
        say("reference", i, "gone", exc)
say("done")
sys.stdin.readline()
"""


@pytest.fixture
def huge_pages():
    """Two free 2 MiB huge pages for the test (nr_hugepages restored after), or a skip."""
    knob = "/proc/sys/vm/nr_hugepages"
    try:
        with open(knob) as f:
            before = int(f.read())
        with open(knob, "w") as f:
            f.write(str(before + 2))
    except OSError as exc:
        pytest.skip(f"no huge pages: cannot raise {knob}: {exc}")
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) for line in f if line.startswith("HugePages_Free"))
        if free < 2:
            pytest.skip(f"no huge pages: {knob} raised but only {free} free")
        yield
    finally:
        with open(knob, "w") as f:
            f.write(str(before))


def test_hugetlb_arena_of_a_rejected_sender_cannot_sigbus(impl, sockdir, huge_pages):
    """F11: a hugetlbfs arena, then a hole punched and the pool used up: no SIGBUS."""
    server = ServerProcess(sockdir, impl)
    attacker = None
    try:
        attacker = attack(server, HUGE_ARENA)
        lines = read_until(attacker, "done")
        report("hugetlb arena", server, exit=server.proc.poll(), attacker_said=lines)
        assert lines[-1] == "done", lines
        assert server.alive(), f"server exit status {server.proc.poll()} (-7 is SIGBUS)"
        assert server.trusted_request() == b"ok:5"
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.wait()
        server.close()


def test_hugetlb_payloads_are_refused_even_when_allowed(serve, sockdir, huge_pages):
    """An allowed sender's hugetlbfs memfd or arena is refused (NOT_SHMEM) before mapping."""
    import array
    import fcntl
    import mmap
    import socket

    from machipc import arena, payload, wire

    srv = serve()
    huge = 2 * MiB
    for flags, body, seals in (
        (wire.Flag.PAYLOAD_FD, b"", payload.REQUIRED_SEALS),
        (wire.Flag.PAYLOAD_FD | wire.Flag.ARENA, arena.REF.pack(9, 0, 0, 65537), arena.ARENA_SEALS),
    ):
        fd = os.memfd_create("huge", os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
        os.ftruncate(fd, huge)
        m = mmap.mmap(fd, huge)
        m[:] = b"z" * huge
        m.close()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        length = huge if body == b"" else 65537
        raw = raw_connect(srv.path, 10)
        raw.sendmsg([wire.pack_header(wire.Kind.REQUEST, 5, length, flags), body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        os.close(fd)
        pkt = raw.recv(1000)
        assert wire.HEADER.unpack_from(pkt)[2] == wire.Kind.ERROR
        assert wire.unpack_error(pkt[24:])[0] == wire.ErrorCode.MALFORMED
        raw.close()
    assert wait_for(lambda: srv.stats.dropped["NOT_SHMEM"] == 2), dict(srv.stats.dropped)


# -- (e) an unmappable payload has its own error code ------------------------------


def test_unmappable_payload_is_not_too_large(impl, sockdir):
    """Item 10: a payload the server cannot map (ENOMEM) is NO_MEMORY / ServerBusy, not TOO_LARGE."""
    server = ServerProcess(sockdir, impl, address_space=32 * MiB)
    try:
        with machipc.Client(NAME, directory=sockdir, impl=impl, timeout=10) as cli:
            with pytest.raises(machipc.ServerBusy) as info:
                cli.request(b"x" * (48 * MiB), timeout=30)
            print("48 MiB payload to a server with 32 MiB of address space left:", info.value)
            assert cli.request(b"small", timeout=10) == b"ok:5"
        stats = server.stats()
        assert stats["dropped"].get("UNMAPPABLE", 0) == 1, stats
        assert stats["too_large"] == 0
    finally:
        server.close()


def test_mapped_bytes_budget(serve, client):
    """A payload over the connection's mapped-bytes budget is OVER_BUDGET, and counted."""
    held = []
    srv = serve(lambda m: held.append(m.data) or b"kept", max_mapped_per_connection=3 * MiB)
    cli = client()

    def sealed(fill: bytes):  # a loaned buffer travels as a sealed memfd, mapped by the server
        buf = cli.buffer(2 * MiB)
        buf[:] = fill * (2 * MiB)
        return buf

    assert cli.request(sealed(b"a"), timeout=10) == b"kept"  # mapped, held by the handler
    with pytest.raises(machipc.ServerBusy):
        cli.request(sealed(b"b"), timeout=10)
    assert srv.stats.dropped["OVER_BUDGET"] == 1
    for view in held:
        view.release()
    held.clear()
    import gc

    gc.collect()
    assert cli.request(sealed(b"c"), timeout=10) == b"kept"  # refunded when the view went
    # An arena (8 MiB at least) does not fit either.
    with pytest.raises(machipc.ServerBusy):
        cli.request(b"d" * (100 * 1024), timeout=10)
    assert srv.stats.dropped["OVER_BUDGET"] == 2


def test_a_connection_with_only_rejected_packets_is_hung_up_on(serve, impl, sockdir):
    """Peers whose every packet is rejected are disconnected after max_rejections."""
    srv = serve(policy=machipc.policies.Allowlist(uids={12345}), max_rejections=3)
    with machipc.Client("org.test.svc", directory=sockdir, impl=impl, timeout=5) as cli:
        for _ in range(3):
            with pytest.raises(machipc.Rejected):
                cli.request(b"x", timeout=5)
        with pytest.raises((machipc.PeerGone, machipc.Rejected)):
            cli.request(b"x", timeout=5)
    assert srv.stats.disconnected["rejected"] == 1


def test_enforce_false_still_takes_the_payload(serve, client):
    """Report-only mode: a sender the policy would reject still gets its large payload through."""
    srv = serve(lambda m: b"%d" % len(m.data), policy=machipc.policies.Allowlist(uids={12345}), enforce=False)
    cli = client()
    assert cli.request(b"s" * (3 * MiB), timeout=10) == b"%d" % (3 * MiB)  # an arena
    buf = cli.buffer(2 * MiB)
    buf[:] = b"m" * (2 * MiB)
    assert cli.request(buf, timeout=10) == b"%d" % (2 * MiB)  # a sealed memfd
    assert srv.stats.would_reject == 2 and srv.stats.rejected == 0


@pytest.mark.parametrize("allowed", [False, True])
def test_aio_server_maps_payloads_of_allowed_senders_only(impl, sockdir, allowed):
    """machipc.aio goes through the same admission: a rejected sender's arena is never mapped."""
    import asyncio

    from machipc import aio

    policy = machipc.policies.SameUser() if allowed else machipc.policies.Allowlist(uids={12345})

    held = []  # the handler keeps its messages' payloads mapped

    async def main():
        async with aio.Server("org.test.aio", policy, directory=sockdir, impl=impl) as srv:
            serving = asyncio.create_task(srv.serve(lambda m: held.append(m.data) or b"%d" % len(m.data)))
            async with aio.Client("org.test.aio", directory=sockdir, impl=impl) as cli:
                for _ in range(3):
                    try:
                        assert await cli.request(b"a" * (200 * 1024), timeout=10) == b"204800"
                    except machipc.Rejected:
                        assert not allowed
                mapped = srv.sync._transport.budget.used  # memfds held, or the client's arena
            srv.stop()
            await serving
            return mapped

    mapped = asyncio.run(main())
    assert (mapped > 0) == allowed, mapped
