"""Finding 3: a kqueue fd stays readable until the kqueue is processed, so machipc.aio
busy-spun after the first message. The fake KQueue is readable exactly while its
knote is queued (see fakekernel.KQueue), so "readable after the port is empty"
is the spin."""

import asyncio
import select

import machipc
from machipc import aio, mach
from machipc.wire import Kind

NAME = "org.machipc.sim.aio"


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_fileno_not_readable_after_recv_empties_the_port():
    server = mach.server_transport(NAME)
    client = mach.client_conn(NAME, 5.0)
    try:
        fd = server.fileno()
        assert not readable(fd)
        client.send(Kind.MESSAGE, 0, b"x", 1.0)
        assert readable(fd)
        assert server.recv(0).status == 0
        assert server.recv(0) is None  # what every reader callback ends with
        assert not readable(fd), "the kqueue fd stayed readable with the port empty: asyncio would spin"
        client.send(Kind.REQUEST, 3, b"y", 1.0)
        server.recv(0).conn.send(Kind.REPLY, 3, b"z", 1.0)
        cfd = client.fileno()
        assert readable(cfd)
        assert client.recv_nowait().request_id == 3 and client.recv_nowait() is None
        assert not readable(cfd)
    finally:
        client.close()
        server.close()


def test_aio_server_and_client_go_idle_after_traffic():
    async def main():
        async with aio.Server(NAME) as srv:
            serving = asyncio.create_task(srv.serve(lambda m: bytes(m.data).upper()))
            async with aio.Client(NAME) as cli:
                assert await cli.request(b"abc", timeout=30) == b"ABC"
                await cli.send(b"one-way")
                for _ in range(20):
                    await asyncio.sleep(0)
                assert not readable(aio.reader_fd(srv.sync._transport)), "aio.Server's reader would spin"
                assert not readable(aio.reader_fd(cli._conn)), "aio.Client's reader would spin"
            srv.stop()
            await serving

    asyncio.run(asyncio.wait_for(main(), 60))


def test_sync_client_against_aio_server():
    async def main():
        async with aio.Server(NAME) as srv:
            serving = asyncio.create_task(srv.serve(lambda m: b"ok"))
            loop = asyncio.get_running_loop()

            def call():
                with machipc.Client(NAME, timeout=30) as cli:
                    return [cli.request(b"%d" % i) for i in range(50)]

            assert await loop.run_in_executor(None, call) == [b"ok"] * 50
            srv.stop()
            await serving

    asyncio.run(asyncio.wait_for(main(), 60))
