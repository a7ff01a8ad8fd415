"""Service names, runtime directories and squatting checks."""

import os
import socket
import stat

import pytest

from machipc import InvalidArgument, NotPermitted
from machipc.naming import check_socket_owner, runtime_dir, service_path, validate_name


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
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    d = runtime_dir(create=True)
    assert d == str(xdg / "machipc") and stat.S_IMODE(os.stat(d).st_mode) == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    expected = "/run/machipc" if os.geteuid() == 0 else f"/tmp/machipc-{os.geteuid()}"
    assert runtime_dir() == expected


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
