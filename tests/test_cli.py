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
