"""The processes of the benchmark: one server and one client per backend.

Every backend speaks the same tiny bench protocol inside its payloads (the
same layout as ``c_floor.c``), little-endian::

    0  u8   tag   b"R" request (echoed), b"D" one-way data, b"S" sync
    4  u32  pid   the sender's own pid (servers compare it with the kernel's)
    8  u64  seq   per-sender sequence number (one-way: must be consecutive;
                  sync: number of one-way messages sent so far)

A server counts one-way messages per sender, checks their order and the
sender's pid (the kernel's pid where the transport gives one: machipc, the
raw socket, the C floor; only the claimed pid for multiprocessing and zmq,
which carry no credentials), and answers a sync with ``(received, errors)``.
A request is echoed only when its pid checks out. So every timed round ends
with proof that every message arrived, in order, from the right process.

Run as a program::

    python peers.py serve BACKEND ADDR [--impl py|c] [--policy sameuser|allowall] [--loop serve|receive_many]
    python peers.py drive BACKEND ADDR [--impl py|c]   # stdin commands, like c_floor drive

Backends: ``socket`` (raw SEQPACKET + SCM_CREDENTIALS), ``mpconn``
(``multiprocessing.connection``), ``zmq`` (REQ/REP for requests, PUSH/PULL for
one-way), ``machipc``.
"""

from __future__ import annotations

import array
import argparse
import fcntl
import functools
import json
import mmap
import os
import select
import socket
import struct
import sys
import time
from collections import defaultdict

HDR = struct.Struct("<B3xIQ")
SYNC_REPLY = struct.Struct("<B3xIQQ")  # tag b"Y", pid 0, received, errors
R, D, S, Y = ord("R"), ord("D"), ord("S"), ord("Y")
M = ord("M")  # raw socket: one-way payload in a sealed memfd
INLINE_MAX = 64 * 1024
SO_PASSPIDFD = 76
SCM_PIDFD = 4
UCRED = struct.Struct("=iII")
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
MEMFD_PKT = struct.Struct("<B3xIQQ")  # header + payload size
SYNC_TIMEOUT = 30.0


class BenchError(AssertionError):
    """A round did not deliver every message correctly."""


# --------------------------------------------------------------------------- sink bookkeeping


class Sink:
    """Per-sender one-way state: next expected seq, received, errors."""

    __slots__ = ("next", "received", "errors")

    def __init__(self) -> None:
        self.next = 0
        self.received = 0
        self.errors = 0

    def take(self, seq: int, ok: bool = True) -> None:
        if seq != self.next or not ok:
            self.errors += 1
        self.next = seq + 1
        self.received += 1

    def reply(self) -> bytes:
        return SYNC_REPLY.pack(Y, 0, self.received, self.errors)


def check_sync(reply, sent: int) -> None:
    tag, _pid, received, errors = SYNC_REPLY.unpack_from(reply)
    if tag != Y or received != sent or errors:
        raise BenchError(f"server saw {received} of {sent} messages, {errors} errors (tag {tag!r})")


class Payloads:
    """Reusable payload buffer with the bench header packed in place."""

    def __init__(self, size: int) -> None:
        if size < HDR.size:
            raise ValueError(f"payload must be at least {HDR.size} bytes")
        self.size = size
        self.buf = bytearray(size)
        self.filler = bytes(size - HDR.size)

    def small(self, tag: int, pid: int, seq: int) -> bytes:
        return HDR.pack(tag, pid, seq) + self.filler

    def big(self, tag: int, pid: int, seq: int) -> bytearray:
        HDR.pack_into(self.buf, 0, tag, pid, seq)
        self.buf[-1] = seq & 0xFF
        return self.buf


def echo_rounds(send, recv, size: int, pid: int, count: int) -> None:
    """``count`` request/reply round trips of ``size`` bytes, each echo checked."""
    p = Payloads(size)
    for i in range(count):
        data = p.small(R, pid, i)
        send(data)
        if recv() != data:
            raise BenchError(f"request {i}: wrong or missing echo")


def check_big(data, pid: int, seq: int) -> bool:
    return len(data) > HDR.size and HDR.unpack_from(data) [1:] == (pid, seq) and data[-1] == seq & 0xFF


# --------------------------------------------------------------------------- raw socket


def _parse_anc(anc) -> tuple[int, list[int]]:
    pid, fds = 0, []
    for level, kind, data in anc:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS:
            pid = UCRED.unpack_from(data)[0]
        elif kind == SCM_PIDFD:
            pfd = struct.unpack_from("i", data)[0]
            if pfd >= 0:
                os.close(pfd)
        elif kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % 4])
            fds.extend(a)
    return pid, fds


def _read_memfd(fd: int, size: int) -> bytes:
    st = os.fstat(fd)
    if st.st_size != size or fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS != SEALS:
        return b""
    with mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ) as mm:
        return mm[:]  # the receiver's private copy


def serve_socket(path: str, **_) -> None:
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    try:
        ls.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
    except OSError:
        pass
    ls.bind(path)
    ls.listen(128)
    ready()
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, Sink]] = {}
    cspace = socket.CMSG_SPACE(UCRED.size) + socket.CMSG_SPACE(4) + socket.CMSG_SPACE(32)
    bufsize = INLINE_MAX + 64
    while True:
        for fd, _ in ep.poll():
            if fd == ls.fileno():
                c, _ = ls.accept()
                c.setblocking(False)
                conns[c.fileno()] = (c, Sink())
                ep.register(c.fileno(), select.EPOLLIN)
                continue
            c, sink = conns[fd]
            for _ in range(64):
                try:
                    data, anc, flags, _ = c.recvmsg(bufsize, cspace, socket.MSG_CMSG_CLOEXEC)
                except BlockingIOError:
                    break
                except ConnectionError:
                    data, anc = b"", []
                if not data and not anc:
                    ep.unregister(fd)
                    del conns[fd]
                    c.close()
                    break
                kpid, fds = _parse_anc(anc)
                tag, pid, seq = HDR.unpack_from(data)
                ok = kpid == pid and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
                if tag == R:
                    c.send(data if ok else HDR.pack(ord("E"), kpid, seq))
                elif tag == D:
                    sink.take(seq, ok)
                elif tag == M:
                    size = MEMFD_PKT.unpack_from(data)[3]
                    big = _read_memfd(fds[0], size) if fds else b""
                    sink.take(seq, ok and check_big(big, pid, seq))
                elif tag == S:
                    c.send(sink.reply())
                for f in fds:
                    os.close(f)


class SocketClient:
    def __init__(self, path: str, **_) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.pid = os.getpid()
        self.sent = 0

    def rtt(self, size: int, count: int) -> None:
        echo_rounds(self.sock.send, functools.partial(self.sock.recv, INLINE_MAX + 64), size, self.pid, count)

    def oneway(self, size: int, count: int) -> None:
        p, pid = Payloads(size), self.pid
        if size > INLINE_MAX:
            for _ in range(count):
                self._send_memfd(p.big(D, pid, self.sent))
                self.sent += 1
        else:
            send = self.sock.send
            for _ in range(count):
                send(p.small(D, pid, self.sent))
                self.sent += 1
        self.sync()

    def _send_memfd(self, data) -> None:
        fd = os.memfd_create("bench", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view, off = memoryview(data), 0
            while off < len(view):
                off += os.write(fd, view[off:])
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
            _, pid, seq = HDR.unpack_from(data)
            pkt = MEMFD_PKT.pack(M, pid, seq, len(view))
            self.sock.sendmsg([pkt], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        finally:
            os.close(fd)

    def sync(self) -> None:
        self.sock.send(HDR.pack(S, self.pid, self.sent))
        check_sync(self.sock.recv(64), self.sent)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- multiprocessing.connection


def serve_mpconn(path: str, **_) -> None:
    import threading
    from multiprocessing.connection import Listener, wait

    listener = Listener(path, family="AF_UNIX")
    ready()
    wake_r, wake_w = os.pipe()
    new: list = []

    def accept() -> None:
        while True:
            new.append(listener.accept())
            os.write(wake_w, b"x")

    threading.Thread(target=accept, daemon=True).start()
    conns: dict = {}
    while True:
        for obj in wait([wake_r, *conns]):
            if obj == wake_r:
                os.read(wake_r, 64)
                while new:
                    conns[new.pop()] = Sink()
                continue
            try:
                data = obj.recv_bytes()
            except (EOFError, OSError):
                del conns[obj]
                obj.close()
                continue
            tag, pid, seq = HDR.unpack_from(data)
            sink = conns[obj]
            if tag == R:
                obj.send_bytes(data)
            elif tag == D:
                sink.take(seq, len(data) <= INLINE_MAX or check_big(data, pid, seq))
            elif tag == S:
                obj.send_bytes(sink.reply())


class MpconnClient:
    def __init__(self, path: str, **_) -> None:
        from multiprocessing.connection import Client

        self.conn = Client(path, family="AF_UNIX")
        self.pid = os.getpid()
        self.sent = 0

    def rtt(self, size: int, count: int) -> None:
        echo_rounds(self.conn.send_bytes, self.conn.recv_bytes, size, self.pid, count)

    def oneway(self, size: int, count: int) -> None:
        p, pid, send = Payloads(size), self.pid, self.conn.send_bytes
        make = p.big if size > INLINE_MAX else p.small
        for _ in range(count):
            send(make(D, pid, self.sent))
            self.sent += 1
        self.sync()

    def sync(self) -> None:
        self.conn.send_bytes(HDR.pack(S, self.pid, self.sent))
        check_sync(self.conn.recv_bytes(), self.sent)

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- pyzmq


def serve_zmq(path: str, **_) -> None:
    import zmq

    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.bind(f"ipc://{path}.rep")
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"ipc://{path}.pull")
    ready()
    sinks: dict[int, Sink] = defaultdict(Sink)

    def take(frame) -> None:
        buf = frame.buffer
        _tag, pid, seq = HDR.unpack_from(buf)
        sinks[pid].take(seq, len(buf) <= INLINE_MAX or check_big(buf, pid, seq))

    poller = zmq.Poller()
    poller.register(rep, zmq.POLLIN)
    poller.register(pull, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if pull in events:
            for _ in range(256):
                try:
                    take(pull.recv(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
        if rep in events:
            data = rep.recv()
            tag, pid, seq = HDR.unpack_from(data)
            if tag == S:
                # PUSH and REQ are separate pipes: wait for the stragglers.
                sink = sinks[pid]
                deadline = time.monotonic() + SYNC_TIMEOUT
                while sink.received < seq and time.monotonic() < deadline:
                    if pull.poll(1000):
                        take(pull.recv(copy=False))
                rep.send(sink.reply())
            else:
                rep.send(data)


class ZmqClient:
    def __init__(self, path: str, **_) -> None:
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.req = self.ctx.socket(zmq.REQ)
        self.req.connect(f"ipc://{path}.rep")
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(f"ipc://{path}.pull")
        self.pid = os.getpid()
        self.sent = 0
        self.bigs: list = []

    def rtt(self, size: int, count: int) -> None:
        echo_rounds(self.req.send, self.req.recv, size, self.pid, count)

    def oneway(self, size: int, count: int) -> None:
        pid = self.pid
        if size > INLINE_MAX:
            # Zero-copy sends (pyzmq's advice for big messages) from a ring of
            # buffers; a buffer is reused only once zmq is done with it.
            if not self.bigs or self.bigs[0][0].size != size:
                self.bigs = [[Payloads(size), None] for _ in range(3)]
            for _ in range(count):
                slot = self.bigs[self.sent % len(self.bigs)]
                if slot[1] is not None:
                    slot[1].wait()
                slot[1] = self.push.send(slot[0].big(D, pid, self.sent), copy=False, track=True)
                self.sent += 1
        else:
            p, send = Payloads(size), self.push.send
            for _ in range(count):
                send(p.small(D, pid, self.sent))
                self.sent += 1
        self.sync()

    def sync(self) -> None:
        self.req.send(HDR.pack(S, self.pid, self.sent))
        check_sync(self.req.recv(), self.sent)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


# --------------------------------------------------------------------------- machipc


def _policy(name: str):
    import machipc

    return {"sameuser": machipc.policies.SameUser, "allowall": machipc.policies.AllowAll}[name]()


def serve_machipc(path: str, impl: str = "py", policy: str = "sameuser", loop: str = "serve", **_) -> None:
    """A machipc server with a counting handler, run by ``srv.serve(handler)`` or, with
    ``loop="receive_many"``, by a ``receive_many()`` loop calling the same handler."""
    import machipc

    directory, name = os.path.split(path)
    srv = machipc.Server(name, policy=_policy(policy), directory=directory, impl=impl)
    sinks: dict[int, Sink] = defaultdict(Sink)
    unpack = HDR.unpack_from

    def handler(msg):
        data = msg.data
        tag, pid, seq = unpack(data)
        kpid = msg.sender.pid
        if tag == R:
            return data if pid == kpid else b"E"
        if tag == D:
            sinks[kpid].take(seq, pid == kpid)
            return None
        if tag == S:
            return sinks[kpid].reply()
        return b"E"

    ready(srv.implementation)
    if loop == "serve":
        srv.serve(handler)
    else:
        receive_many_loop(srv, handler)
    srv.close()


def receive_many_loop(srv, handler) -> None:
    """What a user who batches runs instead of ``serve()``: take what is queued with
    ``receive_many()`` (its default batch), hand each message to the handler, answer
    requests with its result. Until SIGTERM ends the process."""
    receive_many = srv.receive_many
    while True:
        for msg in receive_many():
            result = handler(msg)
            if msg.expects_reply:
                msg.reply(result or b"")


class MachipcClient:
    def __init__(self, path: str, impl: str = "py", **_) -> None:
        import machipc

        directory, name = os.path.split(path)
        self.cli = machipc.Client(name, directory=directory, impl=impl)
        self.pid = os.getpid()
        self.sent = 0

    def rtt(self, size: int, count: int) -> None:
        p, request, pid = Payloads(size), self.cli.request, self.pid
        for i in range(count):
            data = p.small(R, pid, i)
            if request(data, 10.0) != data:
                raise BenchError(f"request {i}: wrong or missing echo")

    def oneway(self, size: int, count: int) -> None:
        p, pid, send = Payloads(size), self.pid, self.cli.send
        make = p.big if size > INLINE_MAX else p.small
        for _ in range(count):
            send(make(D, pid, self.sent))
            self.sent += 1
        self.sync()

    def batch(self, size: int, count: int, batch: int) -> None:
        send_many = getattr(self.cli, "send_many", None)
        if send_many is None:
            raise NotImplementedError("machipc.Client has no batch API (send_many) yet")
        p, pid = Payloads(size), self.pid
        done = 0
        while done < count:
            k = min(batch, count - done)
            send_many([p.small(D, pid, self.sent + j) for j in range(k)])
            self.sent += k
            done += k
        self.sync()

    def sync(self) -> None:
        check_sync(self.cli.request(HDR.pack(S, self.pid, self.sent), 30.0), self.sent)

    def close(self) -> None:
        self.cli.close()


SERVERS = {"socket": serve_socket, "mpconn": serve_mpconn, "zmq": serve_zmq, "machipc": serve_machipc}
CLIENTS = {"socket": SocketClient, "mpconn": MpconnClient, "zmq": ZmqClient, "machipc": MachipcClient}


# --------------------------------------------------------------------------- program


def ready(info: str = "") -> None:
    print(f"READY {os.getpid()} {info}".rstrip(), flush=True)


def drive(client) -> None:
    """Run commands from stdin (``rtt SIZE COUNT``, ``oneway SIZE COUNT``) and print JSON."""
    ready()
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        op, size, count = words[0], int(words[1]), int(words[2])
        t0 = time.perf_counter_ns()
        errors, text = 0, ""
        try:
            getattr(client, op)(size, count)
        except Exception as exc:  # reported, the driver fails the benchmark
            errors, text = 1, f"{type(exc).__name__}: {exc}"
        ns = time.perf_counter_ns() - t0
        print(json.dumps({"op": op, "size": size, "count": count, "ns": ns, "errors": errors, "error": text}), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("role", choices=["serve", "drive"])
    ap.add_argument("backend", choices=sorted(SERVERS))
    ap.add_argument("addr")
    ap.add_argument("--impl", default="py", choices=["py", "c"])
    ap.add_argument("--policy", default="sameuser", choices=["sameuser", "allowall"])
    ap.add_argument("--loop", default="serve", choices=["serve", "receive_many"], help="machipc's server loop")
    args = ap.parse_args(argv)
    if args.role == "serve":
        SERVERS[args.backend](args.addr, impl=args.impl, policy=args.policy, loop=args.loop)
    else:
        drive(CLIENTS[args.backend](args.addr, impl=args.impl))


if __name__ == "__main__":
    main()
