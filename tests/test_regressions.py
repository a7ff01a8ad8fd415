"""Regression tests for bugs found in review (each failed before its fix, both transports)."""

from __future__ import annotations

import array
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import machipc
from machipc import wire
from machipc.wire import Kind

from conftest import wait_for

MiB = 1024 * 1024


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    return s


def test_messages_queued_by_a_client_that_left_with_unread_replies_arrive(impl, sockdir):
    # The kernel reports ECONNRESET once, ahead of the packets still queued.
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        s = _raw(srv.path)
        s.send(wire.pack_header(Kind.REQUEST, 1, 2) + b"rq")
        srv.receive(timeout=5).reply(b"never read")
        for i in range(5):
            s.send(wire.pack_header(Kind.MESSAGE, 0, 1) + bytes([48 + i]))
        s.close()
        assert [bytes(srv.receive(timeout=5).data) for _ in range(5)] == [b"0", b"1", b"2", b"3", b"4"]


def test_close_from_a_handler_during_a_graceful_stop_does_not_deadlock(impl, sockdir, client):
    srv = machipc.Server("org.test.svc", directory=sockdir, impl=impl)

    def handler(msg):
        if msg.data == b"slow":
            time.sleep(0.3)
        elif msg.data == b"quit":
            srv.close()  # an admin "shutdown" command, handled while draining

    thread = threading.Thread(target=srv.serve, args=(handler,), daemon=True)
    thread.start()
    cli = client()
    cli.send(b"slow")
    time.sleep(0.1)
    cli.send(b"quit")
    srv.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert srv.closed


def test_a_payload_over_the_server_limit_does_not_break_later_arena_sends(serve, client):
    serve(lambda m: b"%d" % len(m.data), max_size=MiB)
    cli = client()
    with pytest.raises(machipc.MessageTooLarge):
        cli.request(b"x" * (10 * MiB), timeout=5)
    for _ in range(200):  # 20 MB through the arena after the refusal
        assert cli.request(b"x" * 100_000, timeout=5) == b"100000"


def test_memoryviews_of_any_format_are_sent_by_byte_count(serve, client):
    serve(lambda m: b"%d" % len(m.data))
    cli = client()
    for n in (100, 20_000):  # inline, and through the arena
        view = memoryview(array.array("I", range(n)))
        assert cli.request(view, timeout=5) == b"%d" % view.nbytes
    assert cli.send_many([memoryview(array.array("I", range(100)))]) == 1


def test_closed_connection_behaves_alike_in_both_transports(impl, sockdir):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl):
        cli = machipc.Client("org.test.svc", directory=sockdir, impl=impl)
        conn = cli._conn
        conn.close()
        assert conn.recv(0.1).status == wire.Drop.CLOSED
        assert conn.recv_nowait().status == wire.Drop.CLOSED
        with pytest.raises(machipc.PeerGone):
            conn.send(Kind.MESSAGE, 0, b"x", 1)


def test_error_replies_never_stall_the_receive_loop(serve, client):
    srv = serve(lambda m: b"ok", reply_timeout=30)
    bad = struct.pack("<HBBIQQ", wire.MAGIC, 9, Kind.REQUEST, 0, 1, 0)  # bad version: answered MALFORMED
    hostile = []
    for _ in range(3):  # each floods bad requests and never reads the errors
        s = _raw(srv.path)
        s.setblocking(False)
        try:
            while True:
                s.send(bad)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass  # full, or already hung up on by the server
        hostile.append(s)
    cli = client()
    t0 = time.monotonic()
    assert cli.request(b"hi", timeout=30) == b"ok"
    assert time.monotonic() - t0 < 10  # was 5 s per flooding connection (reply_timeout=5)
    for s in hostile:
        s.close()


EMFILE_SERVER = r"""
import resource, sys, machipc
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
srv = machipc.Server("org.test.emfile", directory=sys.argv[1], impl=sys.argv[2])
print("ready", flush=True)
try:
    srv.receive(timeout=3)
except machipc.IPCTimeoutError:
    pass
ru = resource.getrusage(resource.RUSAGE_SELF)
print(ru.ru_utime + ru.ru_stime, flush=True)
"""


def test_out_of_fds_does_not_spin(impl, sockdir):
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER, sockdir, impl], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    socks = [_raw(os.path.join(sockdir, "org.test.emfile")) for _ in range(60)]
    cpu = float(proc.communicate(timeout=30)[0])
    # Spinning on a readable listener burned ~3 s of CPU in the 3 s wait.
    assert cpu < 1.5, cpu
    for s in socks:
        s.close()


def test_a_peer_fd_whose_close_blocks_does_not_stall_the_server(serve, client):
    srv = serve(lambda m: b"ok", policy=lambda peer: machipc.policies.Decision.deny("nobody"))
    # A TCP socket whose FIN is never acknowledged (the peer does not read) and SO_LINGER 8 s:
    # its last close() blocks 8 s.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    tcp.connect(listener.getsockname())
    other, _ = listener.accept()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tcp.setblocking(False)
    try:
        while True:
            tcp.send(b"x" * 4096)
    except BlockingIOError:
        pass
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 8))
    raw = _raw(srv.path)
    raw.sendmsg([wire.pack_header(Kind.MESSAGE, 0, 1) + b"z"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [tcp.fileno()]))])
    tcp.close()  # the server now holds the last reference
    assert wait_for(lambda: srv.stats.dropped["UNEXPECTED_FDS"] == 1)
    good = machipc.Client("org.test.svc", directory=os.path.dirname(srv.path), impl=srv.implementation,
                          server_policy=lambda peer: machipc.policies.Decision.allow("test"))
    t0 = time.monotonic()
    with pytest.raises(machipc.Rejected):
        good.request(b"hi", timeout=30)
    assert time.monotonic() - t0 < 4  # was 8 s: the receive loop blocked in close()
    good.close()
    raw.close()
    other.close()
    listener.close()


def test_closing_a_client_under_concurrent_senders_only_raises_peer_gone(impl, sockdir):
    # close() must never let another thread's send reach a closed (or reused) fd number.
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl):
        errors: list[str] = []
        for _ in range(10):
            cli = machipc.Client("org.test.svc", directory=sockdir, impl=impl)

            def send() -> None:
                try:
                    for _ in range(500):
                        cli.send(b"x" * 64, timeout=5)
                except Exception as exc:
                    errors.append(type(exc).__name__)

            threads = [threading.Thread(target=send) for _ in range(3)]
            for t in threads:
                t.start()
            cli.close()
            for t in threads:
                t.join(30)
        assert set(errors) <= {"PeerGone"}, errors
