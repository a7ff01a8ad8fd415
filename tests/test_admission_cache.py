"""The per-connection cached admission (Conn.cache_admission, Server._cache_admission).

After the server judged a connection's sender, the transport lets that
process's later packets through as Messages, or counts rejected ones, without
asking the server. Each test shows the cache at work (``Server._admit`` is not
called) and that it gives way where it must: a read executable, a uid's
cool-down, requests, ``max_rejections``, deadlines, ``stop()`` and signals
during a flood. Both transports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import machipc
from machipc import wire
from machipc.errors import UnreadReplies
from machipc.wire import Kind

from conftest import wait_for

NOBODY = machipc.policies.Allowlist(uids={os.geteuid() + 1})  # rejects this process


def _count_admits(srv: machipc.Server) -> list:
    """Make ``srv._admit`` count its calls (the packets the server itself judged)."""
    calls: list = []
    admit = srv._admit

    def counting(got):
        calls.append(got.kind)
        return admit(got)

    srv._admit = counting
    return calls


def _connect(path: str, blocking: bool = True) -> socket.socket:
    """A hand-driven connection (its HELLO is left unread: the server sends it at accept);
    ``blocking``: with a 10 s timeout, else non-blocking (for floods)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.settimeout(10 if blocking else 0.0)
    return s


def _in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def _one_way(data: bytes = b"bad") -> bytes:
    return wire.pack_header(Kind.MESSAGE, 0, len(data)) + data


def test_a_senders_later_messages_come_from_the_cache(impl, sockdir):
    with machipc.Server("org.test.cache", directory=sockdir, impl=impl) as srv:
        admits = _count_admits(srv)
        with machipc.Client("org.test.cache", directory=sockdir, impl=impl) as cli:
            for i in range(50):
                cli.send(b"m%d" % i)
            msgs = [srv.receive(timeout=10) for _ in range(50)]
            assert [bytes(m.data) for m in msgs] == [b"m%d" % i for i in range(50)]
            assert all(isinstance(m, machipc.Message) and type(m) is type(msgs[0]) for m in msgs)
            assert all(m.sender is msgs[0].sender and m.decision.allowed for m in msgs)
            assert len(admits) <= 16  # the server judged the first packet (and at most the rest of its recvmmsg batch)
            assert srv.stats.received == 50
            # A request from the cache is answered like any other.
            judged = len(admits)
            reply = []
            t = threading.Thread(target=lambda: reply.append(cli.request(b"q", timeout=10)))
            t.start()
            msg = srv.receive(timeout=10)
            assert msg.expects_reply and len(admits) == judged
            msg.reply(b"a")
            t.join(10)
            assert reply == [b"a"]


def test_a_sender_whose_exe_was_read_is_judged_per_packet(impl, sockdir):
    """Somebody read the Peer's executable: the server re-checks it per packet (an
    execve() keeps pid and connection), so the cache steps aside."""
    with machipc.Server("org.test.cache", directory=sockdir, impl=impl) as srv:
        admits = _count_admits(srv)
        with machipc.Client("org.test.cache", directory=sockdir, impl=impl) as cli:
            cli.send(b"first")
            first = srv.receive(timeout=10)
            assert first.sender.exe == os.path.realpath(sys.executable)
            for i in range(5):
                cli.send(b"m%d" % i)
            for i in range(5):
                assert bytes(srv.receive(timeout=10).data) == b"m%d" % i
            assert len(admits) == 6


def test_a_cool_down_voids_the_cached_admissions_of_its_uid(impl, sockdir):
    """A uid's cool-down starts (a connection of it left replies unread): its other
    connections, cached as allowed, are refused from their next packet on."""
    with machipc.Server("org.test.cache", directory=sockdir, impl=impl, offender_strikes=1) as srv:
        with machipc.Client("org.test.cache", directory=sockdir, impl=impl) as a, \
                machipc.Client("org.test.cache", directory=sockdir, impl=impl) as b:
            a.send(b"a1")
            a.send(b"a2")
            assert [bytes(srv.receive(timeout=10).data) for _ in range(2)] == [b"a1", b"a2"]  # a is cached
            b.send(b"b1")
            msg_b = srv.receive(timeout=10)
            srv._cut_off(msg_b, UnreadReplies("test: b left its replies unread"))
            assert srv.offenders.refused(os.geteuid())
            a.send(b"a3")
            with pytest.raises(machipc.IPCTimeoutError):
                srv.receive(timeout=1.0)
            assert srv.stats.cooled_down == 1 and srv.stats.received == 3


def test_a_cool_down_starting_while_a_sender_is_judged_voids_its_cached_admission(impl, sockdir):
    """With workers, a handler's reply can start its uid's cool-down (_cut_off, on a worker
    thread) while the receive thread is between the cool-down check and caching the
    decision about the next packet of that uid. Here the policy itself plays that worker:
    the decision it gives must not be cached past the cool-down it saw start."""
    holder: list = []

    class CutOffWhileDeciding(machipc.policies.SameUser):
        def check(self, peer):
            srv = holder[0]
            if srv.offenders.strike(peer.uid):  # what Server._cut_off does for unread replies
                srv._transport.epoch += 1
            return super().check(peer)

    with machipc.Server("org.test.cache", CutOffWhileDeciding(), directory=sockdir, impl=impl, offender_strikes=1) as srv:
        holder.append(srv)
        with machipc.Client("org.test.cache", directory=sockdir, impl=impl) as cli:
            cli.send(b"judged before the cool-down")
            assert bytes(srv.receive(timeout=10).data) == b"judged before the cool-down"
            assert srv.offenders.refused(os.geteuid())
            for i in range(5):
                cli.send(b"m%d" % i)
            with pytest.raises(machipc.IPCTimeoutError):
                srv.receive(timeout=1.0)
            assert srv.stats.cooled_down >= 1 and srv.stats.received == 1


def test_a_rejected_flood_is_counted_exactly_and_hung_up_on_at_max_rejections(impl, sockdir):
    with machipc.Server("org.test.cache", NOBODY, directory=sockdir, impl=impl, max_rejections=40) as srv:
        admits = _count_admits(srv)
        raw = _connect(srv.path)
        sent = []

        def send():
            try:
                for _ in range(100):
                    raw.send(_one_way())
                    sent.append(1)
            except OSError:  # hung up on
                pass

        sender = _in_thread(send)
        assert wait_for(lambda: _take_some(srv) and srv.stats.disconnected["rejected"] == 1, 20)
        sender.join(20)
        assert srv.stats.rejected == 40  # exactly: the cache counted some, the server hung up at 40
        assert len(admits) < 40  # ... and the cache did count some of them
        try:
            while raw.recv(100):  # the HELLO, then EOF: hung up on
                pass
        except ConnectionResetError:  # (or reset: it left packets unread)
            pass
        raw.close()


def test_a_cached_rejected_sender_still_gets_answers_to_requests(impl, sockdir):
    with machipc.Server("org.test.cache", NOBODY, directory=sockdir, impl=impl, max_rejections=None) as srv:
        with machipc.Client("org.test.cache", directory=sockdir, impl=impl) as cli:
            for _ in range(20):
                cli.send(b"x")
            done = []

            def ask():
                with pytest.raises(machipc.Rejected):
                    cli.request(b"q", timeout=10)
                done.append(True)

            t = threading.Thread(target=ask)
            t.start()
            deadline = time.monotonic() + 20
            while t.is_alive() and time.monotonic() < deadline:
                with pytest.raises(machipc.IPCTimeoutError):
                    srv.receive(timeout=0.1)
            t.join(1)
            assert done == [True]
            assert srv.stats.rejected == 21


def test_a_rejected_flood_holds_neither_a_timeout_nor_a_stop(impl, sockdir):
    """receive() under a flood of rejected packets still returns at its timeout, and
    stop() still ends serve(): the counting loop must give control back."""
    srv = machipc.Server("org.test.cache", NOBODY, directory=sockdir, impl=impl, max_rejections=None)
    stop_flood = threading.Event()
    socks = [_connect(srv.path, blocking=False) for _ in range(4)]

    def flood():
        packet = _one_way()
        while not stop_flood.is_set():
            for s in socks:
                try:
                    s.send(packet)
                except BlockingIOError:
                    time.sleep(0)
                except OSError:  # the server is gone (the test is over)
                    return

    flooder = threading.Thread(target=flood, daemon=True)
    try:
        flooder.start()
        assert wait_for(lambda: _take_some(srv), 20)
        start = time.monotonic()
        with pytest.raises(machipc.IPCTimeoutError):
            srv.receive(timeout=0.3)
        assert time.monotonic() - start < 20
        served = threading.Thread(target=srv.serve, args=(lambda m: None,), daemon=True)
        served.start()
        time.sleep(0.3)
        srv.stop()
        served.join(20)
        assert not served.is_alive(), "serve() kept counting rejected packets after stop()"
        assert srv.stats.rejected > 0
    finally:
        stop_flood.set()
        flooder.join(10)
        for s in socks:
            s.close()
        srv.close()


def _take_some(srv: machipc.Server) -> bool:
    """One short receive, so the server reads (and rejects) what the flood sent."""
    try:
        srv.receive(timeout=0.05)
    except machipc.IPCTimeoutError:
        pass
    return srv.stats.rejected > 0


def test_sigterm_stops_a_server_busy_counting_rejected_packets(impl, sockdir):
    """A real serving process with a backlog of rejected packets on many connections
    (queued while it was stopped): SIGTERM arriving while it counts them stops it there
    (the counting loop lets signal handlers run and returns on the stop's wakeup, though
    connections are still ready)."""
    code = textwrap.dedent(f"""
        import os, sys, machipc
        srv = machipc.Server("org.test.cache", machipc.policies.Allowlist(uids={{os.geteuid() + 1}}),
                             directory={sockdir!r}, impl={impl!r}, max_rejections=None, max_connections_per_uid=None)
        print("ready", flush=True)
        srv.serve(lambda m: None)
        print("stopped", srv.stats.rejected, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    socks = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        path = os.path.join(sockdir, "org.test.cache")
        for _ in range(200):  # a first packet each: accepted, the sender's decision made and cached
            socks.append(_connect(path, blocking=False))
            socks[-1].send(_one_way())
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGSTOP)
        packet = _one_way()
        queued = 0
        for s in socks:  # fill every queue while the server is stopped
            while True:
                try:
                    s.send(packet)
                    queued += 1
                except BlockingIOError:
                    break
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.002)  # it is counting the backlog now (tens of thousands of packets)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and out.startswith("stopped"), out
        counted = int(out.split()[1])
        print(f"{queued} packets queued; {counted} rejected before the stop")
        assert counted < queued  # it stopped in the middle of the backlog, not after it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for s in socks:
            s.close()


def test_batches_from_a_cached_sender(impl, sockdir):
    with machipc.Server("org.test.cache", directory=sockdir, impl=impl) as srv:
        admits = _count_admits(srv)
        with machipc.Client("org.test.cache", directory=sockdir, impl=impl) as cli:
            items = [b"%d" % i for i in range(500)]
            sender = _in_thread(lambda: cli.send_many(items))
            got: list = []
            while len(got) < len(items):
                got.extend(bytes(m.data) for m in srv.receive_many(64, timeout=10))
            sender.join(10)
            assert got == items
            assert len(admits) <= 16  # the first packet (and at most the rest of its recvmmsg batch)
            assert srv.stats.received == 500


def test_a_cached_rejected_batch_counts_every_message(impl, sockdir):
    with machipc.Server("org.test.cache", NOBODY, directory=sockdir, impl=impl, max_rejections=None) as srv:
        with machipc.Client("org.test.cache", directory=sockdir, impl=impl) as cli:
            sender = _in_thread(lambda: [cli.send_many([b"x"] * 100) for _ in range(10)])
            assert wait_for(lambda: _take_some(srv) and srv.stats.rejected == 1000, 20), srv.stats.rejected


def test_stats_read_from_another_thread_lose_no_rejection(impl, sockdir):
    """Another thread reading ``Server.stats`` (which takes the transport's counts) while
    serve() counts rejected packets: every packet is counted once."""
    n = 5000
    srv = machipc.Server("org.test.cache", NOBODY, directory=sockdir, impl=impl, max_rejections=None)
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            srv.stats.rejected

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: races show
    served = _in_thread(lambda: srv.serve(lambda m: None))
    try:
        sock = _connect(srv.path)
        sock.settimeout(None)
        readers = [_in_thread(reader) for _ in range(2)]
        for _ in range(n):
            sock.send(_one_way())
        assert wait_for(lambda: srv.stats.rejected >= n, 60), srv.stats.rejected
        stop.set()
        for t in readers:
            t.join(10)
        assert srv.stats.rejected == n
        sock.close()
    finally:
        sys.setswitchinterval(switch)
        stop.set()
        srv.close()
        served.join(10)
