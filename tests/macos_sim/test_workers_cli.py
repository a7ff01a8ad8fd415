"""The worker pool and the CLI on the simulated Mac."""

import asyncio
import plistlib
import threading

import machipc
from machipc import aio, cli
from tests.macos_sim.sim_child import spawn

NAME = "org.machipc.sim.workers"


def test_worker_pool_answers_every_request():
    srv = machipc.Server(NAME)
    seen = []
    lock = threading.Lock()

    def handler(msg):
        with lock:
            seen.append(threading.get_ident())
        return bytes(msg.data)[::-1]

    t = threading.Thread(target=srv.serve, args=(handler,), kwargs={"workers": 4}, daemon=True)
    t.start()
    try:
        def client(i):
            with machipc.Client(NAME, timeout=30) as c:
                for j in range(25):
                    assert c.request(b"%d-%d" % (i, j)) == (b"%d-%d" % (i, j))[::-1]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert len(seen) == 100
    finally:
        srv.stop()
        t.join(60)
        srv.close()
    assert not t.is_alive()


def test_ordered_pool_keeps_one_senders_pipelined_requests_in_order():
    """ordered=True: one sender's messages reach the handler in the order sent,
    also when an asyncio client pipelines requests (each Mach request has its own
    reply conn, so the order key must be the sender, not the conn)."""
    srv = machipc.Server(NAME)
    order = []

    def handler(msg):
        order.append(int(bytes(msg.data)))
        return b"ok"

    t = threading.Thread(target=srv.serve, args=(handler,), kwargs={"workers": 4, "ordered": True}, daemon=True)
    t.start()

    async def main():
        async with aio.Client(NAME, timeout=30) as c:
            assert await asyncio.gather(*(c.request(b"%d" % i) for i in range(200))) == [b"ok"] * 200

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        srv.stop()
        t.join(60)
        srv.close()
    assert order == list(range(200))


def test_cli_serve_request_send_and_sigterm():
    p = spawn("""
        import os, signal, sys, threading, time
        from machipc import cli, _mach

        def client():
            while "org.machipc.sim.cli" not in _mach.KERNEL.services:
                time.sleep(0.01)
            assert cli.main(["request", "org.machipc.sim.cli", "hello"]) == 0
            assert cli.main(["send", "org.machipc.sim.cli", "one-way"]) == 0
            while _mach.KERNEL.blocked == 0:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=client, daemon=True).start()
        sys.exit(cli.main(["serve", "--echo", "org.machipc.sim.cli"]))
    """)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert "serving 'org.machipc.sim.cli'" in out and "request from pid" in out and "b'one-way'" in out
    assert out.count("hello") == 2  # the server's log line and the request's printed reply


def test_cli_plist(tmp_path):
    path = tmp_path / "org.machipc.sim.cli.plist"
    assert cli.main(["plist", "org.machipc.sim.cli", "--output", str(path), "--program", "/usr/local/bin/d", "serve"]) == 0
    data = plistlib.loads(path.read_bytes())
    assert data["MachServices"] == {"org.machipc.sim.cli": True} and data["ProgramArguments"][0] == "/usr/local/bin/d"
