"""The per-connection cached admission under attack, with real processes.

The server (in this process, root) caches the decision about a connection's
last sender (``Conn.cache_admission``); the transport then lets that
process's later packets through by itself. Here another process writes on
the same connection (it inherited the fd across ``setpriv``, so it runs as
uid 65534 with its own pid), interleaved with the process that connected:
none of its packets may come out as the cached sender's, nor skip a check
the server would have made. Both transports.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

import machipc
from machipc import wire
from machipc.policies import Allowlist
from machipc.wire import Kind

from conftest import wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to write as uid 65534 on an inherited connection",
)

NAME = "org.test.admission"
NOBODY = 65534
SO_SNDBUFFORCE = 32  # (Linux; root)
# argv[1]: the inherited fd; argv[2]: how many one-way packets b0, b1, ... to send.
# It sends them, says so, and stays alive until its stdin closes (so its pid stays its own).
WRITER = r"""
import socket, struct, sys
s = socket.socket(fileno=int(sys.argv[1]))
for i in range(int(sys.argv[2])):
    data = b"b%d" % i
    s.send(struct.pack("<HBBIQQ", 0x696D, 2, 1, 0, 0, len(data)) + data)
print("sent", flush=True)
sys.stdin.read()
"""


# argv[1]: the inherited fd. Each stdin line "START COUNT" sends one-way packets bSTART, ...;
# it answers "ok" when they are queued, and stays alive until its stdin closes.
ROUNDS = r"""
import socket, struct, sys
s = socket.socket(fileno=int(sys.argv[1]))
for line in sys.stdin:
    start, count = map(int, line.split())
    for i in range(start, start + count):
        data = b"b%d" % i
        s.send(struct.pack("<HBBIQQ", 0x696D, 2, 1, 0, 0, len(data)) + data)
    print("ok", flush=True)
"""


def _one_way(data: bytes) -> bytes:
    return wire.pack_header(Kind.MESSAGE, 0, len(data)) + data


def _as_nobody(sock, count: int) -> subprocess.Popen:
    """A uid-65534 process writing ``count`` packets on ``sock`` (inherited), alive until its stdin closes."""
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", WRITER,
         str(sock.fileno()), str(count)],
        pass_fds=(sock.fileno(),), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "sent"
    return proc


def _connect(path: str) -> socket.socket:
    """A hand-driven connection (the server's HELLO is left unread)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.settimeout(10)
    return s


def _count_admits(srv: machipc.Server) -> list:
    """Make ``srv._admit`` record the packets the server itself judged (the rest: cached admissions)."""
    calls: list = []
    admit = srv._admit

    def counting(got):
        calls.append((got.pid, got.kind))
        return admit(got)

    srv._admit = counting
    return calls


def _drain(srv: machipc.Server) -> list:
    out = []
    while True:
        try:
            out.append(srv.receive(timeout=1.0))
        except machipc.IPCTimeoutError:
            return out


def test_a_cooled_down_process_writing_on_a_cached_connection_is_not_let_through(impl, sockdir):
    """uid 65534 is in a cool-down (it left replies unread); it writes on a connection whose
    owner (root) is cached as allowed. The server refuses its first packets for the
    cool-down without judging them; its later ones must not pass the transport as root's."""
    policy = Allowlist(uids={os.geteuid(), NOBODY})
    with machipc.Server(NAME, policy, directory=sockdir, impl=impl, offender_strikes=1) as srv:
        assert srv.offenders.strike(NOBODY)  # (what Server._cut_off does for unread replies)
        sock = _connect(srv.path)
        sock.send(_one_way(b"a0"))
        first = srv.receive(timeout=10)
        assert first.sender.pid == os.getpid()  # root's process is now the cached sender
        for i in range(1, 16):  # a recvmmsg batch's worth, so the other process's packets span batches
            sock.send(_one_way(b"a%d" % i))
        writer = _as_nobody(sock, 40)
        base = _fds()
        try:
            got = _drain(srv)
            # Refused unjudged, each of its later packets came with a pidfd nobody took: closed.
            assert wait_for(lambda: _fds() <= base, 20), f"{_fds() - base} fds more than before"
        finally:
            writer.stdin.close()
            writer.wait(10)
            sock.close()
        leaked = [(bytes(m.data), m.sender.pid, m.sender.uid) for m in got if not bytes(m.data).startswith(b"a")]
        assert not leaked, f"packets of pid {writer.pid} uid {NOBODY} (in its cool-down) handed on as: {leaked[:3]}"
        assert all(m.sender.pid == os.getpid() for m in got)
        assert srv.stats.cooled_down >= 1


def test_interleaved_senders_on_one_connection_keep_their_own_identity_and_decision(impl, sockdir):
    """root's process (allowed, cached) and a uid-65534 process (refused) take turns on one
    connection, in runs that start and end inside and across the server's recvmmsg batches
    (16 packets): each allowed packet comes as root's process, none of the other's is handed
    on, and every one of those is counted as rejected, whether the server or a cached
    admission refused it."""
    with machipc.Server(NAME, directory=sockdir, impl=impl, max_rejections=None) as srv:
        sock = _connect(srv.path)
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)  # room for every run, queued at once
        sock.send(_one_way(b"a0"))
        assert srv.receive(timeout=10).sender.pid == os.getpid()
        judged = _count_admits(srv)
        writer = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", ROUNDS,
             str(sock.fileno())], pass_fds=(sock.fileno(),), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        a = b = 0
        try:
            for ours, theirs in ((3, 1), (1, 2), (12, 5), (1, 1), (20, 20), (15, 1), (1, 15), (2, 30)):
                for _ in range(ours):
                    a += 1
                    sock.send(_one_way(b"a%d" % a))
                writer.stdin.write(f"{b} {theirs}\n")
                writer.stdin.flush()
                assert writer.stdout.readline().strip() == "ok"
                b += theirs
            sock.send(_one_way(b"end"))
            got = []
            while not got or bytes(got[-1].data) != b"end":
                got.append(srv.receive(timeout=10))
        finally:
            writer.stdin.close()
            writer.wait(10)
            sock.close()
        assert [bytes(m.data) for m in got] == [b"a%d" % i for i in range(1, a + 1)] + [b"end"]
        assert {(m.sender.pid, m.sender.uid) for m in got} == {(os.getpid(), os.geteuid())}
        assert all(m.decision.allowed for m in got)
        assert srv.stats.rejected == b and srv.stats.received == a + 2
        print(f"{a + b + 2} packets, {len(judged)} judged by the server, the rest by cached admissions")
        assert len(judged) < a + b  # (the cache was at work, for both senders)


# uid 65534 (system python3, no machipc): argv[1] the socket path, argv[2] rounds. It connects,
# forks, and parent and child take turns (a pipe passes the turn) sending one-way packets with a
# sealed memfd payload each, so every packet the server reads brings a payload fd and, once the
# server asks for per-packet pidfds, a pidfd of a sender other than the previous one's.
TAKING_TURNS = r"""
import array, fcntl, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
rounds = int(sys.argv[2])
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

def send():
    fd = os.memfd_create("payload", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    header = struct.pack("<HBBIQQ", 0x696D, 2, 1, 1, 0, 1 << 20)  # MESSAGE, PAYLOAD_FD
    s.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    os.close(fd)

to_child, to_parent = os.pipe(), os.pipe()
child = os.fork()
mine, theirs = (to_child[0], to_parent[1]) if child == 0 else (to_parent[0], to_child[1])
if child:
    send()
    os.write(theirs, b"x")
for _ in range(rounds):
    os.read(mine, 1)
    send()
    os.write(theirs, b"x")
if child:  # (the parent sends last)
    print("sent", flush=True)
sys.stdin.read()
"""


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_connection_dropped_with_packets_of_a_batch_still_waiting_leaks_no_fds(impl, sockdir):
    """uid 65534's parent and child take turns on one connection, each packet with a memfd
    payload (and, after the first few, its own pidfd). The server hangs up at max_rejections
    while packets of the last recvmmsg batch still wait: their memfds and pidfds are closed."""
    os.chmod(sockdir, 0o755)  # reachable by uid 65534
    # 24: in the middle of the second batch of 16, whose packets each bring their own pidfd
    with machipc.Server(NAME, directory=sockdir, impl=impl, max_rejections=24) as srv:
        attacker = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
             TAKING_TURNS, srv.path, "20"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        base = _fds()  # (the attacker's pipes included; its connection is not accepted yet)
        try:
            assert attacker.stdout.readline().strip() == "sent"  # 41 packets queued
            with pytest.raises(machipc.IPCTimeoutError):
                srv.receive(timeout=2.0)
            stats = srv.stats
            assert stats.disconnected["rejected"] == 1 and stats.rejected == 24 and stats.received == 0
            assert wait_for(lambda: _fds() <= base, 20), f"{_fds() - base} fds of the dropped connection still open"
        finally:
            attacker.stdin.close()
            attacker.wait(10)


# argv[1]: the fd of a socket; argv[2]: the server's path, or "" when it is connected already.
# It connects it (if asked), waits for a line on stdin, sends one one-way packet naming its pid,
# says so, and stays alive until its stdin closes.
ON_SOCKET = r"""
import os, socket, struct, sys
s = socket.socket(fileno=int(sys.argv[1]))
if sys.argv[2]:
    s.connect(sys.argv[2])
sys.stdin.readline()
data = b"from %d" % os.getpid()
s.send(struct.pack("<HBBIQQ", 0x696D, 2, 1, 0, 0, len(data)) + data)
print("sent", flush=True)
sys.stdin.read()
"""


def _on_socket(sock: socket.socket, path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ON_SOCKET, str(sock.fileno()), path], pass_fds=(sock.fileno(),),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _send(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "sent"


@pytest.mark.skipif(not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK), reason="needs a writable ns_last_pid to reuse a pid")
def test_a_new_process_with_the_connecting_processs_pid_is_not_taken_for_it(impl, sockdir):
    """The process that connected (pinned at accept, cached as allowed) exits; a new process
    gets its pid (ns_last_pid) and sends on the connection it inherited, same uid and gid: the
    liveness check of the pinned process must see the first one gone, so the packet is not
    attributed to it (nor let through by its cached admission)."""
    with machipc.Server(NAME, directory=sockdir, impl=impl) as srv:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        first = _on_socket(sock, srv.path)
        _send(first)
        msg = srv.receive(timeout=10)
        assert bytes(msg.data) == b"from %d" % first.pid and msg.sender.pid == first.pid and msg.sender.guard is not None
        pinned = msg.sender
        first.stdin.close()
        first.wait(10)
        reuse = None
        try:
            for _ in range(50):  # other processes on the machine may take the pid first
                with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                    f.write(str(first.pid - 1))
                reuse = _on_socket(sock, "")
                if reuse.pid == first.pid:
                    break
                reuse.kill()
                reuse.wait(10)
                reuse = None
            if reuse is None:
                pytest.skip(f"pid {first.pid} was taken by other processes 50 times")
            _send(reuse)
            again = srv.receive(timeout=10)
        finally:
            if reuse is not None:
                reuse.stdin.close()
                reuse.wait(10)
            sock.close()
        assert bytes(again.data) == b"from %d" % first.pid
        assert again.sender is not pinned and again.sender.guard is None  # unpinned: nothing names it soundly
        assert again.sender.exe is None
