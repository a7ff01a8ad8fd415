"""Peer: race-free identity, guards, unknown reasons, and peer_of() on real sockets."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

import pytest

import machipc
from machipc import peer as peer_mod
from machipc.peer import (
    GUARD_NONE,
    GUARD_PIDFS,
    GUARD_PIDVERSION,
    GUARD_STARTTIME,
    UNKNOWN_GONE,
    Peer,
    peer_of,
    process_alive,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux pidfd and /proc")


def own_peer() -> Peer:
    return Peer.from_pidfd(os.getpid(), os.getuid(), os.getgid(), os.pidfd_open(os.getpid()))


def child_peer(argv) -> tuple[subprocess.Popen, Peer]:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE)
    return p, Peer.from_pidfd(p.pid, os.getuid(), os.getgid(), os.pidfd_open(p.pid))


# -- exe, exe_id, exe_sha256 ------------------------------------------------------------


def test_exe_of_own_process():
    p = own_peer()
    assert p.exe == os.readlink("/proc/self/exe")
    st = os.stat("/proc/self/exe")
    assert p.exe_id == (st.st_dev, st.st_ino)
    assert p.exe_sha256 == hashlib.sha256(open("/proc/self/exe", "rb").read()).hexdigest()
    assert p.unknown_reason is None


def test_exe_sha256_hashes_the_running_inode_even_when_deleted(tmp_path):
    sleeper = tmp_path / "sleeper"
    shutil.copy2(shutil.which("sleep"), sleeper)
    expected = hashlib.sha256(sleeper.read_bytes()).hexdigest()
    proc, p = child_peer([str(sleeper), "30"])
    try:
        time.sleep(0.1)
        sleeper.unlink()
        sleeper.write_bytes(b"#!/bin/sh\necho impostor\n")  # a new file under the old name
        assert p.exe.endswith(" (deleted)")
        assert p.exe_sha256 == expected
    finally:
        proc.kill()
        proc.wait()


def test_exe_of_exited_process_is_unknown():
    proc, p = child_peer([shutil.which("true")])
    proc.wait()
    assert not p.is_alive()
    assert p.exe is None and p.exe_sha256 is None
    assert p.unknown_reason == UNKNOWN_GONE


def test_live_pid_with_dead_pidfd_lends_nothing():
    """Simulated pid reuse: the pid names a live process, the pidfd a dead one."""
    proc, dead = child_peer([shutil.which("true")])
    proc.wait()
    impostor = Peer(os.getpid(), os.getuid(), os.getgid(), dead.pidfd, dead.guard, dead.guard_kind)
    dead._pidfd = -1  # the impostor owns it now
    assert os.path.exists(f"/proc/{os.getpid()}/exe")
    assert impostor.exe is None and impostor.unknown_reason == UNKNOWN_GONE


def test_exec_changes_exe_id_and_refresh_notices():
    proc, p = child_peer(["/bin/sh", "-c", "read x; exec sleep 30"])
    try:
        first_exe, first_id = p.exe, p.exe_id
        first_sha = p.exe_sha256
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        for _ in range(100):
            if os.readlink(f"/proc/{proc.pid}/exe") != first_exe:
                break
            time.sleep(0.02)
        assert p.exe == first_exe  # the snapshot stays until refreshed
        new_id = p.refresh_exe()
        assert new_id != first_id and p.exe == os.path.realpath(shutil.which("sleep"))
        assert p.exe_sha256 != first_sha
        assert p.key == (proc.pid, p.guard)  # pid and pidfd survive exec
    finally:
        proc.kill()
        proc.wait()


def test_unreadable_exe_fails_with_reason():
    try:
        os.readlink("/proc/2/exe")
        pytest.skip("pid 2 has a readable executable here (not kthreadd)")
    except OSError:
        pass
    try:
        fd = os.pidfd_open(2)
    except OSError:
        pytest.skip("cannot pidfd_open pid 2")
    p = Peer.from_pidfd(2, 0, 0, fd)
    assert p.exe is None
    assert "cannot read /proc/2/exe" in p.unknown_reason


def test_no_pidfd_means_unknown():
    p = Peer(os.getpid(), os.getuid(), os.getgid())
    assert p.exe is None and "no pidfd" in p.unknown_reason
    assert p.guard_kind == GUARD_NONE and not p.is_alive()


def test_code_signature_attributes_are_none_on_linux():
    p = own_peer()
    assert p.code_identifier is None and p.team_id is None
    assert "do not exist" in p.unknown_reason


# -- guards and liveness ------------------------------------------------------------------


def test_guards_and_process_alive(monkeypatch):
    proc, p = child_peer([shutil.which("sleep"), "30"])
    assert p.guard_kind == GUARD_PIDFS and process_alive(p.pid, p.guard, p.guard_kind)
    monkeypatch.setattr(peer_mod, "_pidfs", False)
    q = Peer.from_pidfd(proc.pid, 0, 0, os.pidfd_open(proc.pid))
    assert q.guard_kind == GUARD_STARTTIME and process_alive(q.pid, q.guard, q.guard_kind)
    assert not process_alive(q.pid, q.guard + 1, q.guard_kind)
    proc.kill()
    proc.wait()
    assert not process_alive(p.pid, p.guard, p.guard_kind)
    assert not process_alive(q.pid, q.guard, q.guard_kind)
    assert not process_alive(1, None, GUARD_PIDFS)


def test_from_audit_token_words_and_bytes():
    words = (501, 502, 20, 503, 21, 4242, 100001, 77)
    for token in (words, struct.pack("8I", *words)):
        p = Peer.from_audit_token(token)
        assert (p.pid, p.uid, p.gid, p.guard, p.guard_kind) == (4242, 502, 20, 77, GUARD_PIDVERSION)
        assert p.audit_token == words
    with pytest.raises(ValueError):
        Peer.from_audit_token((1, 2, 3))


# -- peer_of -------------------------------------------------------------------------------------


def test_peer_of_socketpair_is_self():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        p = peer_of(a)
        assert (p.pid, p.uid, p.gid) == (os.getpid(), os.geteuid(), os.getegid())
        assert p.guard_kind == GUARD_PIDFS and p.exe == os.readlink("/proc/self/exe")
        assert peer_of(b.fileno()).pid == os.getpid()  # a raw fd works too
        b.send(b"still usable")  # peer_of(fd) did not close it


def _listener_child(path: str) -> subprocess.Popen:
    code = (
        "import socket,sys,time;s=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM);"
        f"s.bind({path!r});s.listen();print('ready',flush=True);time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    return proc


def test_peer_of_a_listening_process(tmp_path):
    path = str(tmp_path / "s")
    proc = _listener_child(path)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        p = peer_of(s)
        assert p.pid == proc.pid and p.exe == os.path.realpath(sys.executable)
        assert p.is_alive()
    finally:
        proc.kill()
        proc.wait()
    # The listener is gone: either the kernel refuses (PeerGone) or hands a pidfd of a dead process.
    try:
        gone = peer_of(s)
    except machipc.PeerGone:
        pass
    else:
        assert not gone.is_alive() and gone.exe is None and gone.unknown_reason == UNKNOWN_GONE
    s.close()


def test_peer_of_unconnected_socket_is_peer_gone():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with s, pytest.raises(machipc.PeerGone):
        peer_of(s)


class FakeSock:
    """A real socket whose getsockopt answers are scripted (to reach kernel-version branches)."""

    def __init__(self, real, answers):
        self.real, self.answers = real, answers

    def fileno(self):
        return self.real.fileno()

    def getpeername(self):
        return self.real.getpeername()

    def getsockopt(self, level, opt, *size):
        answer = self.answers.get(opt, None)
        if isinstance(answer, int) and answer < 0:
            raise OSError(-answer, os.strerror(-answer))
        if answer is not None:
            return answer
        return self.real.getsockopt(level, opt, *size)


def test_peer_of_old_kernel_falls_back_to_pidfd_open():
    """ENOPROTOOPT (kernel < 6.5) is "feature missing": fall back and still pin the peer."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        p = peer_of(FakeSock(a, {peer_mod.SO_PEERPIDFD: -errno.ENOPROTOOPT}))
        assert p.pid == os.getpid() and p.pidfd >= 0 and p.guard_kind == GUARD_PIDFS
        assert p.exe == os.readlink("/proc/self/exe")


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ESRCH])
def test_peer_of_gone_is_never_no_check(err):
    """EINVAL/ESRCH mean the peer is gone: PeerGone, never a Peer without a guard."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b, pytest.raises(machipc.PeerGone, match="gone"):
        peer_of(FakeSock(a, {peer_mod.SO_PEERPIDFD: -err}))


def test_peer_of_fallback_detects_hung_up_peer():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.close()
    with a, pytest.raises(machipc.PeerGone, match="hung up"):
        peer_of(FakeSock(a, {peer_mod.SO_PEERPIDFD: -errno.ENOPROTOOPT}))


def test_peer_of_pid_zero_is_a_peer_with_ids_and_no_process():
    """A peer in a pid namespace we cannot see: uid/gid from the kernel, pid unknown."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        p = peer_of(FakeSock(a, {socket.SO_PEERCRED: struct.pack("3i", 0, 1234, 5678)}))
        assert (p.pid, p.uid, p.gid, p.pidfd, p.guard) == (0, 1234, 5678, -1, None)
        assert not p.pinned and "pid namespace" in p.pin_problem
        assert p.exe is None and p.exe_sha256 is None and "pid unknown" in p.unknown_reason
        assert "pid=unknown" in repr(p)


def test_peer_of_macos_token_and_old_fallback(monkeypatch):
    """The macOS branch on scripted getsockopt answers (layout from the SDK headers)."""
    monkeypatch.setattr(peer_mod, "LINUX", False)
    monkeypatch.setattr(peer_mod, "MACOS", True)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        token = struct.pack("8I", 501, 501, 20, 501, 20, 999, 100003, 12)
        p = peer_of(FakeSock(a, {peer_mod.LOCAL_PEERTOKEN: token}))
        assert (p.pid, p.uid, p.gid, p.guard, p.guard_kind) == (999, 501, 20, 12, GUARD_PIDVERSION)
        xucred = struct.pack("IIh2x16I", 0, 502, 2, 30, 31, *([0] * 14))
        old = peer_of(
            FakeSock(
                a,
                {
                    peer_mod.LOCAL_PEERTOKEN: -errno.ENOPROTOOPT,
                    peer_mod.LOCAL_PEERCRED: xucred,
                    peer_mod.LOCAL_PEERPID: struct.pack("i", 1234),
                },
            )
        )
        assert (old.pid, old.uid, old.gid, old.guard) == (1234, 502, 30, None)
        with pytest.raises(machipc.PeerGone):
            peer_of(FakeSock(a, {peer_mod.LOCAL_PEERTOKEN: -errno.EINVAL}))
