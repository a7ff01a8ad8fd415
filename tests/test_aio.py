"""machipc.aio: asyncio server and client, on both transports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import machipc
from machipc import aio, policies

NAME = "org.test.aio"


def run(coro, timeout: float = 30):
    """Run ``coro`` on a fresh loop, failing the test if it hangs."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def upper(msg: machipc.Message) -> bytes:
    await asyncio.sleep(0)
    return bytes(msg.data).upper()


def test_request_reply_and_concurrency(impl, sockdir):
    async def main():
        async with aio.Server(NAME, directory=sockdir, impl=impl) as srv:
            serving = asyncio.create_task(srv.serve(upper))
            async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
                assert await cli.request(b"abc", timeout=5) == b"ABC"
                replies = await asyncio.gather(*(cli.request(b"m%d" % i, timeout=10) for i in range(300)))
                assert replies == [b"M%d" % i for i in range(300)]
            srv.stop()
            await serving
            assert srv.closed and srv.stats.received == 301
            assert not os.path.exists(srv.path)

    run(main())


def test_async_for_one_way_messages_and_sender(impl, sockdir):
    async def main():
        async with aio.Server(NAME, directory=sockdir, impl=impl) as srv:
            async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
                for i in range(5):
                    await cli.send(b"%d" % i)
                got = []
                async for msg in srv:
                    assert not msg.expects_reply
                    assert msg.sender.pid == os.getpid() and msg.sender.uid == os.geteuid()
                    got.append(bytes(msg.data))
                    if len(got) == 5:
                        srv.stop()
                assert got == [b"0", b"1", b"2", b"3", b"4"]

    run(main())


def test_receive_timeout_and_cancellation_lose_nothing(impl, sockdir):
    async def main():
        async with aio.Server(NAME, directory=sockdir, impl=impl) as srv:
            with pytest.raises(machipc.IPCTimeoutError):
                await srv.receive(timeout=0.05)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(srv.receive(), 0.05)
            waiter = asyncio.create_task(srv.receive())
            await asyncio.sleep(0.01)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
                await cli.send(b"kept")
                msg = await srv.receive(timeout=5)
                assert msg.data == b"kept"

    run(main())


def test_loop_is_not_blocked_while_waiting(impl, sockdir):
    async def main():
        release = asyncio.Event()

        async def slow(msg):
            await release.wait()
            return b"done"

        async with aio.Server(NAME, directory=sockdir, impl=impl) as srv:
            serving = asyncio.create_task(srv.serve(slow))
            async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
                pending = asyncio.create_task(cli.request(b"x", timeout=10))
                ticks = 0
                for _ in range(20):
                    await asyncio.sleep(0.005)
                    ticks += 1
                assert ticks == 20 and not pending.done()
                release.set()
                assert await pending == b"done"
            srv.stop()
            await serving

    run(main())


def test_request_timeout_and_cancel_then_late_reply_discarded(impl, sockdir):
    async def main():
        gate = asyncio.Event()

        async def handler(msg):
            if msg.data == b"slow":
                await gate.wait()
            return b"r:" + msg.data

        async with aio.Server(NAME, directory=sockdir, impl=impl) as srv:
            serving = asyncio.create_task(srv.serve(handler))
            async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
                with pytest.raises(machipc.IPCTimeoutError):
                    await cli.request(b"slow", timeout=0.05)
                task = asyncio.create_task(cli.request(b"slow", timeout=None))
                await asyncio.sleep(0.02)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                gate.set()  # the two late replies arrive and are discarded
                assert await cli.request(b"fast", timeout=5) == b"r:fast"
                assert cli._pending == {}
            srv.stop()
            await serving

    run(main())


def test_policy_rejects_through_the_same_admission(impl, sockdir):
    async def main():
        other_uid = policies.SameUser(uid=os.geteuid() + 4242)
        async with aio.Server(NAME, other_uid, directory=sockdir, impl=impl) as srv:
            serving = asyncio.create_task(srv.serve(upper))
            async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
                with pytest.raises(machipc.Rejected):
                    await cli.request(b"x", timeout=5)
            assert srv.stats.rejected == 1 and srv.stats.received == 0
            srv.stop()
            await serving

    run(main())


def test_handler_error_and_sync_handler(impl, sockdir):
    async def main():
        def handler(msg):  # a plain function works too
            if msg.data == b"boom":
                raise RuntimeError("boom")
            return b"fine"

        async with aio.Server(NAME, directory=sockdir, impl=impl) as srv:
            serving = asyncio.create_task(srv.serve(handler))
            async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
                with pytest.raises(machipc.RemoteError, match="RuntimeError"):
                    await cli.request(b"boom", timeout=5)
                assert await cli.request(b"ok", timeout=5) == b"fine"
            assert srv.stats.handler_errors == 1
            srv.stop()
            await serving

    run(main())


def test_interoperates_with_threaded_api(impl, sockdir, serve):
    serve(name="org.test.sync")  # threaded server (echo)

    async def main():
        async with aio.Client("org.test.sync", directory=sockdir, impl=impl) as cli:
            assert await cli.request(b"hi", timeout=5) == b"echo:hi"
        async with aio.Server(NAME, directory=sockdir, impl=impl) as srv:
            serving = asyncio.create_task(srv.serve(upper))

            def threaded_client():
                with machipc.Client(NAME, directory=sockdir, impl=impl) as cli:
                    return cli.request(b"sync", timeout=5)

            assert await asyncio.to_thread(threaded_client) == b"SYNC"
            srv.stop()
            await serving

    run(main())


def test_stop_answers_in_flight_requests(impl, sockdir):
    async def main():
        started = asyncio.Event()

        async def slow(msg):
            started.set()
            await asyncio.sleep(0.2)
            return b"r:" + msg.data

        async with aio.Server(NAME, directory=sockdir, impl=impl) as srv:
            serving = asyncio.create_task(srv.serve(slow, concurrency=4))
            async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
                # more requests than the concurrency: some are still in the kernel's queue
                requests = [asyncio.create_task(cli.request(b"%d" % i, timeout=10)) for i in range(12)]
                await started.wait()
                await asyncio.sleep(0.01)
                srv.stop()
                replies = await asyncio.gather(*requests)
                assert replies == [b"r:%d" % i for i in range(12)]
            await serving
            assert srv.closed and not os.path.exists(srv.path)
            with pytest.raises(machipc.ServiceNotFound):
                aio.Client(NAME, directory=sockdir, impl=impl)

    run(main())


def test_server_gone_fails_pending_requests(impl, sockdir):
    async def main():
        srv = aio.Server(NAME, directory=sockdir, impl=impl)
        async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
            task = asyncio.create_task(cli.request(b"x", timeout=10))
            msg = await srv.receive(timeout=5)
            assert msg.expects_reply
            srv.close()
            with pytest.raises(machipc.PeerGone):
                await task
            with pytest.raises(machipc.PeerGone):
                await cli.request(b"again")

    run(main())


def test_backpressure_bounded_queue(impl, sockdir):
    async def main():
        async with aio.Server(NAME, directory=sockdir, impl=impl, max_queue=4) as srv:
            async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
                for i in range(50):
                    await cli.send(b"%d" % i)
                first = await srv.receive(timeout=5)
                await asyncio.sleep(0.05)  # let the reader run as much as it wants
                assert len(srv._queue) <= 4
                got = [first] + [await srv.receive(timeout=5) for _ in range(49)]
                assert [bytes(m.data) for m in got] == [b"%d" % i for i in range(50)]

    run(main())


DAEMON = """
import asyncio, sys
import machipc
from machipc import aio

async def handle(msg):
    await asyncio.sleep(0.3)
    return b"r:" + msg.data

async def main():
    async with aio.Server({name!r}, directory={sockdir!r}, impl={impl!r}) as srv:
        print("ready", flush=True)
        await srv.serve(handle)
    print("stopped", flush=True)

asyncio.run(main())
"""


def test_sigterm_asyncio_daemon_loses_nothing(impl, sockdir):
    code = DAEMON.format(name=NAME, sockdir=sockdir, impl=impl)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        results: dict[int, bytes] = {}
        clients = [machipc.Client(NAME, directory=sockdir, impl=impl) for _ in range(8)]

        def ask(i: int) -> None:
            results[i] = clients[i].request(b"%d" % i, timeout=10)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.1)  # every request sent, none answered yet (handlers take 0.3 s)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(15)
        for cli in clients:
            cli.close()
        assert results == {i: b"r:%d" % i for i in range(8)}
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and out.strip() == "stopped"
        assert not os.path.exists(os.path.join(sockdir, NAME))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_large_payloads_both_ways(impl, sockdir):
    """Memfd payloads through the asyncio front: request, reply and one-way."""
    from machipc import aio

    big = bytes(range(256)) * 4096  # 1 MiB

    async def main():
        async with aio.Server("org.test.aiobig", directory=sockdir, impl=impl) as srv:
            async def handle(msg):
                return bytes(msg.data[::-1]) if msg.expects_reply else None

            task = asyncio.ensure_future(srv.serve(handle))
            async with aio.Client("org.test.aiobig", directory=sockdir, impl=impl) as cli:
                assert await cli.request(big, timeout=10) == big[::-1]
            srv.close()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_async_client_learns_the_server_limit_from_its_hello(impl, sockdir, serve):
    srv = serve(name="org.test.sync", max_size=1000)

    async def main():
        async with aio.Client("org.test.sync", directory=sockdir, impl=impl) as cli:
            assert await cli.request(b"hi", timeout=5) == b"echo:hi"  # the HELLO is read before it
            assert cli.sync.server_limits.max_size == 1000
            with pytest.raises(machipc.MessageTooLarge, match="server's limit of 1000"):
                await cli.send(b"x" * 1001)  # refused before it is sent

    run(main())
    assert srv.stats.too_large == 0


def test_client_parity_with_the_threaded_client(impl, sockdir):
    """aio.Client takes the same arguments and has send_many and buffer."""
    import inspect

    sync_args = set(inspect.signature(machipc.Client).parameters) - {"connect_timeout"}
    assert sync_args <= set(inspect.signature(aio.Client).parameters)
    for method in ("send", "send_many", "request", "buffer", "close"):
        assert hasattr(aio.Client, method), method

    async def main():
        async with aio.Server(NAME, directory=sockdir, impl=impl) as srv:
            got = []

            async def keep(msg):
                got.append(bytes(msg.data))
                return bytes(msg.data)[:3]

            serving = asyncio.create_task(srv.serve(keep))
            async with aio.Client(NAME, directory=sockdir, impl=impl, max_size=1 << 20, arenas=False,
                                  server_policy=policies.SameUser()) as cli:
                assert isinstance(cli.server_policy, policies.SameUser)
                assert await cli.send_many([b"a%d" % i for i in range(100)]) == 100
                with pytest.raises(machipc.MessageTooLarge):
                    await cli.send(b"x" * ((1 << 20) + 1))
                buf = cli.buffer(100_000)
                buf[:] = b"B" * 100_000
                assert await cli.request(buf) == b"BBB"
            srv.stop()
            await serving
            assert got[:100] == [b"a%d" % i for i in range(100)]

    run(main())


def test_send_many_batches_and_waits_for_a_full_queue_without_blocking_the_loop(impl, sockdir):
    """aio.Client.send_many: runs of small bytes go in BATCH packets; where the server's queue
    is full it waits for room as send() does, and the loop runs meanwhile."""
    gate = threading.Event()
    got = []

    def handler(msg):
        if msg.expects_reply:
            return b"ok"
        got.append(bytes(msg.data))
        if msg.data == b"block":
            gate.wait(30)

    with machipc.Server(NAME, directory=sockdir, impl=impl) as srv:
        serving = threading.Thread(target=srv.serve, args=(handler,), daemon=True)
        serving.start()
        items = [b"block"] + [b"%05d" % i + b"x" * 200 for i in range(3000)]  # ~620 KB: more than the queue holds

        async def main():
            async with aio.Client(NAME, directory=sockdir, impl=impl) as cli:
                assert await cli.request(b"hello") == b"ok"  # the HELLO is read: batches from here on
                assert cli.sync.server_limits.features & machipc.wire.FEATURE_BATCH
                sending = asyncio.create_task(cli.send_many(items))
                await asyncio.sleep(0.2)
                assert not sending.done()  # the handler holds the server: the queue is full, the loop runs
                gate.set()
                assert await sending == len(items)
                assert await cli.request(b"sync") == b"ok"

        run(main())
        assert got == items and srv.stats.received == len(items) + 2
        srv.stop()
        serving.join(30)
