"""A machipc Server for tests/test_namespaces.py, run inside a pid namespace of its own.

    python ns_server.py SOCKDIR NAME uid|exe DIRECTORY IMPL

Serves until stdin closes, answering requests with b"ok"; then prints its
stats as ``received rejected`` on stdout. Policy ``uid``: Allowlist(uids=[0]);
``exe``: SameDirectory(DIRECTORY).
"""

import logging
import sys
import threading

import machipc
from machipc.policies import Allowlist, SameDirectory

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
sockdir, name, which, directory, impl = sys.argv[1:6]
policy = Allowlist(uids=[0]) if which == "uid" else SameDirectory(directory)
srv = machipc.Server(name, policy=policy, directory=sockdir, impl=impl)
seen = []


def handle(msg):
    seen.append(repr(msg.sender))
    return b"ok"


thread = threading.Thread(target=srv.serve, args=(handle,), daemon=True)
thread.start()
print(srv.path, flush=True)
sys.stdin.read()
srv.stop()  # graceful: what was sent before is still read
thread.join(10)
print(srv.stats.received, srv.stats.rejected, *seen, sep="\n", flush=True)
