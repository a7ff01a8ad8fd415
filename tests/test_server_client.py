"""End-to-end: Server and Client over real sockets and real processes, both transports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import machipc
from machipc import _closer, policies, wire
from machipc.wire import Kind

from conftest import python_client, raw_connect, wait_for


def test_request_round_trip(serve, client):
    serve()
    cli = client()
    assert cli.request(b"ping", timeout=5) == b"echo:ping"
    assert cli.request(b"", timeout=5) == b"echo:"
    big = b"x" * (wire.INLINE_MAX - 5)
    assert cli.request(big, timeout=5) == b"echo:" + big  # the reply goes out as a memfd


def test_packets_either_side_of_the_small_send_size_arrive_whole(serve, client):
    # Packets up to 1024 bytes (header included) go out through send(2) from one copied
    # buffer, bigger ones through sendmsg with the payload in place (machipc/_unix.pyx).
    serve()
    cli = client()
    edge = 1024 - wire.HEADER_SIZE
    for size in (edge - 5, edge - 4, edge, edge + 1):  # the reply ("echo:" + data), then the request, at the edge
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert cli.request(data, timeout=5) == b"echo:" + data, size


def test_reply_over_the_client_limit_is_an_error_not_silence(serve, client):
    serve(lambda m: b"y" * 200_000)
    cli = client(max_size=100_000)
    with pytest.raises(machipc.ProtocolError, match="over the size limit"):
        cli.request(b"x", timeout=5)


def test_one_way_messages_arrive_in_order(impl, sockdir, client):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        cli = client()
        for i in range(200):
            cli.send(b"%d" % i)
        got = [int(srv.receive(timeout=5).data) for _ in range(200)]
        assert got == list(range(200))
        assert srv.stats.received == 200


def test_sender_identity_is_the_real_process(impl, sockdir):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        proc = subprocess.Popen(
            python_client(sockdir, impl, "c.send(b'%d' % os.getpid()); print(os.getpid())"),
            stdout=subprocess.PIPE,
            text=True,
        )
        msg = srv.receive(timeout=10)
        out, _ = proc.communicate(timeout=10)
        assert msg.sender.pid == int(out) == int(msg.data) == proc.pid
        assert (msg.sender.uid, msg.sender.gid) == (os.geteuid(), os.getegid())
        assert msg.sender.guard is not None
        assert not msg.expects_reply


def test_many_client_processes_at_once(serve, impl, sockdir):
    serve(lambda m: b"%d" % m.sender.pid)
    body = "for _ in range(20): assert int(c.request(b'hi', timeout=10)) == os.getpid()\nprint('ok')"
    procs = [subprocess.Popen(python_client(sockdir, impl, body), stdout=subprocess.PIPE, text=True) for _ in range(8)]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and out.strip() == "ok"


def test_concurrent_requests_from_threads_get_their_own_replies(serve, client):
    serve()
    cli = client()
    errors = []

    def worker(n):
        try:
            for i in range(100):
                payload = b"%d-%d" % (n, i)
                assert cli.request(payload, timeout=10) == b"echo:" + payload
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_request_timeout(serve, client):
    release = threading.Event()
    serve(lambda m: release.wait(5) and b"late")
    cli = client()
    t0 = time.monotonic()
    with pytest.raises(machipc.IPCTimeoutError) as info:
        cli.request(b"slow", timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    assert 0.25 < time.monotonic() - t0 < 3
    release.set()
    # The late reply is discarded; the next request gets its own answer.
    assert cli.request(b"next", timeout=5) == b"late"


def test_a_late_reply_never_answers_the_next_request(serve, client):
    # The late reply reaches the client first, inside the next request's round trip
    # (Client._call): it must be discarded, not returned as that request's answer.
    release = threading.Event()
    serve(lambda m: release.wait(5) and b"late" if m.data == b"slow" else b"echo:" + m.data)
    cli = client()
    with pytest.raises(machipc.IPCTimeoutError):
        cli.request(b"slow", timeout=0.3)
    release.set()
    assert cli.request(b"next", timeout=5) == b"echo:next"
    assert cli.request(b"again", timeout=5) == b"echo:again"


def test_receive_timeout(impl, sockdir):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        with pytest.raises(TimeoutError):
            srv.receive(timeout=0.1)
        with pytest.raises(ValueError):
            srv.receive(timeout=-1)


def test_unknown_service(impl, sockdir):
    with pytest.raises(machipc.ServiceNotFound) as info:
        machipc.Client("org.nobody.here", directory=sockdir, impl=impl)
    assert isinstance(info.value, FileNotFoundError)


def test_rejected_request_gets_a_rejection(serve, client):
    srv = serve(policy=policies.SameUser(uid=os.geteuid() + 4242))
    cli = client()
    with pytest.raises(machipc.Rejected) as info:
        cli.request(b"let me in", timeout=5)
    assert isinstance(info.value, PermissionError)
    cli.send(b"one-way is dropped, and counted")
    with pytest.raises(machipc.Rejected):
        cli.request(b"sync", timeout=5)
    assert srv.stats.rejected == 3 and srv.stats.received == 0


def test_report_only_lets_through(serve, client):
    srv = serve(policy=policies.SameUser(uid=os.geteuid() + 1), enforce=False)
    assert client().request(b"hi", timeout=5) == b"echo:hi"
    assert srv.stats.would_reject == 1 and srv.stats.rejected == 0


def test_broken_policy_fails_closed(serve, client):
    srv = serve(policy=lambda peer: True)  # not a Decision
    with pytest.raises(machipc.Rejected):
        client().request(b"hi", timeout=5)

    def boom(peer):
        raise RuntimeError("bug")

    srv2 = serve(policy=boom, name="org.test.boom")
    with pytest.raises(machipc.Rejected):
        client(name="org.test.boom").request(b"hi", timeout=5)
    assert srv.stats.rejected == srv2.stats.rejected == 1


def test_oversized_payload(serve, client):
    srv = serve(max_size=100)
    cli = client()
    # Over the server's limit: refused by the server (a memfd is refused before it is mapped).
    with pytest.raises(machipc.MessageTooLarge, match="limit of 100") as info:
        cli.request(b"x" * (wire.INLINE_MAX + 1), timeout=5)
    assert isinstance(info.value, ValueError)
    with pytest.raises(machipc.MessageTooLarge, match="limit of 100"):
        cli.request(b"x" * 101, timeout=5)  # the client read the server's HELLO: refused before sending
    assert cli.request(b"x" * 100, timeout=5) == b"echo:" + b"x" * 100
    assert srv.stats.too_large == 1
    # Over the client's own limit: refused before anything is sent.
    small = client(max_size=1000)
    with pytest.raises(machipc.MessageTooLarge, match="1000-byte limit"):
        small.send(b"x" * 1001)
    assert srv.stats.too_large == 1


def test_handler_error_becomes_remote_error(serve, client):
    def handler(msg):
        if msg.data == b"bad":
            raise KeyError("oops")
        return b"fine"

    srv = serve(handler)
    cli = client()
    with pytest.raises(machipc.RemoteError, match="KeyError"):
        cli.request(b"bad", timeout=5)
    assert cli.request(b"good", timeout=5) == b"fine"
    assert srv.stats.handler_errors == 1


def test_reply_to_one_way_is_an_error(impl, sockdir, client):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        client().send(b"x")
        msg = srv.receive(timeout=5)
        with pytest.raises(machipc.InvalidArgument, match="one-way"):
            msg.reply(b"no")


def test_double_reply_is_an_error(impl, sockdir, client):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        cli = client()
        t = threading.Thread(target=lambda: cli.request(b"x", timeout=5))
        t.start()
        msg = srv.receive(timeout=5)
        msg.reply(b"one")
        with pytest.raises(machipc.InvalidArgument, match="already answered"):
            msg.reply(b"two")
        t.join(5)


def test_server_close_wakes_blocked_client(serve, client):
    started, release = threading.Event(), threading.Event()
    srv = serve(lambda m: started.set() or release.wait(30))
    cli = client()
    errors = []

    def blocked():
        try:
            cli.request(b"hang", timeout=20)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    assert started.wait(5)
    # close() from another thread while the handler is busy: the receive loop
    # is outside receive() so teardown happens now and the client sees EOF.
    threading.Thread(target=srv.close).start()
    t.join(10)
    release.set()
    assert not t.is_alive()
    assert errors and isinstance(errors[0], ConnectionError), errors


def test_close_wakes_blocked_receive(impl, sockdir):
    srv = machipc.Server("org.test.svc", directory=sockdir, impl=impl)
    errors = []

    def receiver():
        try:
            srv.receive(timeout=30)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=receiver)
    t.start()
    time.sleep(0.2)
    srv.close()
    t.join(5)
    assert not t.is_alive() and isinstance(errors[0], machipc.ServerClosed)
    assert not os.path.exists(srv.path)
    srv.close()  # idempotent


def test_garbage_from_raw_socket_is_dropped_and_others_served(serve, client):
    srv = serve()
    good = client()
    raw = raw_connect(srv.path)
    bad_packets = [
        b"",
        b"short",
        b"\x00" * 24,
        wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.REPLY, 0, 5, 0),
        wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.REQUEST, 0, 6, 999) + b"lie",
        wire.HEADER.pack(wire.MAGIC, 7, Kind.REQUEST, 0, 8, 0),
    ]
    for p in bad_packets:
        raw.send(p)
        assert good.request(b"still there?", timeout=5) == b"echo:still there?"
    # A request whose header was readable gets a MALFORMED error back.
    raw.settimeout(5)
    answers = [wire.HEADER.unpack_from(raw.recv(100)) for _ in range(2)]
    assert {a[4] for a in answers} == {6, 8} and {a[2] for a in answers} == {Kind.ERROR}
    assert wait_for(lambda: srv.stats.dropped_total == len(bad_packets))
    assert set(srv.stats.dropped) == {"SHORT", "BAD_MAGIC", "BAD_KIND", "BAD_LENGTH", "BAD_VERSION"}
    raw.close()


def test_unexpected_fds_are_closed(serve, client):
    srv = serve()
    cli = client()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    raw.connect(srv.path)
    r, w = os.pipe()
    assert cli.request(b"warm up", timeout=5) == b"echo:warm up"
    _closer.flush()  # earlier tests' connections, closed on the closer threads
    before = len(os.listdir("/proc/self/fd"))
    sent = 0
    for _ in range(20):
        try:
            socket.send_fds(raw, [wire.pack_header(Kind.MESSAGE, 0, 1) + b"x"], [r, w])
            sent += 1
        except (BrokenPipeError, ConnectionResetError):
            break  # already hung up on
    # The first breaks the protocol: its sender is hung up on, and the packets queued
    # behind it go with the connection (closed on the closer thread, see machipc._closer).
    assert wait_for(lambda: srv.stats.disconnected["unexpected fds"] == 1)
    assert srv.stats.dropped["UNEXPECTED_FDS"] == 1
    assert cli.request(b"sync", timeout=5) == b"echo:sync"
    # Every received fd closed, and the server's end of raw's connection and its pidfd too.
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before - 2), (sent, len(os.listdir("/proc/self/fd")), before)
    raw.close()
    os.close(r)
    os.close(w)


def test_service_in_use_and_stale_socket(impl, sockdir):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        with pytest.raises(machipc.ServiceInUse):
            machipc.Server("org.test.svc", directory=sockdir, impl=impl)
        path = srv.path
    # A crashed server leaves its socket behind: the next server replaces it.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.close()
    assert os.path.exists(path)
    with pytest.raises(machipc.ServiceNotFound, match="stale"):
        machipc.Client("org.test.svc", directory=sockdir, impl=impl)
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl) as srv:
        with machipc.Client("org.test.svc", directory=sockdir, impl=impl) as cli:
            cli.send(b"hello")
            assert srv.receive(timeout=5).data == b"hello"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a socket to another user")
def test_squatted_socket_refused(impl, sockdir):
    path = os.path.join(sockdir, "org.test.svc")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.listen()
    os.chown(path, 65534, 65534)
    with pytest.raises(machipc.NotPermitted, match="squatting"):
        machipc.Client("org.test.svc", directory=sockdir, impl=impl)
    with pytest.raises(machipc.NotPermitted, match="squatting"):
        machipc.Server("org.test.svc", directory=sockdir, impl=impl)
    s.close()


def test_socket_mode_is_set_before_listen(impl, sockdir):
    with machipc.Server("org.test.svc", directory=sockdir, impl=impl, mode=0o600) as srv:
        assert os.stat(srv.path).st_mode & 0o777 == 0o600


def test_sigterm_stops_serve(impl, sockdir):
    code = (
        "import machipc, sys\n"
        f"srv = machipc.Server('org.test.sig', directory={sockdir!r}, impl={impl!r})\n"
        "print('ready', flush=True)\n"
        "srv.serve(lambda m: b'ok')\n"
        "srv.close()\n"
        "print('stopped', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    with machipc.Client("org.test.sig", directory=sockdir, impl=impl) as cli:
        assert cli.request(b"x", timeout=5) == b"ok"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and out.strip() == "stopped"
    assert not os.path.exists(os.path.join(sockdir, "org.test.sig"))


def test_client_after_server_gone(impl, sockdir):
    srv = machipc.Server("org.test.svc", directory=sockdir, impl=impl)
    cli = machipc.Client("org.test.svc", directory=sockdir, impl=impl)
    srv.close()
    with pytest.raises(ConnectionError):
        cli.request(b"x", timeout=5)
    with pytest.raises(ConnectionError):
        cli.send(b"x")
    cli.close()


def test_no_fd_leak_over_many_connections(serve, impl, sockdir):
    srv = serve()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with machipc.Client("org.test.svc", directory=sockdir, impl=impl) as cli:
            cli.request(b"x", timeout=5)
    deadline = time.monotonic() + 5
    while srv.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.connections == 0
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_one_way_sender_learns_the_server_limit(serve, client):
    """A one-way message over the server's limit is refused at the sender once the
    server has accepted the connection (its HELLO), not dropped unseen."""
    from conftest import wait_for

    srv = serve(max_size=100)
    cli = client()
    assert wait_for(lambda: srv.connections == 1)
    with pytest.raises(machipc.MessageTooLarge, match="server's limit of 100"):
        cli.send(b"x" * 200)
    with pytest.raises(machipc.MessageTooLarge, match="server's limit of 100"):
        cli.send_many([b"ok", b"x" * 200])
    cli.send(b"y" * 100)
    assert srv.stats.too_large == 0


class _LoggedTransport:
    """A server transport that logs each ``recv`` and ``recv_many`` (its timeout, and
    whether it handed something up) and forwards everything else to the real one."""

    def __init__(self, inner, log: list) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_log", log)

    def recv(self, timeout):
        got = self._inner.recv(timeout)
        self._log.append(("recv", timeout, got is not None))
        return got

    def recv_many(self, max_count, timeout):
        got = self._inner.recv_many(max_count, timeout)
        self._log.append(("recv", timeout, bool(got)))
        return got

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


def test_serve_answers_a_request_before_asking_for_more(impl, sockdir, client):
    """A request serve() had to wait for is handled at once: its reply does not wait
    for serve() to ask the transport what else is queued (that comes after)."""
    log: list = []
    srv = machipc.Server("org.test.svc", directory=sockdir, impl=impl)
    srv._transport = _LoggedTransport(srv._transport, log)

    def handler(msg):
        log.append(("handle",))
        return b"ok"

    thread = threading.Thread(target=srv.serve, args=(handler,), daemon=True)
    thread.start()
    try:
        assert client().request(b"question", timeout=10) == b"ok"
        # (close() only once serve() asked for more: a close before it would end serve() first)
        assert wait_for(lambda: ("handle",) in log and log.index(("handle",)) < len(log) - 1)
    finally:
        srv.close()
        thread.join(10)
    got = next(i for i, entry in enumerate(log) if entry[0] == "recv" and entry[2])  # the request
    assert log[got + 1] == ("handle",), log[: got + 3]
    assert [entry[1] for entry in log[got + 2 : got + 3]] == [0.0]  # then what is queued, without waiting


def test_send_keeps_checking_limits_on_its_fast_path(serve, client):
    """send() passes small messages straight to the transport once the server's limits are
    known; a message over them, a lowered max_size and a closed client are still refused."""
    serve(lambda m: b"" if m.expects_reply else None, max_size=1000)
    cli = client()
    assert cli.request(b"x", timeout=10) == b""  # the server's HELLO is read: its limit is known
    for _ in range(3):
        cli.send(b"a" * 900)
    with pytest.raises(machipc.MessageTooLarge):
        cli.send(b"a" * 1001)  # over the server's limit
    cli.max_size = 500
    with pytest.raises(machipc.MessageTooLarge):
        cli.send(b"a" * 600)  # over our own, lowered, limit
    cli.send(b"a" * 400)
    cli.close()
    with pytest.raises(machipc.PeerGone):
        cli.send(b"a")
