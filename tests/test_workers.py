"""Server.serve(handler, workers=N): a bounded thread pool, ordering, errors, graceful stop."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import machipc
from machipc.workers import WorkerPool

from conftest import wait_for


@pytest.fixture
def serve(serve):
    """start(handler, **serve_kw): conftest's server, with serve() keywords (workers=...)."""
    return lambda handler, **serve_kw: serve(handler, serve_kw=serve_kw)


def test_handlers_run_concurrently(serve, client):
    barrier = threading.Barrier(4, timeout=10)

    def handler(msg):
        barrier.wait()  # only passes when four handlers run at the same time
        return b"ok"

    serve(handler, workers=4)
    clients = [client() for _ in range(4)]
    results = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.request(b"x", timeout=10))) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert results == [b"ok"] * 4


def test_receive_loop_keeps_running_while_a_worker_is_busy(serve, client):
    release = threading.Event()

    def handler(msg):
        if msg.data == b"block":
            release.wait(10)
        return b"r:" + msg.data

    serve(handler, workers=2)
    blocked, other = client(), client()
    t = threading.Thread(target=lambda: blocked.request(b"block", timeout=10))
    t.start()
    time.sleep(0.05)
    for i in range(20):
        assert other.request(b"%d" % i, timeout=5) == b"r:%d" % i
    release.set()
    t.join(10)


def test_ordered_keeps_per_connection_order(serve, client):
    seen: dict[int, list[int]] = {}
    lock = threading.Lock()

    def handler(msg):
        time.sleep(random.random() / 2000)
        sender, seq = map(int, bytes(msg.data).split(b":"))
        with lock:
            seen.setdefault(sender, []).append(seq)

    srv = serve(handler, workers=4, ordered=True)
    clients = [client() for _ in range(6)]
    for seq in range(100):
        for n, cli in enumerate(clients):
            cli.send(b"%d:%d" % (n, seq))
    assert wait_for(lambda: srv.stats.received == 600)
    assert wait_for(lambda: sum(map(len, seen.values())) == 600)
    for n in range(6):
        assert seen[n] == list(range(100)), f"client {n} out of order"


def test_handler_error_gets_error_reply_and_server_goes_on(serve, client):
    def handler(msg):
        if msg.data == b"boom":
            raise ValueError("boom")
        return b"fine"

    srv = serve(handler, workers=3)
    cli = client()
    for _ in range(3):
        with pytest.raises(machipc.RemoteError, match="ValueError"):
            cli.request(b"boom", timeout=5)
        assert cli.request(b"ok", timeout=5) == b"fine"
    assert srv.stats.handler_errors == 3


def test_queue_is_bounded(serve, client):
    release = threading.Event()
    srv = serve(lambda m: release.wait(10) and None, workers=1, queue_size=2)
    cli = client()
    for i in range(40):
        cli.send(b"%d" % i)
    time.sleep(0.2)
    # one in the handler, two queued, one held by the blocked submit: the rest waits in the kernel
    assert srv.stats.received <= 4
    release.set()
    assert wait_for(lambda: srv.stats.received == 40)


def test_stop_drains_queued_requests_then_closes(impl, sockdir, client):
    srv = machipc.Server("org.test.svc", directory=sockdir, impl=impl)
    started = threading.Event()

    def handler(msg):
        started.set()
        time.sleep(0.1)
        return b"r:" + msg.data

    serving = threading.Thread(target=srv.serve, args=(handler,), kwargs={"workers": 2})
    serving.start()
    clients = [client() for _ in range(6)]
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, clients[i].request(b"%d" % i, timeout=10))) for i in range(6)]
    for t in threads:
        t.start()
    assert started.wait(5)
    time.sleep(0.02)
    srv.stop()
    for t in threads:
        t.join(10)
    serving.join(10)
    assert not serving.is_alive()
    assert results == {i: b"r:%d" % i for i in range(6)}
    assert srv.closed and not os.path.exists(srv.path)


def test_pool_rejects_bad_sizes():
    with pytest.raises(ValueError):
        WorkerPool(lambda h, m: None, None, 0)
    with pytest.raises(ValueError):
        WorkerPool(lambda h, m: None, None, 2, queue_size=0)


def test_pool_close_without_messages():
    pool = WorkerPool(lambda h, m: None, None, 3, ordered=True)
    assert pool.workers == 3 and pool.pending == 0
    assert pool.close(5)


DAEMON = """
import sys, time, machipc
srv = machipc.Server({name!r}, directory={sockdir!r}, impl={impl!r})
def handle(msg):
    time.sleep(0.3)
    return b"r:" + msg.data
print("ready", flush=True)
srv.serve(handle, workers={workers})
print("stopped", flush=True)
"""


@pytest.mark.parametrize("workers", [None, 3])
def test_sigterm_with_in_flight_requests_loses_nothing(impl, sockdir, workers):
    name = "org.test.sigterm"
    code = DAEMON.format(name=name, sockdir=sockdir, impl=impl, workers=workers)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        clients = [machipc.Client(name, directory=sockdir, impl=impl) for _ in range(6)]
        results: dict[int, bytes] = {}

        def ask(i: int) -> None:
            results[i] = clients[i].request(b"%d" % i, timeout=15)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.1)  # all sent; at most a few are being handled
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(20)
        for cli in clients:
            cli.close()
        assert results == {i: b"r:%d" % i for i in range(6)}
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and out.strip() == "stopped"
        assert not os.path.exists(os.path.join(sockdir, name))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
