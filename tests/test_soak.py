"""Load and soak (issue 8): exactly-once, in-order delivery; flat fds and RSS.

``MACHIPC_SOAK_MESSAGES`` sets the soak size (default 50,000 in ``make test``;
``make soak`` runs 1,000,000).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict

import machipc

from conftest import python_client

SOAK_MESSAGES = int(os.environ.get("MACHIPC_SOAK_MESSAGES", "50000"))


def test_clients_times_threads_exactly_once_in_order(impl, sockdir):
    procs_n, threads_n, per_thread = 4, 4, 500
    body = f"""
import threading
def run(t):
    for i in range({per_thread}):
        c.send(b"%d:%d" % (t, i), timeout=30)
    c.request(b"done:%d" % t, timeout=30)
ts = [threading.Thread(target=run, args=(t,)) for t in range({threads_n})]
for t in ts: t.start()
for t in ts: t.join()
"""
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        procs = [subprocess.Popen(python_client(sockdir, impl, body)) for _ in range(procs_n)]
        seen: dict[tuple[int, int], list[int]] = defaultdict(list)
        done = 0
        while done < procs_n * threads_n:
            msg = srv.receive(timeout=60)
            tag, num = bytes(msg.data).split(b":")
            if tag == b"done":
                done += 1
                msg.reply(b"")
                continue
            seen[(msg.sender.pid, int(tag))].append(int(num))
        for p in procs:
            assert p.wait(30) == 0
        assert len(seen) == procs_n * threads_n
        for key, nums in seen.items():
            assert nums == list(range(per_thread)), key  # exactly once, in order
        total = sum(len(v) for v in seen.values())
        print(f"{procs_n} processes x {threads_n} threads: {total} messages sent, {total} received in order")
        assert total == procs_n * threads_n * per_thread == srv.stats.received - done


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_soak_fds_and_rss_flat(impl, sockdir):
    n = SOAK_MESSAGES
    per_conn = 10000
    # The sender reconnects every per_conn messages and syncs with a request each time.
    body = f"""
c.close()
n, per_conn = {n}, {per_conn}
i = 0
while i < n:
    c = machipc.Client("org.test.svc", directory={sockdir!r}, impl={impl!r})
    for _ in range(min(per_conn, n - i)):
        c.send(b"%d" % i, timeout=60)
        i += 1
    assert c.request(b"sync", timeout=60) == b"ok"
    c.close()
"""
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        proc = subprocess.Popen(python_client(sockdir, impl, body))
        expected = 0
        warm = min(5000, n // 10)
        start = None
        while expected < n:
            msg = srv.receive(timeout=60)
            if msg.expects_reply:
                msg.reply(b"ok")
                continue
            assert int(msg.data) == expected
            expected += 1
            if expected == warm:
                del msg
                start = (_fds(), _rss_kib())
        while proc.poll() is None:  # the final sync request
            try:
                msg = srv.receive(timeout=0.5)
            except TimeoutError:
                continue
            msg.reply(b"ok")
        del msg
        assert proc.wait(30) == 0
        assert srv.stats.dropped_total == 0
        end = (_fds(), _rss_kib())
        print(f"soak {impl}: {n} sent, {expected} received; fds {start[0]} -> {end[0]}, RSS {start[1]} -> {end[1]} KiB")
        assert end[0] <= start[0] + 1
        assert end[1] - start[1] < 8 * 1024  # KiB


LARGE_MESSAGES = int(os.environ.get("MACHIPC_SOAK_LARGE_MESSAGES", "2000"))


def test_large_payload_soak_fds_and_rss_flat(impl, sockdir):
    """Large messages through the arena and as sealed memfds: nothing accumulates.

    ``MACHIPC_SOAK_LARGE_MESSAGES`` sets the count (``make soak``: 100,000).
    """
    import threading
    import time

    def nfds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0])

    payload = os.urandom(256 * 1024)
    half = LARGE_MESSAGES // 2
    warm = max(1, half // 10)
    got = [0, 0]
    with machipc.Server("org.test.soak", directory=sockdir, impl=impl) as srv:

        def receive() -> None:
            while got[0] < 2 * half:
                for msg in srv.receive_many(64, timeout=60):
                    got[0] += 1
                    got[1] += msg.data == payload

        thread = threading.Thread(target=receive)
        thread.start()
        arena_cli = machipc.Client("org.test.soak", directory=sockdir, impl=impl)
        sealed_cli = machipc.Client("org.test.soak", directory=sockdir, impl=impl, arenas=False)
        for _ in range(warm):
            arena_cli.send(payload, timeout=30)
            sealed_cli.send(payload, timeout=30)
        deadline = time.monotonic() + 60
        while got[0] < 2 * warm and time.monotonic() < deadline:
            time.sleep(0.01)
        fds0, rss0 = nfds(), rss_kib()
        for _ in range(half - warm):
            arena_cli.send(payload, timeout=30)
            sealed_cli.send(payload, timeout=30)
        thread.join(120)
        fds1, rss1 = nfds(), rss_kib()
        arena_cli.close()
        sealed_cli.close()
    print(f"{impl}: {2 * half} large messages, {got[1]} intact; after warm-up fds {fds0}->{fds1}, RSS {rss0}->{rss1} KiB")
    assert got == [2 * half, 2 * half]
    assert fds1 <= fds0 + 2
    assert rss1 <= rss0 + 16 * 1024  # a steady state, not 256 KiB per message
