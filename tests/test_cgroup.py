"""Parsing of /proc/PID/cgroup and LSM labels, unit-name derivation, and the policies on stand-in peers."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from machipc import cgroup as cg
from machipc import seclabel
from machipc.peer import Peer
from machipc.policies import AllOf, AllowAll, Allowlist, Cgroup, Decision, DecisionCache, Policy, PolicyFileError
from machipc.policies import SameDirectory, SameUser, SecurityLabel, SystemdUnit, loads
from machipc.policies import uses_cgroup, uses_label

HYBRID = """12:pids:/system.slice/backup.service
9:name=systemd:/system.slice/backup.service
4:memory:/system.slice/backup.service
0::/system.slice/backup.service
"""
LEGACY_V2_UNUSED = "9:name=systemd:/system.slice/backup.service\n0::/\n"
PURE_V2 = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/sync.service\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        (HYBRID, ("name=systemd", "/system.slice/backup.service")),
        (LEGACY_V2_UNUSED, ("name=systemd", "/system.slice/backup.service")),
        (PURE_V2, ("", "/user.slice/user-1000.slice/user@1000.service/app.slice/sync.service")),
        ("0::/a:b/c:d\n", ("", "/a:b/c:d")),  # ':' is allowed in cgroup names
        ("5:cpu,name=systemd:/x.service\n0::/\n", ("name=systemd", "/x.service")),
        ("4:memory:/m\n", None),
        ("", None),
        ("garbage\n0:/x\n", None),
    ],
)
def test_tracked_path(text, expected):
    assert cg.tracked_path(text) == expected


@pytest.mark.parametrize(
    "path, unit",
    [
        ("/system.slice/backup.service", "backup.service"),
        ("/system.slice/backup.service/worker", "backup.service"),  # its own (delegated) sub-cgroup
        ("/system.slice/backup@nightly.service", "backup@nightly.service"),
        ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
        ("/user.slice/user-1000.slice/session-2.scope", "session-2.scope"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/sync.service", "user@1000.service/sync.service"),
        ("/user.slice/user-1000.slice/user@1000.service/init.scope", "user@1000.service/init.scope"),
        ("/user.slice/user-1000.slice/user@1000.service", "user@1000.service"),
        # a user naming a sub-cgroup like a system unit stays inside its manager
        ("/user.slice/user-1000.slice/user@1000.service/system.slice/backup.service", "user@1000.service/backup.service"),
        # a container's own units are not host units
        ("/machine.slice/machine-x.scope/payload/system.slice/backup.service", "machine-x.scope"),
        ("/init.scope", "init.scope"),
        ("/system.slice/_cgroup.x.service", "cgroup.x.service"),  # systemd's escaping
        ("/", None),
        ("/system.slice", None),
        ("/process_api/5eb616d4", None),
        ("/../../system.slice/backup.service", None),  # outside the reader's namespace
    ],
)
def test_unit_of(path, unit):
    assert cg.unit_of(path) == unit


def test_is_within_by_components():
    assert cg.is_within("/system.slice/backup.service", "/system.slice")
    assert cg.is_within("/system.slice", "/system.slice")
    assert not cg.is_within("/system.slice-evil/x.service", "/system.slice")
    assert not cg.is_within("/system.slice", "/system.slice/backup.service")
    assert cg.is_within("/a", "/")
    assert not cg.is_within("/../x", "/")


@pytest.mark.parametrize("bad", ["system.slice", "/a/../b", "/./a", "", None])
def test_normalize_refuses(bad):
    with pytest.raises(ValueError):
        cg.normalize(bad)


def test_normalize():
    assert cg.normalize("//system.slice///x.service/") == "/system.slice/x.service"


def peer(**kw):
    return SimpleNamespace(pid=42, unknown_reason=kw.pop("reason", None), **kw)


def test_systemd_unit_exact_and_template_glob():
    p = SystemdUnit("backup.service", "sync@*.service", "user@1000.service/mail.service")
    assert p(peer(unit="backup.service")).allowed
    assert p(peer(unit="sync@home.service")).allowed
    assert p(peer(unit="user@1000.service/mail.service")).allowed
    assert not p(peer(unit="backup2.service")).allowed
    assert not p(peer(unit="sync@.service")).allowed  # the instance is not empty
    assert not p(peer(unit="sync@a@b.service")).allowed
    assert not p(peer(unit="user@1000.service/backup.service")).allowed
    assert not p(peer(unit="user@1001.service/mail.service")).allowed
    d = p(peer(unit=None, reason="unknown: the sender exited"))
    assert not d.allowed and "unknown: the sender exited" in d.reason
    assert p.uses_cgroup and not p.uses_exe and uses_cgroup(p)


@pytest.mark.parametrize(
    "bad",
    ["*", "*.service", "back*.service", "backup", "a/b/c.service", "x.service/y.service", "system.slice", "a@*x.service", "a@**.service", ""],
)
def test_systemd_unit_refuses_ambiguous_or_invalid(bad):
    with pytest.raises(ValueError):
        SystemdUnit(bad)


def test_cgroup_policy():
    p = Cgroup("/system.slice/backup.service", "/machine.slice")
    assert p(peer(cgroup="/system.slice/backup.service")).allowed
    assert p(peer(cgroup="/system.slice/backup.service/sub")).allowed
    assert not p(peer(cgroup="/system.slice/backup.service2")).allowed
    assert not p(peer(cgroup="/../machine.slice")).allowed
    assert "outside the server's cgroup namespace" in Cgroup("/")(peer(cgroup="/../x")).reason
    assert not p(peer(cgroup=None, reason="unknown: x")).allowed
    with pytest.raises(ValueError):
        Cgroup()


def test_security_label_policy_and_parsing():
    assert seclabel.parse(b"system_u:system_r:backup_t:s0\0") == "system_u:system_r:backup_t:s0"
    assert seclabel.parse(b"/usr/bin/backup (enforce)\n") == "/usr/bin/backup (enforce)"
    assert seclabel.parse(b"unconfined\n") == "unconfined"
    for raw in (b"", b"\0", b"\n", b"\xff\xfe"):
        with pytest.raises(ValueError):
            seclabel.parse(raw)
    p = SecurityLabel("system_u:system_r:backup_t:s0", "/usr/bin/backup (enforce)")
    assert p(peer(security_label="/usr/bin/backup (enforce)")).allowed
    assert not p(peer(security_label="/usr/bin/backup (complain)")).allowed
    assert not p(peer(security_label=None, reason=seclabel.NO_LSM)).allowed
    assert p.uses_label and uses_label(p) and not p.uses_cgroup
    for bad in ("", " x", "x\n", None):
        with pytest.raises(ValueError):
            SecurityLabel(bad)


def test_combinations_carry_the_flags():
    both = SystemdUnit("a.service") & SameUser()
    assert both.uses_cgroup and not both.uses_label
    assert (~SecurityLabel("x")).uses_label
    assert (SameUser() | Cgroup("/a")).uses_cgroup
    assert not SameUser().uses_cgroup and not SameUser().uses_label
    assert uses_cgroup(lambda p: None) and uses_label(lambda p: None)  # a plain callable may look at anything

    class Mine(Policy):  # a subclass that says nothing may look at anything: re-asked after a move
        def check(self, peer):
            return Decision.allow("x")

    assert Mine().uses_cgroup and Mine().uses_label and (Mine() & SameUser()).uses_cgroup
    for builtin in (SameUser(), AllowAll(), Allowlist(uids=[0]), SameDirectory("/"), SystemdUnit("a.service"), Cgroup("/")):
        assert not builtin.uses_label, builtin
    for builtin in (SameUser(), Allowlist(executables=["/bin/sh"]), SameDirectory("/"), SecurityLabel("x")):
        assert not builtin.uses_cgroup, builtin


def test_toml_keys():
    p = loads('[policy]\nsystemd_unit = "backup.service"\nsame_user = true\n')
    assert isinstance(p, AllOf) and isinstance(p.policies[0], SystemdUnit)
    p = loads('[policy]\nany_of = [{ cgroup = ["/system.slice", "/machine.slice"] }, { security_label = "unconfined" }]\n')
    assert p.policies[0].paths == ("/system.slice", "/machine.slice")
    assert p.policies[1].labels == frozenset({"unconfined"})
    with pytest.raises(PolicyFileError, match=r"policy.systemd_unit: '\*.service': '\*' may only"):
        loads('[policy]\nsystemd_unit = "*.service"\n')
    with pytest.raises(PolicyFileError, match="policy.cgroup: a cgroup path is absolute"):
        loads('[policy]\ncgroup = "system.slice"\n')
    with pytest.raises(PolicyFileError, match=r"policy.security_label\[0\]: expected str"):
        loads("[policy]\nsecurity_label = [1]\n")


linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


@linux
def test_own_process_attributes_and_cache_key():
    me = Peer.from_pidfd(os.getpid(), os.geteuid(), os.getegid(), os.pidfd_open(os.getpid()))
    with open("/proc/self/cgroup") as f:
        expected = cg.tracked_path(f.read())
    assert (me.cgroup_hierarchy, me.cgroup) == expected
    assert me.unit == cg.unit_of(expected[1])
    cache = DecisionCache(Cgroup("/"))
    assert cache.cgroup_based and cache.volatile and not cache.exe_based
    assert cache.decide(me).allowed and cache.decide(me).allowed and cache.evaluations == 1
    me.close()
    assert me.cgroup == expected[1]  # kept once read
    assert me.refresh_cgroup() is None and "no pidfd" in me.unknown_reason


@linux
def test_no_pidfd_means_unknown():
    p = Peer(os.getpid(), 0, 0)
    assert p.cgroup is None and p.unit is None and "no pidfd pins the sender" in p.unknown_reason
    assert p.security_label is None


@linux
def test_exited_process_reads_as_gone():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    pidfd = os.pidfd_open(pid)
    p = Peer.from_pidfd(pid, 0, 0, pidfd)
    os.waitpid(pid, 0)
    assert p.cgroup is None and p.unknown_reason.startswith("unknown: the sender exited")


@pytest.fixture
def without_watcher(monkeypatch):
    """Cgroup moves checked by re-reading /proc/PID/cgroup, as where no watcher can see every move."""
    from machipc import cgroupwatch

    monkeypatch.setattr(cgroupwatch, "_watcher", None)
    monkeypatch.setattr(cgroupwatch, "_watcher_tried", True)


@linux
def test_held_file_sees_exit_not_a_reused_pid(without_watcher):
    """Once open, the cgroup file answers for its own process only: ESRCH after it exits."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.read(r, 1)
        os._exit(0)
    p = Peer.from_pidfd(pid, 0, 0, os.pidfd_open(pid))
    assert p.refresh_cgroup() is not None
    os.write(w, b"x")
    os.waitpid(pid, 0)
    assert p.running_cgroup() is None
    assert p.refresh_cgroup() is None and p.unknown_reason.startswith("unknown: the sender exited")
    os.close(r)
    os.close(w)


@linux
def test_peer_of_records_so_peersec():
    import socket

    from machipc.peer import peer_of

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        p = peer_of(a)
        try:
            with open("/proc/self/attr/current", "rb") as f:
                own = seclabel.parse(f.read())
        except (OSError, ValueError):
            own = None
        if own is None:
            assert p.socket_label is None  # no LSM: ENOPROTOOPT, not an error
        else:
            assert p.socket_label == own
        p.close()


@linux
def test_cgroup_watcher_is_not_shared_with_a_forked_child():
    """A child shares the inotify queue: its inherited watcher stops vouching, and it gets its own."""
    from machipc import cgroupwatch

    parent = cgroupwatch.watcher()
    if parent is None:
        pytest.skip("no cgroup watcher here (not in the initial cgroup namespace, or the hierarchy is not mounted)")
    g = parent.current()
    pid = os.fork()
    if pid == 0:
        ok = parent.broken is not None and not parent.unchanged(g) and parent.unchanged(-1) is False
        own = cgroupwatch.watcher()
        os._exit(0 if ok and own is not None and own is not parent else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert parent.broken is None  # the parent's own watcher goes on


def test_mount_of(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "40 31 0:37 /sub /mnt/sub rw - cgroup cgroup rw,name=systemd\n"
        "41 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n"
        "42 31 0:38 / /sys/fs/cgroup/unified rw shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert cg.mount_of(cg.SYSTEMD_HIERARCHY, str(info)) == "/sys/fs/cgroup/systemd"  # not the subtree bind mount
    assert cg.mount_of(cg.V2_HIERARCHY, str(info)) == "/sys/fs/cgroup/unified"
    info.write_text("40 31 0:37 /sub /mnt/sub rw - cgroup cgroup rw,name=systemd\n")
    assert cg.mount_of(cg.SYSTEMD_HIERARCHY, str(info)) is None
    assert cg.mount_of(cg.V2_HIERARCHY, str(tmp_path / "missing")) is None


@linux
def test_cgroup_watcher_breaks_on_a_directory_it_cannot_list(tmp_path, monkeypatch):
    """A subtree hidden from the server would hide moves: the watcher stops vouching instead."""
    from machipc import cgroupwatch

    (tmp_path / "a" / "b").mkdir(parents=True)
    w = cgroupwatch.Watcher(str(tmp_path))
    g = w.current()
    assert w.broken is None and w.unchanged(g)
    real_walk = os.walk

    def walk(top, onerror=None):
        onerror(PermissionError(13, "Permission denied", os.path.join(top, "hidden")))
        return real_walk(top, onerror=onerror)

    monkeypatch.setattr(os, "walk", walk)
    (tmp_path / "c").mkdir()  # a new directory: the watcher walks it, and fails
    assert not w.unchanged(g)
    assert w.broken and "cannot list" in w.broken
    assert not w.unchanged(w.current())  # never vouches again
