"""A handler that returns something that is no reply: the requester learns it at once.

Plain serve, the worker pool and machipc.aio, on both transports. Before, the
client waited out its whole timeout and the server only logged
"could not answer request".
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import pytest

import machipc
from machipc import aio

WRONG = {"str": "text", "int": 5, "dict": {"a": 1}, "list": [b"x"]}
NAME = "org.test.results"


@pytest.mark.parametrize("value", sorted(WRONG))
@pytest.mark.parametrize("how", ["plain", "workers", "aio"])
def test_wrong_return_type_is_a_remote_error(how, value, impl, sockdir, caplog):
    caplog.set_level(logging.ERROR, "machipc")
    result = WRONG[value]
    if how == "aio":
        srv = aio.Server(NAME, directory=sockdir, impl=impl)

        async def handler(msg):
            return result

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_until_complete, args=(srv.serve(handler, signals=False),), daemon=True)
        stop = lambda: loop.call_soon_threadsafe(srv.stop)  # noqa: E731
        closed = lambda: srv.closed  # noqa: E731
    else:
        srv = machipc.Server(NAME, directory=sockdir, impl=impl)
        kwargs = {"workers": 2} if how == "workers" else {}
        thread = threading.Thread(target=srv.serve, args=(lambda msg: result,), kwargs=kwargs, daemon=True)
        stop, closed = srv.stop, lambda: srv.closed
    thread.start()
    try:
        with machipc.Client(NAME, directory=sockdir, impl=impl, timeout=60) as cli:
            with pytest.raises(machipc.RemoteError, match=type(result).__name__):
                cli.request(b"q")
            with pytest.raises(machipc.RemoteError):  # and the server goes on
                cli.request(b"q")
    finally:
        stop()
        thread.join(30)
    assert closed()
    assert f"request 1 from pid {os.getpid()}" in caplog.text
    assert (srv.sync if how == "aio" else srv).stats.handler_errors == 2
