"""Pinning senders against pid reuse without a pidfd per packet (both transports).

The transport pins the process that connected (SO_PEERPIDFD at accept) and
checks it alive after each packet; packets from any other pid on the same
connection switch it to per-packet SCM_PIDFD.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import machipc
from machipc import wire
from machipc.wire import Kind


def _packet(text: bytes) -> bytes:
    return wire.pack_header(Kind.MESSAGE, 0, len(text)) + text


def test_connecting_process_is_pinned_once(impl, sockdir):
    with machipc.Server("org.test.pin", directory=sockdir, impl=impl) as srv:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.connect(srv.path)
        for i in range(5):
            raw.send(_packet(b"%d" % i))
        msgs = [srv.receive(timeout=5) for _ in range(5)]
        assert {m.sender.pid for m in msgs} == {os.getpid()}
        assert len({id(m.sender) for m in msgs}) == 1  # one Peer for the connection's process
        assert msgs[0].sender.guard is not None and msgs[0].sender.is_alive()
        raw.close()


def test_forked_child_on_an_inherited_socket_is_not_taken_for_the_parent(impl, sockdir):
    with machipc.Server("org.test.pin", directory=sockdir, impl=impl) as srv:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.connect(srv.path)
        raw.send(_packet(b"parent"))
        parent_msg = srv.receive(timeout=5)
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child sends twice on the parent's connection, then waits to be killed
            try:
                raw.send(_packet(b"child 1"))
                os.read(go_r, 1)  # (the server read the first: a packet read with it in one batch is unpinned too)
                raw.send(_packet(b"child 2"))
                signal.pause()
            finally:
                os._exit(0)
        try:
            first = srv.receive(timeout=5)
            os.write(go_w, b"g")
            second = srv.receive(timeout=5)
            # The kernel's per-packet credentials name the child, never the parent.
            assert first.sender.pid == second.sender.pid == pid
            # The first packet from a pid that is not the pinned one cannot be pinned
            # (it came before SO_PASSPIDFD was on); once on, packets carry their own pidfd.
            assert first.sender.guard is None and not first.sender.is_alive()
            assert second.sender.guard is not None and second.sender.is_alive()
            raw.send(_packet(b"parent again"))
            again = srv.receive(timeout=5)
            assert again.sender.pid == os.getpid() and again.sender.guard is not None
            assert parent_msg.sender.pid == os.getpid()
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(go_r)
            os.close(go_w)
        raw.close()


SEND_AND_EXIT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.send(bytes.fromhex(sys.argv[2]))
"""


def test_packet_read_after_its_sender_was_reaped_is_unpinned(impl, sockdir):
    with machipc.Server("org.test.pin", directory=sockdir, impl=impl) as srv:
        proc = subprocess.run([sys.executable, "-c", SEND_AND_EXIT, srv.path, _packet(b"bye").hex()], timeout=30)
        assert proc.returncode == 0  # exited and reaped before the server reads the packet
        msg = srv.receive(timeout=5)
        # Kernel credentials stay true (uid/gid/pid at send time) ...
        assert msg.sender.uid == os.geteuid() and msg.sender.pid > 0
        # ... but nothing pins a process that is gone: no guard, no executable.
        assert msg.sender.guard is None and msg.sender.exe is None
