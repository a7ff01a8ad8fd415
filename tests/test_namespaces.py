"""Identity attacks from user, pid and mount namespaces, by real unprivileged processes.

Attackers run as uid 65534 (``setpriv``) inside namespaces any user may create
(``unshare -Urpf`` / ``unshare -Urm``); the server runs in this process, on
both transports. Skipped, with the reason, where user namespaces are disabled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from machipc.policies import Allowlist, SameDirectory, SameUser
from test_policies_processes import ALLOWED, REJECTED, client, dirs, serve  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces")

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ATTACKER = os.path.join(os.path.dirname(__file__), "ns_attacker.py")


def _need(argv: list[str]) -> None:
    """Skip (printing why) unless uid 65534 can run ``argv`` (a namespace setup)."""
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root to become uid 65534 with setpriv")
    done = subprocess.run([*AS_NOBODY, *argv, "true"], capture_output=True, timeout=20)
    if done.returncode != 0:
        reason = f"user namespaces unavailable to uid 65534: {done.stderr.decode(errors='replace').strip()}"
        print(reason)
        pytest.skip(reason)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def trusted(dirs):  # noqa: F811
    """A trusted long-running program (a copy of sleep) next to the trusted client, world-readable."""
    path = os.path.join(dirs["trusted"], "helper")
    shutil.copy2(shutil.which("sleep"), path)
    os.chmod(path, 0o755)
    public = os.path.join(dirs["build"], "ns_attacker.py")
    shutil.copy2(ATTACKER, public)
    os.chmod(public, 0o644)
    return {"helper": path, "attacker": public}


# -- F5: a pid claimed in SCM_CREDENTIALS from an own pid namespace ------------------------------


def _attack(running, trusted, variant: str) -> list[str]:
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else None
    if python is None:
        pytest.skip("no /usr/bin/python3 for the attacker")
    argv = [*AS_NOBODY, "unshare", "-Urpf", "--mount-proc", python, trusted["attacker"],
            running.srv.path, trusted["helper"], variant]
    done = subprocess.run(argv, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 3, lines
    return lines


@pytest.mark.parametrize("variant", ["child-connects", "parent-connects"])
def test_claimed_pid_never_lends_the_trusted_programs_identity(dirs, trusted, serve, variant, caplog):  # noqa: F811
    """F5: the attacker's bytes, claimed to come from its child running the trusted program,
    are not attributed to it: sha256 and path policies deny them (unknown), with the reason."""
    _need(["unshare", "-Urpf", "--mount-proc"])
    caplog.set_level(logging.WARNING, "machipc")
    digests = [_sha256(trusted["helper"]), _sha256(client(dirs, "trusted"))]
    for policy in (Allowlist(sha256=digests), Allowlist(executables=[trusted["helper"], client(dirs, "trusted")])):
        running = serve(policy)
        # Control: the trusted program, run for real in the server's pid namespace, passes.
        assert running.run(client(dirs, "trusted"), user=65534).returncode == ALLOWED
        caplog.clear()
        replies = _attack(running, trusted, variant)
        assert all(r.startswith("error 1 ") for r in replies), (policy, replies)
        assert running.srv.stats.received == 1 and running.srv.stats.rejected == 3
        assert "pid namespace" in caplog.text and "not attributed" in caplog.text, caplog.text


@pytest.mark.parametrize("variant", ["child-connects", "parent-connects"])
def test_claimed_pid_still_decided_by_uid(dirs, trusted, serve, variant):  # noqa: F811
    """uid/gid stay sound through the claim: uid policies still decide, both ways."""
    _need(["unshare", "-Urpf", "--mount-proc"])
    assert _attack(serve(Allowlist(uids=[65534])), trusted, variant) == ["reply"] * 3
    denied = serve(SameUser())  # the server's uid, root
    assert all(r.startswith("error 1 ") for r in _attack(denied, trusted, variant))


def test_genuine_program_in_a_nested_pid_namespace_is_unknown_to_exe_policies(dirs, serve):  # noqa: F811
    """The flip side: from a deeper pid namespace a genuine sender cannot be told from a claim,
    so exe policies deny it too, while its uid still decides."""
    _need(["unshare", "-Urpf", "--mount-proc"])
    nested = [*AS_NOBODY, "unshare", "-Urpf", "--mount-proc"]
    by_digest = serve(Allowlist(sha256=[_sha256(client(dirs, "trusted"))]))
    assert by_digest.run(client(dirs, "trusted"), user=65534).returncode == ALLOWED
    done = subprocess.run([*nested, client(dirs, "trusted"), by_digest.srv.path, "request"], timeout=20)
    assert done.returncode == REJECTED
    by_uid = serve(Allowlist(uids=[65534]))
    done = subprocess.run([*nested, client(dirs, "trusted"), by_uid.srv.path, "request"], timeout=20)
    assert done.returncode == ALLOWED


# -- senders and servers in pid namespaces the other side cannot see ----------------------------


@pytest.fixture(params=["py", "c"], ids=lambda i: f"{i}-transport")
def nested_server(request, dirs, tmp_path):  # noqa: F811
    """Start tests/ns_server.py as pid 1 of a new pid namespace: this process's clients are pid 0 to it."""
    if request.param == "c":
        pytest.importorskip("machipc._unix")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to start a server in its own pid namespace")
    started = []

    def start(which: str):
        sockdir = tmp_path / f"sock-{which}"
        sockdir.mkdir()
        argv = ["unshare", "-pf", "--mount-proc", sys.executable, os.path.join(os.path.dirname(__file__), "ns_server.py"),
                str(sockdir), f"t{os.getpid()}", which, dirs["trusted"], request.param]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
        started.append(proc)
        path = proc.stdout.readline().decode().strip()
        assert path, proc.stderr.read().decode(errors="replace")
        return proc, path

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def _finish(proc) -> tuple[list[str], str]:
    out, err = proc.communicate(b"", timeout=30)
    return out.decode().splitlines(), err.decode(errors="replace")


def test_sender_in_an_unseen_pid_namespace_is_decided_by_uid(dirs, nested_server):  # noqa: F811
    """F6 (server side): the kernel reports pid 0; the sender gets a Peer with uid/gid and
    "pid unknown", uid policies decide, and every request is answered."""
    proc, path = nested_server("uid")
    assert subprocess.run([client(dirs, "outside"), path, "request"], timeout=30).returncode == ALLOWED
    assert subprocess.run([client(dirs, "outside"), path, "message"], timeout=30).returncode == 0
    lines, err = _finish(proc)
    assert lines[:2] == ["2", "0"], (lines, err)
    assert lines[2:] == ["Peer(pid=unknown, uid=0, gid=0, guard=none)"] * 2


def test_sender_in_an_unseen_pid_namespace_is_unknown_to_exe_policies(dirs, nested_server):  # noqa: F811
    proc, path = nested_server("exe")
    # A trusted program it would allow were its process known: denied, and answered (not left to time out).
    assert subprocess.run([client(dirs, "trusted"), path, "request"], timeout=30).returncode == REJECTED
    assert subprocess.run([client(dirs, "trusted"), path, "message"], timeout=30).returncode == 0
    lines, err = _finish(proc)
    assert lines[:2] == ["0", "2"], (lines, err)
    assert "pid unknown" in err and "pid namespace the server cannot see" in err, err


def _python_for_nobody(prefix: list[str]) -> list[str]:
    """An interpreter uid 65534 may run under ``prefix``, importing this machipc (the venv's may sit under /root)."""
    for exe in (sys.executable, "/usr/bin/python3"):
        done = subprocess.run([*AS_NOBODY, *prefix, exe, "-c", "import sys; print(sys.version_info[:2])"],
                              capture_output=True, timeout=20, cwd="/")
        if done.returncode == 0 and done.stdout.decode().strip() == str(sys.version_info[:2]):
            site = sysconfig.get_paths()["purelib"]
            return [exe, "-c", f"import site; site.addsitedir({site!r}); exec(compile(sys.argv.pop(1), 'c', 'exec'))"
                    .replace("import site;", "import site, sys;")]
    reason = f"no Python {sys.version_info[0]}.{sys.version_info[1]} that uid 65534 may run"
    print(reason)
    pytest.skip(reason)


def test_client_in_a_container_connects_with_an_explicit_server_policy(serve, tmp_path):  # noqa: F811
    """F6 (client side): inside setpriv 65534 + unshare -Urpf the root server's socket shows the
    overflow uid and the server pid 0. An explicit server_policy governs; the default refuses
    and says what to do."""
    _need(["unshare", "-Urpf", "--mount-proc"])
    python = _python_for_nobody(["unshare", "-Urpf", "--mount-proc"])
    running = serve(Allowlist(uids=[65534]))
    impl = running.srv.implementation
    script = (
        "import asyncio, sys, machipc\n"
        "from machipc import aio\n"
        "from machipc.policies import AllowAll\n"
        "name, directory, impl, mode = sys.argv[1:5]\n"
        "policy = None if mode == 'default' else AllowAll()\n"
        "async def via_aio():\n"
        "    async with aio.Client(name, directory=directory, impl=impl, server_policy=policy) as c:\n"
        "        print('reply', (await c.request(b'hi')).decode(), c.sync.server_peer)\n"
        "try:\n"
        "    if mode == 'aio':\n"
        "        asyncio.run(via_aio())\n"
        "    else:\n"
        "        with machipc.Client(name, directory=directory, impl=impl, server_policy=policy) as c:\n"
        "            print('reply', c.request(b'hi', timeout=20).decode(), c.server_peer)\n"
        "except machipc.NotPermitted as exc:\n"
        "    print('refused', exc)\n"
    )
    for mode in ("explicit", "aio", "default"):
        argv = [*AS_NOBODY, "unshare", "-Urpf", "--mount-proc", *python, script,
                running.srv.name, running.sockdir, impl, mode]
        done = subprocess.run(argv, capture_output=True, timeout=60, cwd=tmp_path)
        out = done.stdout.decode()
        if mode != "default":
            assert out.startswith("reply ok Peer(pid=unknown, uid=65534"), (mode, out, done.stderr.decode(errors="replace"))
        else:
            assert out.startswith("refused") and "server_policy=" in out and "overflow uid" in out, out


# -- F4: a private mount over the trusted directory ----------------------------------------------


@pytest.mark.parametrize("which", ["same_directory", "executables"])
def test_private_mount_over_the_trusted_directory_does_not_pass(dirs, serve, which, caplog):  # noqa: F811
    """F4: inside unshare -Urm, uid 65534 mounts a tmpfs over the trusted directory and runs its
    own binary from there; /proc/PID/exe reads as the trusted path, but the running file is not
    the file that path names in the server's mount namespace."""
    _need(["unshare", "-Urm"])
    caplog.set_level(logging.WARNING, "machipc")
    trusted_client = client(dirs, "trusted")
    policy = SameDirectory(dirs["trusted"]) if which == "same_directory" else Allowlist(executables=[trusted_client])
    running = serve(policy)
    assert running.run(trusted_client, user=65534).returncode == ALLOWED  # control: the real one passes
    assert running.run(client(dirs, "outside"), user=65534).returncode == REJECTED
    own = client(dirs, "outside")  # the attacker's binary: same bytes, another file
    script = f'mount -t tmpfs none "$1" && cp "$2" "$1/client" && exec "$1/client" "$3" request'
    done = subprocess.run([*AS_NOBODY, "unshare", "-Urm", "sh", "-c", script, "sh", dirs["trusted"], own,
                           running.srv.path], capture_output=True, timeout=30)
    assert done.returncode == REJECTED, done.stderr.decode(errors="replace")
    assert "names in the server's mount namespace" in caplog.text, caplog.text
