"""Findings 11, 12 and 19: macOS identity bound to the running image, Security.framework
errors deny, liveness without a path.

policies/_macos.py talks to libproc and Security.framework through ctypes; here
those libraries are replaced by fakes that answer as the documented calls do
(libsyscall/wrappers/libproc/libproc.c, xnu bsd/kern/proc_info.c, Apple's
Security.framework docs), so the Python logic around them is tested. The calls
themselves only run on a Mac.
"""

import ctypes
import errno
import hashlib
import os

import pytest

from machipc.peer import Peer
from machipc.policies import CodeSignature, SameDirectory, evaluate
from machipc.policies import _macos

PID, PIDVERSION = 4242, 777
TOKEN = (0, 501, 20, 501, 20, PID, 100001, PIDVERSION)


class FakeLibproc:
    """proc_pidpath_audittoken and proc_pidinfo(PROC_PIDREGIONPATHINFO) of one process."""

    def __init__(self, path, image_dev_ino, alive=True, path_errno=0):
        self.path, self.image, self.alive, self.path_errno = path, image_dev_ino, alive, path_errno

    def proc_pidpath_audittoken(self, token, buf, size):
        tok = token._obj
        if not self.alive or tok.val[5] != PID or tok.val[7] != PIDVERSION:
            ctypes.set_errno(errno.ESRCH)  # the pidversion check comes first (libproc.c)
            return 0
        if self.path_errno:  # then the path is built and looked up (proc_info.c)
            ctypes.set_errno(self.path_errno)
            return 0
        raw = os.fsencode(self.path)
        ctypes.memmove(buf, raw, len(raw))
        return len(raw)

    def proc_pidinfo(self, pid, flavor, address, buf, size):
        assert flavor == _macos.PROC_PIDREGIONPATHINFO and pid == PID
        regions = [  # __PAGEZERO, the executable's __TEXT, a library
            (0, 0x1_0000_0000, 0, b"", (0, 0)),
            (0x1_0000_0000, 0x4000, _macos.VM_PROT_EXECUTE | 1, os.fsencode(self.path), self.image),
            (0x1_8000_0000, 0x4000, _macos.VM_PROT_EXECUTE | 1, b"/usr/lib/dyld", (1, 2)),
        ]
        for start, length, prot, path, (dev, ino) in regions:
            if start + length > address:
                info = ctypes.cast(buf, ctypes.POINTER(_macos.ProcRegionWithPathInfo)).contents
                ctypes.memset(ctypes.addressof(info), 0, ctypes.sizeof(info))
                info.prp_prinfo.pri_address, info.prp_prinfo.pri_size = start, length
                info.prp_prinfo.pri_protection = prot
                info.prp_vip.vip_path = path
                info.prp_vip.vi_stat.vst_dev, info.prp_vip.vi_stat.vst_ino = dev, ino
                return ctypes.sizeof(info)
        return 0


@pytest.fixture
def binaries(tmp_path):
    """The file the process runs, and an impostor now at the path it was started from."""
    running = tmp_path / "bin" / "tool"
    running.parent.mkdir()
    running.write_bytes(b"the real program")
    st = os.stat(running)
    image = (st.st_dev, st.st_ino)
    impostor = tmp_path / "impostor"
    impostor.write_bytes(b"an allowed program, copied")
    return running, image, impostor


def test_exe_identity_is_the_running_image(monkeypatch, binaries):
    running, image, _ = binaries
    monkeypatch.setattr(_macos, "_libc", FakeLibproc(str(running), image))
    peer = Peer.from_audit_token(TOKEN)
    assert peer.exe == str(running) and peer.exe_id == image
    assert peer.exe_sha256 == hashlib.sha256(b"the real program").hexdigest()


def test_a_path_renamed_over_after_sending_is_not_the_sender(monkeypatch, binaries):
    """Finding 11: the sender renames another file over its own path; hashing or
    comparing that path must not vouch for the sender."""
    running, image, impostor = binaries
    os.replace(impostor, running)  # the path now names the impostor; the process still runs the old inode
    monkeypatch.setattr(_macos, "_libc", FakeLibproc(str(running), image))
    peer = Peer.from_audit_token(TOKEN)
    assert peer.exe_id == image and os.stat(running).st_ino != image[1]
    assert peer.exe_sha256 is None and "changed" in peer.unknown_reason
    decision = evaluate(SameDirectory(str(running.parent)), Peer.from_audit_token(TOKEN))
    assert not decision.allowed


def test_no_mapping_of_the_path_means_unknown(monkeypatch, binaries):
    running, image, _ = binaries
    fake = FakeLibproc(str(running), image)
    fake.proc_pidinfo = lambda *a: 0
    monkeypatch.setattr(_macos, "_libc", fake)
    peer = Peer.from_audit_token(TOKEN)
    assert peer.exe is None and "cannot identify" in peer.unknown_reason


@pytest.mark.parametrize("err, alive", [(errno.ENOENT, True), (errno.EACCES, True), (errno.ESRCH, False)])
def test_liveness_does_not_depend_on_the_path(monkeypatch, binaries, err, alive):
    """Finding 19: a live process whose binary was deleted (ENOENT) or is out of reach
    (EACCES) is alive; only ESRCH (pidversion mismatch) means gone."""
    running, image, _ = binaries
    monkeypatch.setattr(_macos, "_libc", FakeLibproc(str(running), image, alive=err != errno.ESRCH, path_errno=err))
    assert _macos.pidversion_alive(PID, PIDVERSION) is alive


class FakeCF:
    def CFStringCreateWithCString(self, *a):
        return 1

    def CFRelease(self, ref):
        pass


class FakeSecurity:
    """SecCodeCopyGuestWithAttributes fails with an OSStatus other than 'no such code'."""

    def SecRequirementCreateWithString(self, text, flags, out):
        out._obj.value = 2
        return 0


def test_security_framework_errors_deny_instead_of_falling_back(monkeypatch):
    """Finding 12: an error from Security.framework is a denial, not a reason to run
    the path-based codesign check."""
    monkeypatch.setattr(_macos, "_load_security", lambda: (FakeCF(), FakeSecurity()))

    def guest(words):
        raise _macos.SecError(-67030, "SecCodeCopyGuestWithAttributes failed: OSStatus -67030")

    monkeypatch.setattr(_macos, "_guest_for_token", guest)
    policy = CodeSignature('identifier "com.example.tool"')
    monkeypatch.setattr(policy, "_check_codesign", lambda peer: pytest.fail("fell back to codesign"))
    decision = evaluate(policy, Peer.from_audit_token(TOKEN))
    assert not decision.allowed and "-67030" in decision.reason


def test_framework_missing_is_the_only_fallback(monkeypatch):
    def missing():
        raise _macos.FrameworkUnavailable(errno.ENOENT, "Security.framework unusable: not here")

    monkeypatch.setattr(_macos, "_load_security", missing)
    policy = CodeSignature('identifier "com.example.tool"')
    used = []
    monkeypatch.setattr(policy, "_check_codesign", lambda peer: used.append(peer) or _deny())
    evaluate(policy, Peer.from_audit_token(TOKEN))
    assert used


class FakeSecuritySigning(FakeSecurity):
    """The code's signature on disk changed: SecCodeCheckValidity says so."""

    def SecCodeCheckValidity(self, code, flags, req):
        return _macos.errSecCSStaticCodeChanged

    def SecCodeCopySigningInformation(self, code, flags, out):
        pytest.fail("signing information read from an invalid code")


def test_signing_fields_come_only_from_validated_code(monkeypatch):
    """Finding 12: code_identifier / team_id are not read from an unvalidated signature."""
    monkeypatch.setattr(_macos, "_load_security", lambda: (FakeCF(), FakeSecuritySigning()))
    monkeypatch.setattr(_macos, "_guest_for_token", lambda words: 3)
    peer = Peer.from_audit_token(TOKEN)
    assert peer.code_identifier is None and peer.team_id is None
    assert "not valid" in peer.unknown_reason


def _deny():
    from machipc.policies import Decision

    return Decision.deny("codesign fallback")
