"""machipc.launchd: plist generation (runs anywhere; launchd itself only on macOS)."""

import os
import plistlib
from pathlib import Path

import pytest

from machipc import launchd
from machipc.errors import InvalidArgument

ROOT = Path(__file__).resolve().parent.parent


def test_write_plist_round_trip(tmp_path):
    path = launchd.write_plist("com.example.svc", ["/usr/bin/python3", "/opt/svc/daemon.py", "--flag"], False,
                               path=str(tmp_path / "x.plist"))
    assert path == str(tmp_path / "x.plist")
    with open(path, "rb") as f:
        job = plistlib.load(f)
    assert job["Label"] == "com.example.svc"
    assert job["ProgramArguments"] == ["/usr/bin/python3", "/opt/svc/daemon.py", "--flag"]
    assert job["MachServices"] == {"com.example.svc": True}
    assert job["KeepAlive"] is True and job["RunAtLoad"] is True
    assert job["ProcessType"] == "Background"
    assert os.stat(path).st_mode & 0o777 == 0o644  # launchd refuses writable-by-others job files
    assert not list(tmp_path.glob("*.tmp*"))


def test_write_plist_user_agent_default_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(launchd.sys, "platform", "darwin")  # the default locations are macOS's
    path = launchd.write_plist("com.example.agent", ["/bin/echo"], True)
    assert path == str(tmp_path / "Library" / "LaunchAgents" / "com.example.agent.plist")
    job = plistlib.loads(Path(path).read_bytes())
    assert job["ProcessType"] == "Interactive" and job["MachServices"] == {"com.example.agent": True}


def test_default_daemon_path():
    assert launchd.default_path("com.x", False) == "/Library/LaunchDaemons/com.x.plist"


@pytest.mark.parametrize(
    "name, program",
    [("", ["/bin/true"]), ("a" * 128, ["/bin/true"]), ("com.x", []), ("com.x", ["python3", "d.py"])],
)
def test_plist_refuses_bad_input(name, program):
    with pytest.raises(InvalidArgument):
        launchd.plist_dict(name, program)


def test_example_plist_is_valid():
    with open(ROOT / "launchd" / "com.example.machipc-echo.plist", "rb") as f:
        job = plistlib.load(f)
    for key in ("Label", "ProgramArguments", "MachServices", "KeepAlive", "RunAtLoad"):
        assert key in job
    assert job["Label"] in job["MachServices"]
    assert job["ProgramArguments"][-1] == job["Label"]


def test_example_daemon_compiles():
    src = (ROOT / "launchd" / "echo_daemon.py").read_text()
    compile(src, "echo_daemon.py", "exec")
    assert "machipc.Server" in src and "POLICY" in src
