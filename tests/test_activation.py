"""systemd socket activation, sd_notify, unit files, and a real systemd-socket-activate run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import machipc
from machipc import activation, cli

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SSA = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"

# Runs in a fresh interpreter: it puts listeners on fds 3.. and plays the service manager.
CHILD_PRELUDE = """
import fcntl, json, os, socket, sys
import machipc
from machipc import activation

def listener(path, kind=socket.SOCK_SEQPACKET):
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(path)
    s.listen()
    return s

def place(socks, names=None, pid=None):
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100) for s in socks]
    for s in socks:
        s.close()
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid() if pid is None else pid)
    os.environ["LISTEN_FDS"] = str(len(socks))
    if names is not None:
        os.environ["LISTEN_FDNAMES"] = ":".join(names)

def cloexec(fd):
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
"""


def run_child(body: str, impl: str, sockdir: str) -> str:
    code = CHILD_PRELUDE + f"IMPL, D = {impl!r}, {sockdir!r}\n" + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_adopts_named_fd_unsets_environment(impl, sockdir):
    out = run_child(
        """
        other, mine = listener(D + "/other"), listener(D + "/mine")
        place([other, mine], names=["other", "org.test.act"])
        srv = machipc.Server("org.test.act", impl=IMPL)
        assert srv.activated and srv.path == D + "/mine", srv.path
        assert not any(k in os.environ for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
        assert cloexec(3) and cloexec(4)
        assert activation.listen_fds() == {3: "other"}  # still there for another server
        assert srv.pidfd_guard in ("SO_PEERPIDFD", "pidfd_open")
        with machipc.Client("mine", directory=D, impl=IMPL) as c:
            c.send(b"hi")
        msg = srv.receive(timeout=5)
        assert msg.data == b"hi" and msg.sender.pid == os.getpid()
        srv.close()
        assert os.path.exists(D + "/mine"), "the manager's socket file must stay"
        print("ok")
        """,
        impl,
        sockdir,
    )
    assert out == "ok"


def test_only_fd_is_taken_without_names_and_from_systemd(impl, sockdir):
    out = run_child(
        """
        place([listener(D + "/sock")])
        srv = machipc.Server.from_systemd("org.test.any", impl=IMPL)
        assert srv.activated and srv.path == D + "/sock"
        srv.close()
        try:
            machipc.Server.from_systemd("org.test.any", impl=IMPL)
        except machipc.IPCError as exc:
            print("ok", "no socket-activated listener" in str(exc))
        """,
        impl,
        sockdir,
    )
    assert out == "ok True"


def test_other_pid_is_ignored_and_unset(impl, sockdir):
    out = run_child(
        """
        place([listener(D + "/sock")], pid=1)
        srv = machipc.Server("org.test.own", directory=D, impl=IMPL)
        assert not srv.activated and srv.path == D + "/org.test.own"
        assert "LISTEN_FDS" not in os.environ and activation.listen_fds() == {}
        srv.close()
        print("ok")
        """,
        impl,
        sockdir,
    )
    assert out == "ok"


def test_wrong_socket_type(impl, sockdir):
    out = run_child(
        """
        place([listener(D + "/stream", socket.SOCK_STREAM)])
        srv = machipc.Server("org.test.own", directory=D, impl=IMPL)  # not ours: left alone
        assert not srv.activated
        os.fstat(3)  # still open
        srv.close()
        try:
            machipc.Server.from_systemd("org.test.own", impl=IMPL)
        except machipc.InvalidArgument as exc:
            print("ok", "ListenSequentialPacket" in str(exc))
        """,
        impl,
        sockdir,
    )
    assert out == "ok True"


def test_notify(sockdir, monkeypatch):
    path = os.path.join(sockdir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert activation.notify("READY=1")
        assert sock.recv(100) == b"READY=1"
    abstract = f"machipc-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + abstract)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + abstract)
        assert activation.notify("STOPPING=1")
        assert sock.recv(100) == b"STOPPING=1"
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(sockdir, "nobody-listens"))
    assert activation.notify("READY=1") is False
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert activation.notify("READY=1") is False


def test_unit_files(tmp_path, capsys):
    files = activation.unit_files("org.example.x", "/usr/bin/x --serve", mode=0o660, user="svc")
    sock, service = files["org.example.x.socket"], files["org.example.x.service"]
    assert "ListenSequentialPacket=/run/machipc/org.example.x\n" in sock or os.environ.get("MACHIPC_RUNTIME_DIR")
    assert "PassCredentials=yes\n" in sock and "SocketMode=0660\n" in sock
    assert "FileDescriptorName=org.example.x\n" in sock
    assert "ExecStart=/usr/bin/x --serve\n" in service and "User=svc\n" in service
    assert "Type=notify\n" in service and "Requires=org.example.x.socket\n" in service
    with pytest.raises(machipc.InvalidArgument):
        activation.unit_files("bad/name", "/usr/bin/x")
    with pytest.raises(machipc.InvalidArgument):
        activation.unit_files("org.example.x", "/usr/bin/x\nExecStartPre=/bin/evil")

    assert cli.main(["unit", "org.example.x", "--exec", "/usr/bin/x", "--path", "/run/x.sock", "-o", str(tmp_path)]) == 0
    assert "ListenSequentialPacket=/run/x.sock\n" in (tmp_path / "org.example.x.socket").read_text()
    assert (tmp_path / "org.example.x.service").exists()
    assert cli.main(["unit", "org.example.x", "--exec", "/usr/bin/x", "-o", str(tmp_path)]) == 1  # exists
    assert cli.main(["unit", "org.example.x", "--exec", "/usr/bin/y", "-o", str(tmp_path), "--force"]) == 0
    assert "ExecStart=/usr/bin/y\n" in (tmp_path / "org.example.x.service").read_text()


# -- end to end: Debian's systemd-socket-activate starts the daemon ------------

needs_ssa = pytest.mark.skipif(
    not os.access(SSA, os.X_OK),
    reason=f"{SSA} is missing (Debian: apt-get install systemd, or `make` installs it)",
)

SLOW_DAEMON = """
import asyncio, machipc
from machipc import aio, policies

async def handle(msg):
    await asyncio.sleep(0.3)
    return b"r:" + msg.data

async def main():
    async with aio.Server("org.test.act", policies.SameUser()) as srv:
        assert srv.activated
        await srv.serve(handle)

asyncio.run(main())
"""


class Activated:
    """systemd-socket-activate listening on sockdir/NAME, with a NOTIFY_SOCKET to watch."""

    def __init__(self, sockdir: str, impl: str, argv: list[str], name: str) -> None:
        self.path = os.path.join(sockdir, name)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(os.path.join(sockdir, "notify"))
        self.notify.settimeout(15)
        env = dict(os.environ, MACHIPC_PURE_PYTHON="1" if impl == "py" else "0")
        env.pop("LISTEN_FDS", None)
        self.proc = subprocess.Popen(
            [SSA, "--seqpacket", "-l", self.path, f"--fdname={name}", "-E", f"NOTIFY_SOCKET={sockdir}/notify",
             "-E", f"MACHIPC_PURE_PYTHON={env['MACHIPC_PURE_PYTHON']}", "-E", f"PYTHONPATH={ROOT}", *argv],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 15
        while not os.path.exists(self.path):
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.01)

    def expect(self, state: str) -> None:
        assert self.notify.recv(200).decode() == state

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stderr.close()
        self.notify.close()


@needs_ssa
def test_systemd_socket_activate_example_daemon(impl, sockdir):
    name = "org.example.hello"
    daemon = os.path.join(ROOT, "systemd", "hello_daemon.py")
    act = Activated(sockdir, impl, [sys.executable, daemon, name], name)
    try:
        # The first connection starts the daemon (its listener had no SO_PASSCRED yet).
        with machipc.Client(name, directory=sockdir, impl=impl) as first:
            reply = first.request(b"first", timeout=15)
            assert reply == b"hello pid %d uid %d: first" % (os.getpid(), os.geteuid())
            act.expect("READY=1")
            with machipc.Client(name, directory=sockdir, impl=impl) as second:
                assert second.request(b"second", timeout=5).endswith(b": second")
        act.proc.send_signal(signal.SIGTERM)
        act.expect("STOPPING=1")
        assert act.proc.wait(15) == 0
    finally:
        act.close()


@needs_ssa
def test_systemd_socket_activate_sigterm_loses_nothing(impl, sockdir):
    act = Activated(sockdir, impl, [sys.executable, "-c", SLOW_DAEMON], "org.test.act")
    try:
        clients = [machipc.Client("org.test.act", directory=sockdir, impl=impl) for _ in range(8)]
        results: dict[int, bytes] = {}

        def ask(i: int) -> None:
            results[i] = clients[i].request(b"%d" % i, timeout=20)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        act.expect("READY=1")
        time.sleep(0.1)  # every request sent; handlers take 0.3 s
        act.proc.send_signal(signal.SIGTERM)
        act.expect("STOPPING=1")
        for t in threads:
            t.join(20)
        for c in clients:
            c.close()
        assert results == {i: b"r:%d" % i for i in range(8)}
        assert act.proc.wait(15) == 0
    finally:
        act.close()


def test_client_unit_file(tmp_path, capsys):
    """The client's unit is named what the daemon's SystemdUnit policy allows."""
    files = activation.client_unit_file("org.example.x", "backup", "/usr/bin/backup --now", user="bk")
    assert list(files) == ["backup.service"]
    text = files["backup.service"]
    assert "ExecStart=/usr/bin/backup --now\n" in text and "User=bk\n" in text
    assert "Wants=org.example.x.socket\n" in text and "After=org.example.x.socket\n" in text
    assert 'systemd_unit = "backup.service"' in text
    assert list(activation.client_unit_file("org.example.x", "backup.service", "/b", unit="xd")) == ["backup.service"]
    assert "After=xd.socket\n" in activation.client_unit_file("org.example.x", "backup", "/b", unit="xd")["backup.service"]
    for bad in ("a@b", "a/b", "", "bäd", "a b"):
        with pytest.raises(machipc.InvalidArgument):
            activation.client_unit_file("org.example.x", bad, "/b")
    with pytest.raises(machipc.InvalidArgument):
        activation.client_unit_file("org.example.x", "backup", "/b\nExecStartPre=/bin/evil")
    assert cli.main(["unit", "org.example.x", "--client", "backup", "--exec", "/usr/bin/b", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "backup.service").exists() and 'SystemdUnit("backup.service")' in out
    from machipc.policies import SystemdUnit, loads

    assert loads('[policy]\nsystemd_unit = "backup.service"\n').names == SystemdUnit("backup.service").names


# -- malformed activation environments -----------------------------------------
# Each case sets up fds 3.. and the variables in a fresh process, then tries
# Server(name) and Server.from_systemd(name). "bound": the variables were ignored
# or the fd left alone and the server bound its own socket; "adopted": it took fd 3.

MALFORMED_SETUP = {
    "pipe_unnamed": "r, w = os.pipe(); os.dup2(r, 3); env(1)",
    "pipe_named": "r, w = os.pipe(); os.dup2(r, 3); env(1, names='org.test.act')",
    "fds_not_a_number": "env('x')",
    "fds_negative": "env(-1)",
    "fds_zero": "env(0)",
    "pid_not_a_number": "place([listener(D + '/l')]); os.environ['LISTEN_PID'] = 'abc'",
    "pid_empty": "place([listener(D + '/l')]); os.environ['LISTEN_PID'] = ''",
    "pid_other": "place([listener(D + '/l')], pid=1)",
    "fd_closed": "os.closerange(3, 10); env(1)",
    "second_fd_closed": "place([listener(D + '/l')]); os.closerange(4, 10); os.environ['LISTEN_FDS'] = '2'",
    "tcp_listener": "t = socket.socket(); t.bind(('127.0.0.1', 0)); t.listen(); place([t])",
    "stream_listener": "place([listener(D + '/l', socket.SOCK_STREAM)])",
    "not_listening": "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.bind(D + '/l'); place([s])",
    "names_miscounted": "place([listener(D + '/l')], names=['a', 'b'])",
}
MALFORMED_EXPECTED = {  # (Server(name), Server.from_systemd(name))
    "pipe_unnamed": ("bound", "InvalidArgument"),
    "pipe_named": ("InvalidArgument", "InvalidArgument"),
    "fds_not_a_number": ("bound", "IPCError"),
    "fds_negative": ("bound", "IPCError"),
    "fds_zero": ("bound", "IPCError"),
    "pid_not_a_number": ("bound", "IPCError"),
    "pid_empty": ("bound", "IPCError"),
    "pid_other": ("bound", "IPCError"),
    "fd_closed": ("bound", "IPCError"),
    "second_fd_closed": ("adopted", "adopted"),
    "tcp_listener": ("bound", "InvalidArgument"),
    "stream_listener": ("bound", "InvalidArgument"),
    "not_listening": ("bound", "InvalidArgument"),
    "names_miscounted": ("adopted", "adopted"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SETUP))
def test_malformed_activation_environment(case, sockdir):
    body = f"""
    def env(count, names=None):
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["LISTEN_FDS"] = str(count)
        if names:
            os.environ["LISTEN_FDNAMES"] = names

    outcomes = []
    for make in (lambda: machipc.Server("org.test.act", directory=D), lambda: machipc.Server.from_systemd("org.test.act")):
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
        activation._inherited = None
        {MALFORMED_SETUP[case]}
        try:
            srv = make()
        except machipc.IPCError as exc:
            outcomes.append(type(exc).__name__)
        else:
            outcomes.append("adopted" if srv.activated else "bound")
            srv.close()
        for key in ("l",):
            try:
                os.unlink(os.path.join(D, key))
            except FileNotFoundError:
                pass
    print(" ".join(outcomes))
    """
    assert tuple(run_child(body, "py", sockdir).split()) == MALFORMED_EXPECTED[case]
