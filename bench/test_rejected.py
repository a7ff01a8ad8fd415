"""What a rejected sender costs the server (issue 12).

A server whose policy rejects the sender (this process, already decided: the
decision is cached) drains packets queued on many connections; the figure is
the receiving thread's CPU time per rejected packet (``time.thread_time``, so
the sender's work is not in it). Goals: under 2 µs for a 64 B one-way message,
and a 64 MiB sealed-memfd payload no dearer than that (the server never maps
or reads a rejected sender's payload: it closes the fd).

The sender is this process on raw sockets (it fills every connection's queue
before a round; the fill is not timed), so the server receives, identifies,
looks the decision up, discards and counts -- exactly its per-packet path.
Run alone: ``taskset -c 0 .venv/bin/python -m pytest bench/test_rejected.py -s``.
"""

from __future__ import annotations

import array
import fcntl
import logging
import mmap
import os
import socket
import sys
import tempfile
import time

import pytest

import machipc
from machipc import wire
from machipc.payload import REQUIRED_SEALS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux transport")

CONNECTIONS = 32
MiB = 1024 * 1024
RESULTS: dict[str, float] = {}


class Flood:
    """A rejecting server and ``CONNECTIONS`` raw connections to it from this process."""

    def __init__(self, impl: str, fd: int = -1, length: int = 64) -> None:
        self.dir = tempfile.mkdtemp(prefix="mi-bench-")
        # Rejects every sender (uid 12345 is nobody here); nothing limits rejected peers.
        self.srv = machipc.Server(
            "org.bench.rejected", machipc.policies.Allowlist(uids={12345}), directory=self.dir, impl=impl, max_rejections=None
        )
        self.conns = []
        for _ in range(CONNECTIONS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(self.srv.path)
            s.setblocking(False)
            self.conns.append(s)
        if fd >= 0:
            self.packet = [wire.pack_header(wire.Kind.MESSAGE, 0, length, wire.Flag.PAYLOAD_FD)]
            self.anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        else:
            self.packet = [wire.pack_header(wire.Kind.MESSAGE, 0, length) + b"x" * length]
            self.anc = []
        self._drain()  # accept them all, read the first packets (one decision per process)

    def fill(self) -> int:
        """Queue packets on every connection until its queue is full; returns how many."""
        sent = 0
        for s in self.conns:
            while True:
                try:
                    s.sendmsg(self.packet, self.anc)
                except BlockingIOError:
                    break
                sent += 1
        return sent

    def _drain(self) -> None:
        """Receive until nothing is left (every packet is rejected). One receive(timeout=0)
        looks at a bounded number of packets, so it is repeated until one finds none."""
        stats = self.srv._stats  # (the property would fold the transport's counts each time)
        while True:
            before = stats.rejected + self.srv._transport.rejected_pending
            try:
                self.srv.receive(timeout=0)
            except machipc.IPCTimeoutError:
                if stats.rejected + self.srv._transport.rejected_pending == before:
                    return
                continue
            raise AssertionError("a rejected packet was handed on")

    def round(self) -> tuple[float, int]:
        """(CPU seconds of this thread, packets rejected) for draining one fill."""
        before = self.srv.stats.rejected
        start = time.thread_time()
        self._drain()
        return time.thread_time() - start, self.srv.stats.rejected - before

    def close(self) -> None:
        for s in self.conns:
            s.close()
        self.srv.close()
        os.rmdir(self.dir)


def _sealed_memfd(size: int) -> int:
    """A written (not sparse), fully sealed memfd of ``size`` bytes: the sender pays once."""
    fd = os.memfd_create("bench-rejected", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as m:
        m.write(b"p" * size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
    return fd


def _run(benchmark, name: str, flood: Flood, rounds: int) -> None:
    per_packet = []

    def setup():
        flood.fill()

    def drain():
        cpu, count = flood.round()
        assert count > 0
        per_packet.append(cpu / count)

    logging.getLogger("machipc").setLevel(logging.ERROR)  # the rate limiter's work stays, its output goes
    try:
        benchmark.pedantic(drain, setup=setup, rounds=rounds, iterations=1)
    finally:
        logging.getLogger("machipc").setLevel(logging.NOTSET)
    per_packet.sort()
    median = per_packet[len(per_packet) // 2]
    RESULTS[name] = median
    benchmark.extra_info.update(rejected=name, cpu_us_per_rejected_packet=round(median * 1e6, 3))  # for report.py
    print(f"\n{name}: {median * 1e6:.2f} µs CPU per rejected packet (median of {rounds} rounds, "
          f"{flood.srv.stats.rejected} rejected in all)")


IMPLS = ["py"] + (["c"] if machipc._backend._compiled is not None else [])


@pytest.mark.parametrize("impl", IMPLS)
def test_rejected_packet_64b(benchmark, impl, quick):
    flood = Flood(impl)
    try:
        _run(benchmark, f"rejected 64 B, {impl}", flood, 5 if quick else 30)
    finally:
        flood.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_rejected_64mib_payload(benchmark, impl, quick):
    fd = _sealed_memfd(64 * MiB)
    flood = Flood(impl, fd, 64 * MiB)
    try:
        _run(benchmark, f"rejected 64 MiB, {impl}", flood, 5 if quick else 30)
    finally:
        flood.close()
        os.close(fd)
    small = RESULTS.get(f"rejected 64 B, {impl}")
    if small is not None:
        print(f"64 MiB vs 64 B rejected ({impl}): {RESULTS[f'rejected 64 MiB, {impl}'] / small:.2f}x")
