"""``python -m machipc``: help, serve/send/request, and the demo."""

import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "machipc"]


def run(*args, **kw):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=60, **kw)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("serve", "send", "request", "demo"):
        assert cmd in out.stdout
    sub = run("request", "--help")
    assert "--timeout" in sub.stdout and "service name" in sub.stdout


def test_serve_send_request(sockdir):
    server = subprocess.Popen(
        CLI + ["serve", "org.test.cli", "--directory", sockdir, "--echo"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert "serving" in server.stdout.readline()
        assert run("send", "org.test.cli", "hello", "--directory", sockdir).returncode == 0
        out = run("request", "org.test.cli", "ping", "--directory", sockdir)
        assert out.returncode == 0 and out.stdout.strip() == "ping"
        line = server.stdout.readline()
        assert "message from pid" in line and "b'hello'" in line and f"uid {os.geteuid()}" in line
        assert " unit " in line  # the sender's systemd unit, for writing a SystemdUnit policy
    finally:
        server.terminate()
        server.wait(10)
    assert server.returncode == 0  # SIGTERM stops serve() cleanly


def test_unknown_service_is_a_clear_error(sockdir):
    out = run("request", "org.nobody", "x", "--directory", sockdir)
    assert out.returncode == 1 and "ServiceNotFound" in out.stderr and "org.nobody" in out.stderr


@pytest.mark.skipif(not any(os.access(os.path.join(p, "perl"), os.X_OK) for p in os.environ["PATH"].split(":")),
                    reason="perl not installed: the demo has no intruder to reject")
def test_demo_shows_accepted_and_rejected():
    out = run("demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "REJECTED" in out.stdout and "allowed:" in out.stdout and "[demo] OK" in out.stdout


def test_plist_command_writes_a_loadable_plist(tmp_path):
    import plistlib

    out = run("plist", "org.example.echo", "--program", "/usr/bin/python3", "/opt/daemon.py", "-o", str(tmp_path / "x.plist"))
    assert out.returncode == 0, out.stderr
    data = plistlib.loads((tmp_path / "x.plist").read_bytes())
    assert data["Label"] == "org.example.echo"
    assert data["MachServices"] == {"org.example.echo": True}
    assert data["ProgramArguments"] == ["/usr/bin/python3", "/opt/daemon.py"]


def test_serve_with_policy_file_rejects_and_errors_clearly(sockdir, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\nallowlist = { uids = [ }\n")
    out = run("serve", "org.test.pf", "--directory", sockdir, "--policy-file", str(bad))
    assert out.returncode == 1 and "bad.toml" in out.stderr

    good = tmp_path / "p.toml"
    good.write_text(f"[policy]\nallowlist = {{ uids = [{os.geteuid() + 1}] }}\n")
    server = subprocess.Popen(
        CLI + ["serve", "org.test.pf", "--directory", sockdir, "--policy-file", str(good)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert "serving" in server.stdout.readline()
        out = run("request", "org.test.pf", "hi", "--directory", sockdir)
        assert out.returncode == 1 and "Rejected" in out.stderr
    finally:
        server.terminate()
        server.wait(10)


# -- errors are one line, files are never clobbered -------------------------------


def one_line_error(out, status=None):
    assert out.returncode != 0 and (status is None or out.returncode == status), out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


PROGRAM = ["--program", "/usr/bin/python3", "/opt/daemon.py"]


def test_plist_into_a_directory_stdout_and_no_overwrite(tmp_path):
    import plistlib

    out = run("plist", "org.example.echo", *PROGRAM, "-o", f"{tmp_path}/")
    assert out.returncode == 0, out.stderr
    written = tmp_path / "org.example.echo.plist"
    assert plistlib.loads(written.read_bytes())["Label"] == "org.example.echo"
    assert [p.name for p in tmp_path.iterdir()] == ["org.example.echo.plist"]  # no temp file left
    line = one_line_error(run("plist", "org.example.echo", *PROGRAM, "-o", str(tmp_path)))
    assert "exists" in line and "--force" in line
    assert run("plist", "org.example.echo", *PROGRAM, "-o", str(written), "--force").returncode == 0
    out = subprocess.run(CLI + ["plist", "org.example.echo", *PROGRAM, "-o", "-"], capture_output=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and plistlib.loads(out.stdout)["Label"] == "org.example.echo"
    assert not (tmp_path / "-").exists()


@pytest.mark.skipif(sys.platform == "darwin", reason="the launchd default location is right on macOS")
def test_plist_without_output_is_refused_off_macos():
    line = one_line_error(run("plist", "org.example.nowhere", *PROGRAM))
    assert "-o" in line
    assert not os.path.exists("/Library/LaunchDaemons/org.example.nowhere.plist")


def test_policy_file_missing_and_policy_conflict(sockdir, tmp_path):
    line = one_line_error(run("serve", "org.test.pf", "--directory", sockdir, "--policy-file", str(tmp_path / "nope.toml")))
    assert "nope.toml" in line
    line = one_line_error(run("serve", "org.test.pf", "--directory", sockdir, "--policy", "allow-all", "--policy-file", str(tmp_path / "p.toml")), 2)
    assert "not allowed with" in line


@pytest.mark.parametrize("argv", [
    ["request", "org.test.none", "x", "--timeout", "-1"],
    ["request", "org.test.none", "x", "--timeout", "soon"],
    ["send", "org.test.none"],
    ["send", "org.test.none", "x", "--file", "/etc/hostname"],
    ["send", "bad/name", "x"],
    ["send", "org.test.none", "--file", "/nonexistent/payload"],
    ["unit", "org.test.u", "--exec", "/bin/true", "--mode", "9x"],
    ["nosuchcommand"],
    [],
])
def test_every_error_is_one_line(argv, sockdir):
    one_line_error(run(*argv, "--directory", sockdir) if argv and argv[0] in ("send", "request") else run(*argv))


def test_version():
    import machipc

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"machipc {machipc.__version__}"


def test_binary_payloads_from_file_and_stdin(sockdir, tmp_path):
    blob = bytes(range(256)) * 4
    (tmp_path / "in.bin").write_bytes(blob)
    server = subprocess.Popen(CLI + ["serve", "org.test.bin", "--directory", sockdir, "--echo"], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving" in server.stdout.readline()
        out = run("request", "org.test.bin", "--file", str(tmp_path / "in.bin"), "-o", str(tmp_path / "out.bin"), "--directory", sockdir)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "out.bin").read_bytes() == blob
        out = subprocess.run(CLI + ["request", "org.test.bin", "-f", "-", "-o", "-", "--directory", sockdir],
                             input=blob, capture_output=True, timeout=60)
        assert out.returncode == 0 and out.stdout == blob
        assert run("send", "org.test.bin", "-f", str(tmp_path / "in.bin"), "--directory", sockdir).returncode == 0
    finally:
        server.terminate()
        server.wait(10)


def test_request_with_a_server_policy_file(sockdir, tmp_path):
    """send/request take the server policy from a file (a client in a container needs one)."""
    server = subprocess.Popen(CLI + ["serve", "org.test.sp", "--directory", sockdir, "--echo"], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving" in server.stdout.readline()
        wrong = tmp_path / "wrong.toml"
        wrong.write_text(f"[policy]\nallowlist = {{ uids = [{os.geteuid() + 1}] }}\n")
        out = run("request", "org.test.sp", "hi", "--directory", sockdir, "--server-policy-file", str(wrong))
        assert out.returncode == 1 and "NotPermitted" in out.stderr and "is not trusted" in out.stderr
        right = tmp_path / "right.toml"
        right.write_text(f"[policy]\nallowlist = {{ uids = [{os.geteuid()}] }}\n")
        out = run("request", "org.test.sp", "hi", "--directory", sockdir, "--server-policy-file", str(right))
        assert out.returncode == 0 and out.stdout.strip() == "hi"
    finally:
        server.terminate()
        server.wait(10)
