"""An attacker that claims another process's pid in SCM_CREDENTIALS (run by tests/test_namespaces.py).

Run it as pid 1 of its own user+pid namespace (``unshare -Urpf --mount-proc``),
where it holds CAP_SYS_ADMIN over the namespace and so may name any process
in it. It starts a trusted program as its child, then sends requests on a
machipc connection with ``SCM_CREDENTIALS {pid = child}``, speaking the wire
format by hand (no machipc code):

    python3 ns_attacker.py SOCKET TRUSTED_PROGRAM VARIANT

VARIANT ``child-connects``: the child connects the shared socket before it
execs the trusted program, so the connection is pinned to the child.
``parent-connects``: the attacker connects; its first claim switches the
connection to per-packet SCM_PIDFD, which the kernel derives from the claim.

Prints one line per request: ``reply`` or ``error <code> <text>``.
"""

import os
import socket
import struct
import sys
import time

MAGIC, VERSION, REQUEST, REPLY, ERROR, HELLO = b"mi", 2, 2, 3, 4, 5


def request(sock, request_id, body, pid):
    header = MAGIC + bytes([VERSION, REQUEST]) + b"\0" * 4 + struct.pack("<QQ", request_id, len(body))
    creds = struct.pack("3i", pid, os.getuid(), os.getgid())
    sock.sendmsg([header + body], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
    sock.settimeout(20)
    reply = sock.recv(70000)
    while reply[3] == HELLO:  # the server's first packet on the connection
        reply = sock.recv(70000)
    if reply[3] == REPLY:
        return "reply"
    if reply[3] == ERROR:
        code = struct.unpack_from("<H", reply, 24)[0] if len(reply) >= 26 else -1
        return f"error {code} {reply[26:].decode('utf-8', 'replace')!r}"
    return f"kind {reply[3]}"


def main():
    path, trusted, variant = sys.argv[1:4]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # shared with the child by fork
    if variant == "parent-connects":
        sock.connect(path)
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(ready_r)
        if variant == "child-connects":
            sock.connect(path)  # SO_PEERCRED/SO_PEERPIDFD: the child, genuinely
        os.set_inheritable(ready_w, False)
        os.execv(trusted, [trusted, "60"])  # the pipe closes on exec: the parent knows
    os.close(ready_w)
    os.read(ready_r, 1)  # EOF once the child has exec'd the trusted program
    trusted_id = os.stat(trusted)
    for _ in range(200):
        st = os.stat(f"/proc/{child}/exe")
        if (st.st_dev, st.st_ino) == (trusted_id.st_dev, trusted_id.st_ino):
            break
        time.sleep(0.01)
    try:
        for i in range(3):
            print(request(sock, i + 1, b"attacker bytes %d" % i, child), flush=True)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


main()
