"""SystemdUnit, Cgroup and SecurityLabel judged on real processes in real cgroups.

As root, the test makes its own cgroups named like system units
(``/machipc-test-PID.slice/system.slice/test-NAME.service``) in the hierarchy
the server reads units from (``name=systemd`` on a v1/hybrid host, else
cgroup v2), mirrored into a writable cgroup v2 hierarchy on hybrid hosts as
systemd does, places client processes there before they exec, and removes
everything afterwards. Skips, printing why, where no hierarchy is writable.
Both transports.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import machipc
from machipc import cgroup as cg
from machipc import seclabel
from machipc.policies import Cgroup, SecurityLabel, SystemdUnit, loads

from conftest import python_client

NOBODY = 65534


class Tree:
    """Test cgroups under one top slice, in every hierarchy used; removed by ``cleanup``."""

    def __init__(self) -> None:
        if not os.path.exists("/proc/self/cgroup"):
            pytest.skip("no /proc/self/cgroup: this kernel has no cgroups")
        if os.geteuid() != 0:
            pytest.skip("making cgroups and placing processes in them needs root")
        with open("/proc/self/cgroup") as f:
            tracked = cg.tracked_path(f.read())
        if tracked is None or cg.mount_of(tracked[0]) is None:
            pytest.skip(f"the root of the hierarchy units are read from ({tracked}) is not mounted here")
        hierarchies = [tracked[0]]
        if tracked[0] == cg.SYSTEMD_HIERARCHY and cg.mount_of(cg.V2_HIERARCHY) is not None:
            hierarchies.append(cg.V2_HIERARCHY)  # hybrid host: systemd keeps both in step
        self.top = f"/machipc-test-{os.getpid()}.slice"
        self.roots: list[str] = []
        for h in hierarchies:
            mountpoint = cg.mount_of(h)
            try:
                os.mkdir(mountpoint + self.top)
            except OSError as exc:
                if h == tracked[0]:
                    self.cleanup()
                    pytest.skip(f"cannot make a cgroup in the {h or 'cgroup v2'} hierarchy at {mountpoint}: {exc.strerror}")
                continue  # the v2 mirror is optional
            self.roots.append(mountpoint)
        print(f"test cgroups under {self.top} in {self.roots}")

    def make(self, rel: str, owner: int | None = None) -> str:
        """Create ``top + rel`` (and its parents) everywhere; chown it to ``owner`` (delegation). Returns the path."""
        for root in self.roots:
            path = root + self.top
            for part in cg.components(rel):
                path = os.path.join(path, part)
                if not os.path.isdir(path):
                    os.mkdir(path)
            if owner is not None:
                for name in ("", "cgroup.procs", "tasks", "cgroup.threads"):
                    target = os.path.join(path, name)
                    if os.path.exists(target):
                        os.chown(target, owner, owner)
        return self.top + rel

    def procs(self, rel: str) -> list[str]:
        return [os.path.join(root + self.top + rel, "cgroup.procs") for root in self.roots]

    def cleanup(self) -> None:
        for root in self.roots:
            for dirpath, _dirs, _files in sorted(os.walk(root + self.top), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError as exc:
                    print(f"could not remove test cgroup {dirpath}: {exc}")


@pytest.fixture(scope="module")
def tree():
    t = Tree()
    t.make("/system.slice/test-allowed.service")
    t.make("/system.slice/test-other.service")
    t.make("/system.slice/test-deleg.service", owner=NOBODY)
    t.make("/system.slice/test-deleg.service/a", owner=NOBODY)
    t.make("/system.slice/test-deleg.service/b", owner=NOBODY)
    yield t
    t.cleanup()


@pytest.fixture(params=["watched", "reread"])
def moves(request, monkeypatch):
    """How the server notices cgroup moves: the inotify watcher, or re-reading /proc/PID/cgroup."""
    from machipc import cgroupwatch

    if request.param == "reread":
        monkeypatch.setattr(cgroupwatch, "_watcher", None)
        monkeypatch.setattr(cgroupwatch, "_watcher_tried", True)
    elif cgroupwatch.watcher() is None:
        pytest.skip("no cgroup watcher here (not in the initial cgroup namespace, or the hierarchy is not mounted)")
    return request.param


@pytest.fixture
def public_sockdir(sockdir):
    os.chmod(sockdir, 0o755)  # reachable by the uid-65534 clients
    return sockdir


def run_in(tree: Tree, rel: str, argv: list[str], user: int | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` as a process root placed in ``top + rel`` before it exec'd (as ``user`` if given)."""
    if user is not None:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) not installed")
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    place = "".join(f'echo $$ > "{p}" && ' for p in tree.procs(rel))
    return subprocess.run(["sh", "-c", place + 'exec "$@"', "sh", *argv], capture_output=True, text=True, timeout=60)


REQUEST = """
try:
    print("reply", c.request(b"hi", timeout=20).decode())
except machipc.Rejected:
    print("rejected")
"""


def test_allowed_unit_and_another_unit(tree, serve, public_sockdir, impl, caplog):
    caplog.set_level(logging.WARNING, "machipc")
    seen = []

    def handler(msg):
        seen.append((msg.sender.unit, msg.sender.cgroup, msg.sender.cgroup_hierarchy))
        return b"ok"

    serve(handler, SystemdUnit("test-allowed.service"))
    argv = python_client(public_sockdir, impl, REQUEST)
    allowed = run_in(tree, "/system.slice/test-allowed.service", argv)
    assert allowed.stdout.split() == ["reply", "ok"], allowed.stderr
    other = run_in(tree, "/system.slice/test-other.service", argv)
    assert other.stdout.split() == ["rejected"], other.stderr
    path = tree.top + "/system.slice/test-allowed.service"
    with open("/proc/self/cgroup") as f:
        hierarchy = cg.tracked_path(f.read())[0]
    assert seen == [("test-allowed.service", path, hierarchy)]
    assert "unit 'test-other.service' is not test-allowed.service" in caplog.text


def test_cgroup_subtree_by_components_not_string_prefix(tree, serve, public_sockdir, impl, caplog):
    caplog.set_level(logging.WARNING, "machipc")
    tree.make("/system.slice/test-allowed.service-evil.service")
    serve(policy=Cgroup(tree.top + "/system.slice/test-allowed.service"))
    argv = python_client(public_sockdir, impl, REQUEST)
    assert run_in(tree, "/system.slice/test-allowed.service", argv).stdout.split()[0] == "reply"
    evil = run_in(tree, "/system.slice/test-allowed.service-evil.service", argv)
    assert evil.stdout.split() == ["rejected"], evil.stderr
    assert "test-allowed.service-evil.service' is not within" in caplog.text


def test_process_outside_any_unit_is_unknown_and_denied(tree, serve, public_sockdir, impl, caplog):
    caplog.set_level(logging.WARNING, "machipc")
    tree.make("/system.slice")
    serve(policy=SystemdUnit("test-allowed.service"))
    done = run_in(tree, "/system.slice", python_client(public_sockdir, impl, REQUEST))
    assert done.stdout.split() == ["rejected"], done.stderr
    assert "is not inside a systemd unit; not known to run in test-allowed.service" in caplog.text


MOVER = """
import json
def move(rel):
    for procs in PROCS[rel]:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
def ask():
    try:
        return c.request(b"hi", timeout=20).decode()
    except machipc.Rejected:
        return "rejected"
out = {"first": ask()}
try:
    move("escape")
    out["escape"] = "moved"
except OSError as exc:
    out["escape"] = exc.strerror
out["after_escape"] = ask()
move("b")
out["after_move"] = ask()
move("a")
out["back"] = ask()
move("b")
out["last"] = ask()
print(json.dumps(out))
"""


def test_delegated_subtree_move_is_redecided_and_cannot_escape(tree, moves, serve, public_sockdir, impl, caplog):
    """uid 65534 owns test-deleg.service: it may move itself between a and b, never into test-allowed.service.

    Each move happens on the open connection; the server re-reads the cgroup
    for every packet, so the decision follows the process.
    """
    caplog.set_level(logging.WARNING, "machipc")
    deleg = "/system.slice/test-deleg.service"
    units, senders = [], []

    def handler(msg):
        units.append(msg.sender.unit)
        senders.append(msg.sender)
        return msg.sender.cgroup.encode()

    serve(handler, Cgroup(tree.top + deleg + "/a", tree.top + "/system.slice/test-allowed.service"))
    procs = {"a": tree.procs(deleg + "/a"), "b": tree.procs(deleg + "/b"), "escape": tree.procs("/system.slice/test-allowed.service")}
    body = f"PROCS = {procs!r}\n" + textwrap.dedent(MOVER)
    done = run_in(tree, deleg + "/a", python_client(public_sockdir, impl, body), user=NOBODY)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["first"] == tree.top + deleg + "/a"
    assert out["escape"] == "Permission denied"  # root's cgroup.procs: the boundary
    assert out["after_escape"] == tree.top + deleg + "/a"
    assert out["after_move"] == "rejected"  # moved to b on the same connection: re-decided
    assert out["back"] == tree.top + deleg + "/a"
    assert out["last"] == "rejected"
    assert units == ["test-deleg.service"] * 3
    # A handler's Peer keeps describing where its message came from: after each move the
    # server judges a fresh Peer, and the ones already handed out are never updated in place.
    try:
        assert [s.cgroup for s in senders] == [tree.top + deleg + "/a"] * 3
        assert senders[0] is senders[1] and senders[1] is not senders[2]
    finally:
        for s in senders:
            s.close()  # now, not whenever the collector runs (other tests count open fds)
    assert f"cgroup '{tree.top}{deleg}/b' is not within" in caplog.text


def test_sender_that_exits_right_after_sending(tree, serve, public_sockdir, impl, sockdir, caplog):
    """A one-way message read only after its sender exited and was reaped: denied as unknown, never misattributed."""
    caplog.set_level(logging.WARNING, "machipc")
    srv = machipc.Server("org.test.gone", SystemdUnit("test-allowed.service"), directory=public_sockdir, impl=impl)
    try:
        done = run_in(tree, "/system.slice/test-allowed.service", python_client(public_sockdir, impl, 'c.send(b"bye")', "org.test.gone"))
        assert done.returncode == 0, done.stderr  # exited and reaped before the server reads anything
        with pytest.raises(machipc.IPCTimeoutError):
            srv.receive(timeout=2)
        assert srv.stats.rejected == 1 and srv.stats.received == 0
        assert "unknown" in caplog.text and "not known to run in test-allowed.service" in caplog.text
    finally:
        srv.close()


def test_security_label_where_no_lsm_denies_with_the_reason(tree, serve, public_sockdir, impl, caplog):
    caplog.set_level(logging.WARNING, "machipc")
    try:
        with open("/proc/self/attr/current", "rb") as f:
            own = seclabel.parse(f.read())
    except OSError:
        own = None
    if own is not None:
        pytest.skip(f"an LSM is active (label {own!r}): test_security_label_with_an_lsm covers this host")
    serve(policy=SecurityLabel("system_u:system_r:backup_t:s0"))
    done = run_in(tree, "/system.slice/test-allowed.service", python_client(public_sockdir, impl, REQUEST))
    assert done.stdout.split() == ["rejected"], done.stderr
    assert seclabel.NO_LSM in caplog.text


def test_security_label_with_an_lsm(serve, public_sockdir, impl):
    try:
        with open("/proc/self/attr/current", "rb") as f:
            own = seclabel.parse(f.read())
    except (OSError, ValueError) as exc:
        pytest.skip(f"no LSM labels processes here (/proc/self/attr/current: {exc})")
    serve(policy=SecurityLabel(own))
    done = subprocess.run(python_client(public_sockdir, impl, REQUEST), capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["reply", "ok"], done.stderr
    serve(policy=SecurityLabel(own + "-other"), name="org.test.other")
    done = subprocess.run(python_client(public_sockdir, impl, REQUEST, "org.test.other"), capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["rejected"], done.stderr


NS_SERVER = """
import logging, sys, time
import machipc
from machipc.policies import Cgroup
logging.basicConfig(level=logging.WARNING, format="%(message)s")
srv = machipc.Server({name!r}, Cgroup("/"), directory={sockdir!r}, impl={impl!r})
print("ready", flush=True)
sys.stdin.readline()
msg = srv.receive(timeout=60)
print("allowed", msg.sender.cgroup, flush=True)
msg.reply(b"ok")
deadline = time.monotonic() + 60
while srv.stats.rejected == 0 and time.monotonic() < deadline:
    try:
        srv.receive(timeout=0.2)
        print("allowed more", flush=True)
    except machipc.IPCTimeoutError:
        pass
print("rejected", srv.stats.rejected, flush=True)
srv.close()
"""


def test_paths_are_read_in_the_servers_cgroup_namespace(tree, public_sockdir, impl):
    """A server in its own cgroup namespace sees its subtree as "/" and everyone else as outside it."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not installed")
    tree.make("/system.slice/test-ns.service")
    tree.make("/system.slice/test-ns.service/inner")
    name = "org.test.cgns"
    code = NS_SERVER.format(name=name, sockdir=public_sockdir, impl=impl)
    place = "".join(f'echo $$ > "{p}" && ' for p in tree.procs("/system.slice/test-ns.service"))
    server = subprocess.Popen(
        ["sh", "-c", place + 'exec unshare --cgroup "$@"', "sh", sys.executable, "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = server.stdout.readline()
        if line.strip() != "ready":
            pytest.skip(f"no cgroup namespace for the server here: {server.stderr.read()[-300:]}")
        server.stdin.write("go\n")
        server.stdin.flush()
        # Requests: each client waits for its answer, so it is alive (pinned) when judged.
        ask = python_client(public_sockdir, impl, REQUEST, name)
        assert run_in(tree, "/system.slice/test-ns.service/inner", ask).stdout.split() == ["reply", "ok"]
        assert run_in(tree, "/system.slice/test-other.service", ask).stdout.split() == ["rejected"]
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert out.splitlines() == ["allowed /inner", "rejected 1"], err
    assert "cgroup '/../test-other.service' is outside the server's cgroup namespace" in err


IMPOSTOR = """
import json
mine = {mine!r}
for root in mine:
    os.makedirs(os.path.join(root, "system.slice", "test-allowed.service"), exist_ok=True)
    with open(os.path.join(root, "system.slice", "test-allowed.service", "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
try:
    print(json.dumps(["reply", c.request(b"hi", timeout=20).decode()]))
except machipc.Rejected:
    print(json.dumps(["rejected"]))
"""


def test_user_naming_its_own_subcgroup_like_a_system_unit(tree, moves, serve, public_sockdir, impl, caplog):
    """Inside its own user@UID.service subtree a user may make system.slice/test-allowed.service; it stays the user's."""
    caplog.set_level(logging.WARNING, "machipc")
    manager = "/user.slice/user-65534.slice/user@65534.service"
    tree.make(manager, owner=NOBODY)
    units = []

    def handler(msg):
        units.append(msg.sender.unit)
        return b"ok"

    serve(handler, SystemdUnit("test-allowed.service") | SystemdUnit("user@65534.service/other.service"))
    mine = [root + tree.top + manager for root in tree.roots]
    done = run_in(tree, manager, python_client(public_sockdir, impl, IMPOSTOR.format(mine=mine)), user=NOBODY)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["rejected"]
    assert "unit 'user@65534.service/test-allowed.service' is not test-allowed.service" in caplog.text
    assert units == []


def test_watcher_sees_every_way_to_move(tree):
    """A write to cgroup.procs, a mkdir (even nested, before it is watched) and a v1 rename all bump the generation."""
    from machipc import cgroupwatch

    w = cgroupwatch.watcher()
    if w is None:
        pytest.skip("no cgroup watcher here (not in the initial cgroup namespace, or the hierarchy is not mounted)")
    tracked = [r for r in tree.roots if os.path.realpath(r) == os.path.realpath(w.root)]
    if not tracked:
        pytest.skip(f"the watcher watches {w.root}, not one of the test's hierarchies {tree.roots}")
    root = tracked[0] + tree.top
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        g = w.current()
        assert w.unchanged(g) and w.unchanged(g)
        with open(os.path.join(root, "system.slice", "test-other.service", "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        assert not w.unchanged(g)
        g = w.current()
        os.makedirs(os.path.join(root, "system.slice", "test-w.service", "inner"))
        with open(os.path.join(root, "system.slice", "test-w.service", "inner", "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))  # into a directory no watch existed for
        assert not w.unchanged(g)
        g = w.current()
        assert w.unchanged(g)
        with open(os.path.join(root, "system.slice", "test-w.service", "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))  # the new directories are watched now
        assert not w.unchanged(g)
        if os.path.realpath(w.root) == os.path.realpath(cg.mount_of(cg.SYSTEMD_HIERARCHY) or ""):
            g = w.current()
            os.rename(os.path.join(root, "system.slice", "test-w.service", "inner"), os.path.join(root, "system.slice", "test-w.service", "renamed"))
            assert not w.unchanged(g)  # v1 renames change paths without a write
    finally:
        sleeper.kill()
        sleeper.wait()


def _daemons_md_example(lang: str) -> str:
    """The recommended set-up's policy example in docs/daemons.md (an indented block under step 3)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "daemons.md")) as f:
        text = f.read()
    blocks = re.findall(rf"^( *)```{lang}\n(.*?)^\1```", text, re.S | re.M)
    found = [textwrap.dedent(body) for _indent, body in blocks if "backup.service" in body]
    assert len(found) == 1, f"docs/daemons.md: {len(found)} {lang} blocks name backup.service"
    return found[0]


def test_recommended_setup_example_means_what_it_says(tree, serve, public_sockdir, impl):
    """docs/daemons.md: the client unit, run as its own user, is allowed; that user elsewhere, or root in the unit, is not."""
    text = _daemons_md_example("toml").replace("backup.service", "test-allowed.service").replace("998", str(NOBODY))
    serve(policy=loads(text))
    argv = python_client(public_sockdir, impl, REQUEST)
    assert run_in(tree, "/system.slice/test-allowed.service", argv, user=NOBODY).stdout.split() == ["reply", "echo:hi"]
    assert run_in(tree, "/system.slice/test-other.service", argv, user=NOBODY).stdout.split() == ["rejected"]
    assert run_in(tree, "/system.slice/test-allowed.service", argv).stdout.split() == ["rejected"]  # root, not the unit's user
    code = _daemons_md_example("python")
    assert 'SystemdUnit("backup.service") & Allowlist(uids=[pwd.getpwnam("backup").pw_uid])' in code
