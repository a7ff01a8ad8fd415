"""The demo behind ``make demo``: a server with a policy, trusted and untrusted clients.

Trusted clients are Python processes running the same interpreter as the server.
Untrusted ones are a Perl program speaking the wire protocol (a different
executable, rejected by the Allowlist) and, when the demo runs as root, the same
Perl program running as ``nobody`` (a different uid, rejected by SameUser first).
The kernel reports who each sender is; the policy decides; the output shows both.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Optional

from . import policies
from ._printable import printable
from .message import Message
from .server import Server

SERVICE = "org.machipc.demo"

# A foreign program: speaks machipc's wire format (docs/protocol.md) from Perl.
PERL_CLIENT = r"""
use Socket;
socket(my $s, AF_UNIX, SOCK_SEQPACKET, 0) or die "socket: $!";
connect($s, pack_sockaddr_un($ARGV[0])) or die "connect: $!";
my $p = "hello from perl, pid $$";
send($s, pack("vCCVQ<Q<", 0x696d, 2, 2, 0, 1, length $p) . $p, 0) or die "send: $!";
my ($r, $magic, $ver, $kind, $flags, $id, $len);
do {  # the server's HELLO (kind 5) comes first
    defined(recv($s, $r, 65560, 0)) or die "recv: $!";
    ($magic, $ver, $kind, $flags, $id, $len) = unpack("vCCVQ<Q<", $r);
} while ($kind == 5);
my ($code) = unpack("v", substr($r, 24, 2));
print "perl client pid $$: reply kind $kind code $code: ", substr($r, 26), "\n";
"""


class _RejectionPrinter(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("rejected"):
            print(f"[server] REJECTED {msg[len('rejected '):]}", flush=True)


def _client_cmd(directory: str, i: int) -> list[str]:
    code = (
        "import machipc, os\n"
        f"with machipc.Client({SERVICE!r}, directory={directory!r}) as c:\n"
        f"    c.send(b'event %d from pid %d' % ({i}, os.getpid()))\n"
        f"    print('client {i} pid', os.getpid(), 'got reply:', c.request(b'ping from client {i}').decode())\n"
    )
    return [sys.executable, "-c", code]


def _run_client(cmd: list[str], label: str, results: list, user: Optional[int] = None) -> None:
    kwargs = {}
    if user is not None:
        kwargs = {"user": user, "group": user, "extra_groups": []}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, **kwargs)
    except (OSError, subprocess.SubprocessError) as exc:
        results.append((label, -1, f"could not run: {exc}"))
        return
    out = (proc.stdout + proc.stderr).strip().splitlines()
    results.append((label, proc.returncode, out[-1] if out else ""))


def run(clients: int = 3) -> int:
    """Run the demo; returns 0 when trusted messages were served and intruders rejected."""
    directory = tempfile.mkdtemp(prefix="machipc-demo-")
    os.chmod(directory, 0o755)  # the uid-nobody client must reach the socket
    policy = policies.SameUser() & policies.Allowlist(executables=[sys.executable])
    logging.getLogger("machipc").addHandler(_RejectionPrinter())
    logging.getLogger("machipc").propagate = False
    srv = Server(SERVICE, policy, directory=directory)
    print(f"[server] {SERVICE!r} at {srv.path}, pid {os.getpid()}, policy {policy!r}", flush=True)

    def handle(msg: Message) -> Optional[bytes]:
        s = msg.sender
        kind = "request" if msg.expects_reply else "message"
        print(
            f"[server] {kind} from pid {s.pid} uid {s.uid} gid {s.gid} exe {printable(str(s.exe))}\n"
            f"         allowed: {printable(msg.decision.reason)}\n         data: {bytes(msg.data)!r}",
            flush=True,
        )
        return b"pong for pid %d" % s.pid

    serving = threading.Thread(target=srv.serve, args=(handle,), daemon=True)
    serving.start()
    results: list = []
    jobs = [threading.Thread(target=_run_client, args=(_client_cmd(directory, i), f"python client {i}", results)) for i in range(clients)]
    perl = shutil.which("perl")
    if perl:
        intruder = [perl, "-e", PERL_CLIENT, srv.path]
        jobs.append(threading.Thread(target=_run_client, args=(intruder, "perl client", results)))
        if os.geteuid() == 0:
            jobs.append(threading.Thread(target=_run_client, args=(intruder, "perl client as uid 65534", results, 65534)))
        else:
            print("[demo] not root: skipping the other-uid intruder (run as root to see it)")
    else:
        print("[demo] perl not found: no intruder to reject, so the demo cannot show a rejection")
    try:
        for job in jobs:
            job.start()
        for job in jobs:
            job.join()
    finally:
        srv.close()
        serving.join(5)
        shutil.rmtree(directory, ignore_errors=True)
    print("\n[demo] client results:")
    for label, code, last in sorted(results):
        print(f"  {label:28} exit {code}: {last}")
    st = srv.stats
    print(f"\n[demo] server stats: {st.received} accepted, {st.rejected} rejected, {st.dropped_total} malformed dropped")
    ok = st.received == 2 * clients and st.rejected >= 1
    print("[demo] OK" if ok else "[demo] FAILED: expected every trusted message accepted and an intruder rejected")
    return 0 if ok else 1
