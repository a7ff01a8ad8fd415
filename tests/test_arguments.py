"""Bad arguments to public calls raise InvalidArgument (a ValueError and a TypeError), on both transports."""

from __future__ import annotations

import asyncio

import pytest

import machipc
from machipc import InvalidArgument, aio

NAME = "org.test.args"


def test_invalid_argument_is_both_builtins():
    assert issubclass(InvalidArgument, ValueError) and issubclass(InvalidArgument, TypeError)
    assert issubclass(InvalidArgument, machipc.IPCError)


@pytest.mark.parametrize("kwargs", [
    {"max_size": -1}, {"max_size": "1"}, {"mode": "0666"}, {"backlog": None}, {"reply_timeout": "5"},
    {"reply_timeout": -1.0}, {"impl": "z"},
])
def test_server_arguments(kwargs, sockdir):
    with pytest.raises(InvalidArgument):
        machipc.Server(NAME, directory=sockdir, **kwargs)


def test_server_name_type(sockdir):
    with pytest.raises(InvalidArgument):
        machipc.Server(12, directory=sockdir)


@pytest.mark.parametrize("kwargs", [{"timeout": "2"}, {"timeout": -1}, {"timeout": float("nan")}, {"max_size": "x"}, {"connect_timeout": "1"}])
def test_client_arguments(kwargs, serve, sockdir, impl):
    serve(name=NAME)
    with pytest.raises(InvalidArgument):
        machipc.Client(NAME, directory=sockdir, impl=impl, **kwargs)


@pytest.mark.parametrize("call", [
    lambda c: c.request(12), lambda c: c.request("text"), lambda c: c.send({"a": 1}), lambda c: c.send_many(["s"]),
    lambda c: c.request(b"x", timeout="2"), lambda c: c.send(b"x", timeout=-1), lambda c: c.send(b"x", timeout=True),
    lambda c: c.buffer("10"),
])
def test_client_call_arguments(call, serve, client):
    serve(name=NAME)
    cli = client(NAME)
    with pytest.raises(InvalidArgument):
        call(cli)
    assert cli.request(b"still fine") == b"echo:still fine"


@pytest.mark.parametrize("call", [lambda s: s.receive(timeout="1"), lambda s: s.receive_many(0), lambda s: s.receive_many(2, timeout=-1),
                                  lambda s: s.serve(lambda m: None, workers=-1), lambda s: s.serve(lambda m: None, drain_timeout="x")])
def test_server_call_arguments(call, sockdir, impl):
    with machipc.Server(NAME, directory=sockdir, impl=impl) as srv:
        with pytest.raises(InvalidArgument):
            call(srv)


def test_aio_arguments(serve, sockdir, impl):
    serve(name=NAME)

    async def main():
        with pytest.raises(InvalidArgument):
            aio.Server(NAME + ".a", directory=sockdir, impl=impl, max_queue=0)
        async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
            with pytest.raises(InvalidArgument):
                await cli.send("text")
            with pytest.raises(InvalidArgument):
                await cli.request(b"x", timeout="1")
            assert await cli.request(b"ok") == b"echo:ok"

    asyncio.run(main())


@pytest.mark.parametrize("obj", [machipc.Server, machipc.Client, aio.Client, aio.Server, machipc.ServerStats])
def test_help_shows_no_object_addresses(obj):
    import pydoc

    text = pydoc.render_doc(obj, renderer=pydoc.plaintext)
    assert " object at 0x" not in text


def test_server_help_documents_parameters_units_errors_and_stats():
    import pydoc

    text = pydoc.render_doc(machipc.Server, renderer=pydoc.plaintext)
    for needed in ("max_size", "bytes", "reply_timeout", "seconds", "backlog", "InvalidArgument", "ServiceInUse",
                   "NotPermitted", "ServerStats"):
        assert needed in text, needed
    stats = pydoc.render_doc(machipc.ServerStats, renderer=pydoc.plaintext)
    for field in ("received", "rejected", "would_reject", "too_large", "dropped", "handler_errors", "reply_errors"):
        assert f"``{field}``" in stats, field
