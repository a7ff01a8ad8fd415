"""execve() and fork() on an open connection: who sent each packet (both transports, real processes).

A process keeps its pid, its pidfd and its connection across ``execve()``; a
forked child shares the connection of its parent. The Peer a handler sees must
describe the program that sent the packet, every policy must be asked again
after an exec, and a packet that cannot be pinned must never vanish silently.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import pytest

import machipc
from machipc import wire
from machipc.policies import Decision, Policy, SameDirectory, SameUser
from machipc.server import UNPINNED_TEXT
from machipc.wire import ErrorCode, Kind
from test_policies_processes import ALLOWED, REJECTED, Running, client, dirs, serve  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/exe"), reason="needs Linux /proc")


class Recording(Running):
    """A Running server whose handler records what ``msg.sender`` says about each message."""

    def __init__(self, policy, **kwargs):
        self.seen: list[tuple[int, str]] = []
        super().__init__(policy, **kwargs)
        self.srv.close()
        self.thread.join(5)
        self.srv = machipc.Server(self.srv.name, policy=policy, directory=self.sockdir, **kwargs)
        self.thread = threading.Thread(target=self.srv.serve, args=(self.handle,), daemon=True)
        self.thread.start()

    def handle(self, msg):
        self.seen.append((msg.sender.pid, msg.sender.exe))
        return b"ok"


class OnlyTrusted(Policy):
    """A user policy that reads the executable and does not say so (uses_exe is left at the default)."""

    def __init__(self, path):
        self.path = path

    def check(self, peer):
        if peer.exe == self.path:
            return Decision.allow("the trusted client")
        return Decision.deny(f"{peer.exe} is not the trusted client")


class CountingUid(SameUser):
    """A uid policy, declared not to look at the executable, that counts how often it is asked."""

    uses_exe = False

    def __init__(self):
        super().__init__()
        self.calls = 0

    def check(self, peer):
        self.calls += 1
        return super().check(peer)


@pytest.fixture(params=["py", "c"], ids=lambda i: f"{i}-transport")
def impl(request):
    if request.param == "c":
        pytest.importorskip("machipc._unix")
    return request.param


def test_handler_sees_the_program_that_sent_each_packet(dirs, impl):  # noqa: F811
    """F10: after execve() on the connection, msg.sender describes the new program, while the
    policy (uid) keeps deciding; the uid policy is asked again once the exec is seen."""
    policy = CountingUid()
    r = Recording(policy, impl=impl)
    try:
        inside, outside = client(dirs, "trusted"), client(dirs, "outside")
        done = r.run(inside, "request", outside)
        assert (done.stdout.strip(), done.returncode) == (b"first=0", ALLOWED)
        assert [exe for _pid, exe in r.seen] == [inside, outside]
        assert r.seen[0][0] == r.seen[1][0]  # one process, two programs
        assert policy.calls == 2  # asked again after the exec
    finally:
        r.close()


def test_user_policy_subclass_is_asked_again_after_exec(dirs, serve):  # noqa: F811
    """F10: a Policy subclass that reads peer.exe without declaring uses_exe is not cached across exec."""
    inside, outside = client(dirs, "trusted"), client(dirs, "outside")
    r = serve(OnlyTrusted(inside))
    done = r.run(inside, "request", outside)
    assert (done.stdout.strip(), done.returncode) == (b"first=0", REJECTED)
    done = r.run(outside, "request", inside)
    assert (done.stdout.strip(), done.returncode) == (b"first=4", ALLOWED)


def _packet(kind: int, request_id: int, text: bytes) -> bytes:
    return wire.pack_header(kind, request_id, len(text)) + text


@pytest.mark.parametrize("first", ["request", "message"])
def test_forked_childs_first_packet_is_answered_or_counted_never_lost(impl, tmp_path, caplog, first):
    """F5/F6 of issue 13 item 5: the first packet of a forked child on its parent's connection
    cannot be pinned (it came before SO_PASSPIDFD was on). An exe policy cannot decide it: a
    request gets an error that says to send again, a one-way message is counted and logged.
    A packet it sends after that one was read carries its own pidfd and is decided on the
    child's program. (Packets queued together with the first are read in the same recvmmsg
    batch, before per-packet pidfds were asked for: the child waits for the server to have read
    its first packet.)"""
    caplog.set_level(logging.WARNING, "machipc")
    python_dir = os.path.dirname(os.readlink("/proc/self/exe"))
    with machipc.Server("org.test.fork", policy=SameDirectory(python_dir), directory=str(tmp_path), impl=impl) as srv:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.connect(srv.path)
        raw.send(_packet(Kind.MESSAGE, 0, b"parent"))
        assert srv.receive(timeout=10).sender.pid == os.getpid()
        raw.settimeout(10)
        assert wire.HEADER.unpack_from(raw.recv(70000))[2] == Kind.HELLO  # sent at accept, first
        r, w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its first packet, then a request, then it reports the replies
            try:
                os.close(r)
                if first == "request":
                    raw.send(_packet(Kind.REQUEST, 1, b"child first"))
                    reply1 = raw.recv(70000)
                else:
                    raw.send(_packet(Kind.MESSAGE, 0, b"child first"))
                    reply1 = b""
                    os.read(go_r, 1)  # the server has read it
                raw.send(_packet(Kind.REQUEST, 2, b"child second"))
                reply2 = raw.recv(70000)
                os.write(w, len(reply1).to_bytes(4, "little") + reply1 + reply2)
            finally:
                os._exit(0)
        os.close(w)
        try:
            if first == "message":  # counted, not handed on: wait until the server has read it
                deadline = time.monotonic() + 20
                while srv.stats.rejected == 0 and time.monotonic() < deadline:
                    with pytest.raises(machipc.IPCTimeoutError):
                        srv.receive(timeout=0.05)
                os.write(go_w, b"x")
            second = srv.receive(timeout=20)
            assert bytes(second.data) == b"child second" and second.sender.pid == pid
            assert second.sender.guard is not None and second.sender.exe is not None
            second.reply(b"ok")
            data = b""
            while chunk := os.read(r, 70000):
                data += chunk
            n = int.from_bytes(data[:4], "little")
            reply1, reply2 = data[4 : 4 + n], data[4 + n :]
            assert reply2[3] == Kind.REPLY
            assert srv.stats.rejected == 1 and srv.stats.unknown == 1
            assert "no pidfd pins the sender" in caplog.text
            if first == "request":
                assert reply1[3] == Kind.ERROR
                code, text = wire.unpack_error(reply1[wire.HEADER_SIZE :])
                assert code == ErrorCode.REJECTED and text == UNPINNED_TEXT
        finally:
            for fd in (r, go_r, go_w):
                os.close(fd)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            raw.close()
