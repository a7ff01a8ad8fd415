"""System services reachable by every user; per-user services shadow only their owner's view.

Real processes: a root server in a test-only system directory
(``MACHIPC_SYSTEM_DIR``), clients and per-user servers run as other uids with
``setpriv`` (util-linux).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest

import machipc
from machipc.policies import AllowAll

NAME = "org.test.system"
NOBODY, OTHER = 65534, 65533


@pytest.fixture(autouse=True)
def _needs_root():
    if os.geteuid() != 0:
        pytest.skip("serving as root and running clients as other uids needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")


def _public_dir(prefix: str, owner: int = 0, mode: int = 0o755) -> str:
    d = tempfile.mkdtemp(prefix=prefix)
    os.chown(d, owner, owner)
    os.chmod(d, mode)
    return d


@pytest.fixture
def system(monkeypatch):
    """A fresh system directory (not yet created) inside a world-readable one."""
    parent = _public_dir("mi-sys-")
    path = os.path.join(parent, "machipc")
    monkeypatch.setenv("MACHIPC_SYSTEM_DIR", path)
    monkeypatch.delenv("MACHIPC_RUNTIME_DIR", raising=False)
    yield path
    shutil.rmtree(parent, ignore_errors=True)


def as_user(uid: int, code: str, system_dir: str, xdg: str | None = None, timeout: float = 60):
    """Run Python ``code`` as ``uid`` with a clean machipc environment; returns CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MACHIPC_", "XDG_"))}
    env["MACHIPC_SYSTEM_DIR"] = system_dir
    if xdg:
        env["XDG_RUNTIME_DIR"] = xdg
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-c", code]
    return subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True, timeout=timeout)


REQUEST = f"import machipc\nprint(machipc.Client({NAME!r}, impl=IMPL).request(b'who').decode())\n"


def serve_root(reply: bytes, impl: str, umask: int = 0o022) -> tuple[machipc.Server, threading.Thread]:
    old = os.umask(umask)
    try:
        srv = machipc.Server(NAME, AllowAll(), impl=impl)
    finally:
        os.umask(old)
    thread = threading.Thread(target=srv.serve, args=(lambda msg: reply,), daemon=True)
    thread.start()
    return srv, thread


def stop(srv, thread):
    srv.close()
    thread.join(10)


def test_default_system_dir_is_run_machipc(monkeypatch):
    monkeypatch.delenv("MACHIPC_SYSTEM_DIR", raising=False)
    monkeypatch.delenv("MACHIPC_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent")
    from machipc.naming import lookup_dirs, runtime_dir

    assert runtime_dir() == "/run/machipc" and lookup_dirs() == ["/run/machipc"]


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_non_root_client_reaches_root_service(system, impl, umask):
    """No configuration on the client's side: no XDG_RUNTIME_DIR tricks, no directory=."""
    srv, thread = serve_root(b"system", impl, umask)
    try:
        assert srv.path == os.path.join(system, NAME)
        assert os.stat(system).st_mode & 0o777 == 0o755
        done = as_user(NOBODY, f"IMPL = {impl!r}\n" + REQUEST, system)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "system"
        # ... and with an XDG_RUNTIME_DIR of its own (a desktop session) too
        xdg = _public_dir("mi-xdg-", NOBODY, 0o700)
        try:
            done = as_user(NOBODY, f"IMPL = {impl!r}\n" + REQUEST, system, xdg=xdg)
            assert done.stdout.strip() == "system", done.stderr
        finally:
            shutil.rmtree(xdg, ignore_errors=True)
    finally:
        stop(srv, thread)


def test_root_client_with_xdg_runtime_dir_finds_system_service(system, impl, monkeypatch):
    srv, thread = serve_root(b"system", impl)
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent")
        with machipc.Client(NAME, impl=impl) as cli:
            assert cli.request(b"x") == b"system"
    finally:
        stop(srv, thread)


USER_SERVER = f"""
import machipc, sys, threading
from machipc.policies import AllowAll
srv = machipc.Server({NAME!r}, AllowAll())
threading.Thread(target=srv.serve, args=(lambda msg: b"user",), daemon=True).start()
print(srv.path, flush=True)
sys.stdin.readline()  # the test says when to stop
srv.close()
"""


def test_user_service_shadows_only_its_owners_view(system, impl):
    """nobody's own server of the same name is what nobody reaches; nobody else sees it."""
    srv, thread = serve_root(b"system", impl)
    xdg_nobody = _public_dir("mi-xdg-", NOBODY, 0o700)
    xdg_other = _public_dir("mi-xdg-", OTHER, 0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MACHIPC_", "XDG_"))}
    env.update(MACHIPC_SYSTEM_DIR=system, XDG_RUNTIME_DIR=xdg_nobody)
    user_server = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", USER_SERVER],
        env=env, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        path = user_server.stdout.readline().strip()
        assert path == os.path.join(xdg_nobody, "machipc", NAME)
        code = f"IMPL = {impl!r}\n" + REQUEST
        assert as_user(NOBODY, code, system, xdg=xdg_nobody).stdout.strip() == "user"
        assert as_user(OTHER, code, system, xdg=xdg_other).stdout.strip() == "system"
        # another user pointing XDG_RUNTIME_DIR at nobody's directory is refused it,
        # and still reaches the system service
        assert as_user(OTHER, code, system, xdg=xdg_nobody).stdout.strip() == "system"
        with machipc.Client(NAME, impl=impl) as cli:  # root
            assert cli.request(b"x") == b"system"
    finally:
        user_server.stdin.close()
        user_server.wait(30)
        stop(srv, thread)
        shutil.rmtree(xdg_nobody, ignore_errors=True)
        shutil.rmtree(xdg_other, ignore_errors=True)


def test_squatted_tmp_dir_names_owner_and_fix(system):
    """Another user made /tmp/machipc-UID first: the error says who and what to do."""
    victim = random.randrange(40000, 60000)  # concurrent runs must not share the predictable path
    squatted = f"/tmp/machipc-{victim}"
    try:
        os.mkdir(squatted, 0o700)
    except FileExistsError:
        pytest.skip(f"{squatted} already exists")
    os.chown(squatted, NOBODY, NOBODY)
    try:
        done = as_user(victim, f"import machipc\nmachipc.Server({NAME!r})\n", system)
        assert done.returncode != 0
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("machipc.errors.NotPermitted:"), done.stderr
        assert "'nobody' (uid 65534)" in last and "XDG_RUNTIME_DIR" in last and f"rm -r {squatted}" in last
        # a client of that user still reaches system services through the squat
        srv, thread = serve_root(b"system", "py")
        try:
            assert as_user(victim, "IMPL = None\n" + REQUEST, system).stdout.strip() == "system"
        finally:
            stop(srv, thread)
    finally:
        shutil.rmtree(squatted, ignore_errors=True)


def test_unreadable_runtime_dir_is_not_permitted(system):
    locked = _public_dir("mi-locked-", 0, 0o700)
    try:
        code = (
            "import machipc, os\n"
            f"os.environ['MACHIPC_RUNTIME_DIR'] = {os.path.join(locked, 'd')!r}\n"
            "for make in (lambda: machipc.Client('org.test.x'), lambda: machipc.Server('org.test.x')):\n"
            "    try:\n"
            "        make()\n"
            "    except machipc.NotPermitted as exc:\n"
            "        print('NotPermitted', exc)\n"
        )
        done = as_user(NOBODY, code, system)
        assert done.stdout.count("NotPermitted") == 2, done.stdout + done.stderr
    finally:
        shutil.rmtree(locked, ignore_errors=True)
