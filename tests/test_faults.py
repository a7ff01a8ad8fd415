"""Faults (issue 8): clients and servers dying, shutdown with requests in flight, full queues."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import machipc

from conftest import python_client, wait_for


def test_client_killed_mid_request_and_mid_send(serve, client, impl, sockdir):
    started, release = threading.Event(), threading.Event()

    def handler(m):
        if m.data == b"block":
            started.set()
            release.wait(20)
        return b"ok"

    srv = serve(handler)
    # Mid-request: the client dies while the handler works on its request.
    proc = subprocess.Popen(python_client(sockdir, impl, "c.request(b'block', timeout=30)"))
    assert started.wait(10)
    proc.kill()
    proc.wait(10)
    release.set()
    # Mid-send: a client flooding one-way messages is killed at a random point.
    flood = subprocess.Popen(python_client(sockdir, impl, "while True: c.send(b'x' * 1000)"))
    assert wait_for(lambda: srv.stats.received > 200, 20)
    flood.kill()
    flood.wait(10)
    good = client()
    assert good.request(b"after", timeout=10) == b"ok"
    assert wait_for(lambda: srv.connections == 1, 10)
    print(f"after kills: received {srv.stats.received}, reply errors {srv.stats.reply_errors}")


SERVER = r"""
import machipc, os, sys
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
def handler(m):
    os.write(fd, bytes(m.data) + b"\n")  # recorded before it is acknowledged
    return b"ack:" + bytes(m.data)
srv = machipc.Server("org.test.crash", directory=sys.argv[1], impl=sys.argv[3])
print("ready", flush=True)
srv.serve(handler)
"""


def start_server(sockdir, impl, log):
    proc = subprocess.Popen([sys.executable, "-c", SERVER, sockdir, log, impl], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_server_killed_and_restarted_while_clients_send(impl, sockdir, tmp_path):
    log = str(tmp_path / "log")
    acked: list[bytes] = []
    errors: list[Exception] = []
    proc = start_server(sockdir, impl, log)
    try:
        for generation in range(3):
            cli = machipc.Client("org.test.crash", directory=sockdir, impl=impl)
            stop = threading.Event()

            def sender(tag):
                i = 0
                while not stop.is_set():
                    data = b"%d-%s-%d" % (generation, tag, i)
                    try:
                        assert cli.request(data, timeout=10) == b"ack:" + data
                    except ConnectionError as exc:
                        errors.append(exc)
                        return
                    acked.append(data)
                    i += 1

            threads = [threading.Thread(target=sender, args=(t,)) for t in (b"a", b"b", b"c")]
            for t in threads:
                t.start()
            assert wait_for(lambda: len(acked) > 50 * (generation + 1), 20)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            for t in threads:
                t.join(15)
                assert not t.is_alive()
            assert len(errors) == 3 * (generation + 1)  # every sender saw ConnectionError
            with pytest.raises(ConnectionError):
                cli.request(b"dead", timeout=5)
            cli.close()
            stop.set()
            # The crashed server's socket file is stale; the restart replaces it.
            proc = start_server(sockdir, impl, log)
        with machipc.Client("org.test.crash", directory=sockdir, impl=impl) as cli:
            assert cli.request(b"final", timeout=10) == b"ack:final"
    finally:
        proc.kill()
        proc.wait(10)
    recorded = set(open(log, "rb").read().split())
    assert set(acked) <= recorded  # nothing the server acknowledged was lost
    print(f"3 server crashes survived; {len(acked)} requests acknowledged, {len(errors)} ConnectionErrors")


SLOW_SERVER = r"""
import machipc, sys, time
srv = machipc.Server("org.test.term", directory=sys.argv[1], impl=sys.argv[2])
print("ready", flush=True)
def handler(m):
    time.sleep(0.01)
    return b"done"
srv.serve(handler, drain_timeout=2.0)
srv.close()
print("stopped", flush=True)
"""


def test_sigterm_with_requests_in_flight(impl, sockdir):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, sockdir, impl], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    outcomes = {"answered": 0, "refused": 0, "hanging": 0}
    lock = threading.Lock()
    clients = [machipc.Client("org.test.term", directory=sockdir, impl=impl) for _ in range(4)]

    def worker(cli):
        while True:
            try:
                cli.request(b"x", timeout=15)
                what = "answered"
            except ConnectionError:
                what = "refused"
            except TimeoutError:
                what = "hanging"
            with lock:
                outcomes[what] += 1
            if what != "answered":
                return

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients for _ in range(2)]
    for t in threads:
        t.start()
    assert wait_for(lambda: outcomes["answered"] > 40, 20)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "stopped" in out
    for c in clients:
        c.close()
    print(f"SIGTERM under load: {outcomes}")
    assert outcomes["hanging"] == 0
    assert outcomes["refused"] == len(threads)


def test_full_queue_blocks_then_times_out_never_loses(impl, sockdir):
    with machipc.Server("org.test.full", directory=sockdir, impl=impl) as srv:
        cli = machipc.Client("org.test.full", directory=sockdir, impl=impl)
        sent = 0
        with pytest.raises(TimeoutError):
            for i in range(100000):
                cli.send(b"%d" % i + b"." * 2000, timeout=0.2)
                sent += 1
        got = []
        while True:
            try:
                got.append(int(bytes(srv.receive(timeout=0.5).data).split(b".")[0]))
            except TimeoutError:
                break
        assert got == list(range(sent))  # every accepted send arrived, in order
        # Once drained, the same client can send again.
        cli.send(b"again", timeout=5)
        assert srv.receive(timeout=5).data == b"again"
        cli.close()
        print(f"queue full after {sent} messages; all {len(got)} received")
