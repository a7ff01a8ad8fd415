"""Shared fixtures: every transport test runs against both implementations."""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import textwrap
import threading

import pytest

import machipc
from machipc import _backend, wire

IMPLS = ["py"] + (["c"] if _backend._compiled is not None else [])


@pytest.fixture(params=IMPLS, ids=[f"{i}-transport" for i in IMPLS])
def impl(request) -> str:
    """'py' (pure-Python twin) and 'c' (Cython); test_backend fails if 'c' is missing."""
    return request.param


@pytest.fixture
def sockdir():
    """A short socket directory (sun_path is limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="mi-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def echo(msg: machipc.Message) -> bytes:
    return b"echo:" + bytes(msg.data)


@pytest.fixture
def serve(impl, sockdir):
    """start(handler, policy=None, name=..., serve_kw=None, **kw) -> Server running
    ``serve(handler, **serve_kw)`` in a thread; ``kw`` go to the Server."""
    running = []

    def start(handler=echo, policy=None, name="org.test.svc", serve_kw=None, **kw) -> machipc.Server:
        srv = machipc.Server(name, policy, directory=sockdir, impl=impl, **kw)
        thread = threading.Thread(target=srv.serve, args=(handler,), kwargs=serve_kw or {}, daemon=True)
        thread.start()
        running.append((srv, thread))
        return srv

    yield start
    for srv, thread in running:
        srv.close()
        thread.join(10)
        assert not thread.is_alive(), "serve() did not return after close()"


@pytest.fixture
def client(impl, sockdir):
    """connect(name=..., **kw) -> Client, closed after the test."""
    made = []

    def connect(name="org.test.svc", **kw) -> machipc.Client:
        cli = machipc.Client(name, directory=sockdir, impl=impl, **kw)
        made.append(cli)
        return cli

    yield connect
    for cli in made:
        cli.close()


def python_client(sockdir: str, impl: str, body: str, name: str = "org.test.svc") -> list[str]:
    """argv running ``body`` in a new Python process with ``c`` connected to ``name``."""
    code = "import machipc, os, sys\n" + f"c = machipc.Client({name!r}, directory={sockdir!r}, impl={impl!r})\n"
    return [sys.executable, "-c", code + textwrap.dedent(body)]


def raw_connect(path: str, timeout: float = 5.0) -> socket.socket:
    """A hand-driven SEQPACKET connection to a server, its HELLO (always the first
    packet a server sends, docs/protocol.md) already read."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.settimeout(timeout)
    hello = s.recv(wire.PACKET_MAX)
    assert wire.HEADER.unpack_from(hello)[2] == wire.Kind.HELLO, hello
    return s


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll ``condition()`` until true or ``timeout``; returns its last value."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(0.005)
    return True
