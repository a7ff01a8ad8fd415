"""The transport contract (machipc/transport.py): both Linux twins implement it, and it is
chosen in one place."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

import machipc
from machipc import transport

ROOT = Path(machipc.__file__).resolve().parent


def test_each_twin_implements_the_contract(impl, sockdir):
    with machipc.Server("org.test.contract", directory=sockdir, impl=impl) as srv:
        assert isinstance(srv._transport, transport.ServerTransport)
        with machipc.Client("org.test.contract", directory=sockdir, impl=impl) as cli:
            assert isinstance(cli._conn, transport.Conn)
            assert cli.implementation == srv.implementation == impl


def test_backend_is_chosen_by_impl(impl):
    assert transport.backend(impl).implementation == impl
    with pytest.raises(machipc.InvalidArgument):
        transport.backend("rust")


def test_call_returns_the_reply_to_the_request_it_sent(impl, sockdir):
    with machipc.Server("org.test.call", directory=sockdir, impl=impl) as srv:
        with machipc.Client("org.test.call", directory=sockdir, impl=impl) as cli:
            t = threading.Thread(target=lambda: srv.receive(timeout=10).reply(b"answer"))
            t.start()
            got = cli._conn.call(7, b"question", 10.0)
            t.join(10)
    assert got == b"answer"  # the matching inline REPLY: its payload alone


def test_call_hands_any_other_packet_on_whole(impl, sockdir):
    """A reply to another request, or an error, is the record for the caller to match."""
    with machipc.Server("org.test.call", directory=sockdir, impl=impl) as srv:
        with machipc.Client("org.test.call", directory=sockdir, impl=impl) as cli:
            def serve():
                srv.receive(timeout=10).reply(b"to five")
                srv.receive(timeout=10).fail("no")
            t = threading.Thread(target=serve)
            t.start()
            cli._conn.send(machipc.wire.Kind.REQUEST, 5, b"first", 10.0)
            late = cli._conn.call(7, b"second", 10.0)
            error = cli._conn.recv(10.0)
            t.join(10)
    assert late.status == machipc.wire.Drop.OK and late.kind == machipc.wire.Kind.REPLY
    assert late.request_id == 5 and late.payload == b"to five"
    assert error.status == machipc.wire.Drop.OK and error.kind == machipc.wire.Kind.ERROR and error.request_id == 7


def test_server_and_client_never_ask_for_the_platform():
    for name in ("server.py", "client.py", "aio.py"):
        assert "sys.platform" not in (ROOT / name).read_text(), name


def _imports(module: str) -> set[str]:
    """The machipc modules ``module`` imports (relative imports, anywhere in the file)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [alias.name for alias in node.names])
    return found


def test_arena_and_the_transport_do_not_import_each_other():
    # arena.py and unix.py used to import each other (a circle, broken by a late import).
    assert "arena" in _imports("unix")  # the transport uses the arena...
    assert not {"unix", "_unix", "transport"} & _imports("arena")  # ...never the other way
