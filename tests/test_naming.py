"""Service names, runtime directories and squatting checks."""

import os
import socket
import stat

import pytest

from machipc import InvalidArgument, NotPermitted
from machipc.naming import check_socket_owner, lookup_dirs, runtime_dir, service_path, system_dir, validate_name


@pytest.mark.parametrize("name", ["org.example.echo", "a", "x_y-z.1", "A" * 100])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "a\0b", "a b", "A" * 101, "é", None])
def test_invalid_names(name):
    with pytest.raises(InvalidArgument):
        validate_name(name)


def test_runtime_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MACHIPC_RUNTIME_DIR", str(tmp_path / "explicit"))
    assert runtime_dir(create=True) == str(tmp_path / "explicit")
    monkeypatch.delenv("MACHIPC_RUNTIME_DIR")
    monkeypatch.delenv("MACHIPC_SYSTEM_DIR", raising=False)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    assert runtime_dir() == str(xdg / "machipc")
    assert lookup_dirs() == [str(xdg / "machipc"), "/run/machipc"]
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime_dir() == "/tmp/machipc-12345"
    assert lookup_dirs() == ["/tmp/machipc-12345", "/run/machipc"]
    # root's services are system services, XDG_RUNTIME_DIR or not
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert runtime_dir() == "/run/machipc" == system_dir()
    assert lookup_dirs() == ["/run/machipc"]


def test_system_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("MACHIPC_SYSTEM_DIR", str(tmp_path / "sys"))
    assert system_dir() == str(tmp_path / "sys")
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert lookup_dirs() == ["/tmp/machipc-12345", str(tmp_path / "sys")]


@pytest.mark.parametrize("which", ["system", "user", "explicit"])
def test_created_dir_mode_ignores_umask(monkeypatch, tmp_path, which):
    """Under umask 077 the system directory must still be 0755, or other users cannot reach it."""
    monkeypatch.delenv("MACHIPC_RUNTIME_DIR", raising=False)
    if which == "system":
        monkeypatch.setattr(os, "geteuid", lambda: 0)
        monkeypatch.setenv("MACHIPC_SYSTEM_DIR", str(tmp_path / "a" / "sys"))
        expected = 0o755
    elif which == "user":
        monkeypatch.setattr(os, "geteuid", os.getuid)
        if os.getuid() == 0:
            pytest.skip("root has no per-user directory")
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
        expected = 0o700
    else:
        monkeypatch.setenv("MACHIPC_RUNTIME_DIR", str(tmp_path / "explicit"))
        expected = 0o755
    old = os.umask(0o077)
    try:
        d = runtime_dir(create=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d).st_mode) == expected


def test_world_writable_sticky_dir_refused(monkeypatch, tmp_path):
    """A sticky world-writable directory (like /tmp) lets others squat names: refused too."""
    d = tmp_path / "sticky"
    d.mkdir()
    os.chmod(d, 0o1777)
    monkeypatch.setenv("MACHIPC_RUNTIME_DIR", str(d))
    with pytest.raises(NotPermitted, match="writable by others"):
        runtime_dir()


def test_world_writable_dir_refused(monkeypatch, tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    monkeypatch.setenv("MACHIPC_RUNTIME_DIR", str(d))
    with pytest.raises(NotPermitted, match="writable by others"):
        runtime_dir()


def test_path_too_long(tmp_path):
    with pytest.raises(InvalidArgument, match="longer than"):
        service_path("n" * 100, directory=str(tmp_path / ("d" * 40)))


def test_check_socket_owner(tmp_path):
    path = str(tmp_path / "s")
    with pytest.raises(FileNotFoundError):
        check_socket_owner(path, (os.geteuid(),))
    open(path, "w").close()
    with pytest.raises(NotPermitted, match="not a socket"):
        check_socket_owner(path, (os.geteuid(),))
    os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    assert check_socket_owner(path, (os.geteuid(),))
    with pytest.raises(NotPermitted, match="squatting"):
        check_socket_owner(path, (os.geteuid() + 12345,))
    s.close()
