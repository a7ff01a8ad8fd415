#!/usr/bin/env python3
"""Example machipc daemon for launchd (see com.example.machipc-echo.plist).

launchd has registered the MachServices name before this runs; machipc.Server
checks it in (bootstrap_check_in) and answers every request whose sender the
policy allows: root, or the console user with uid 501, as told by the kernel's
audit token on each message. Run it by hand for a test with an unused name:

    python3 echo_daemon.py com.example.machipc-echo.test
    python3 -c "import machipc; print(machipc.Client('com.example.machipc-echo.test').request(b'hi'))"
"""

import logging
import sys

import machipc
from machipc.policies import Allowlist, SameUser

NAME = sys.argv[1] if len(sys.argv) > 1 else "com.example.machipc-echo"

# Root, or the same user as this daemon (for a LaunchAgent), or uid 501.
POLICY = Allowlist(uids=[0]) | SameUser() | Allowlist(uids=[501])


def handle(msg: machipc.Message) -> bytes:
    peer = msg.sender
    logging.info("pid %d uid %d (%s) sent %d bytes", peer.pid, peer.uid, peer.exe, len(msg.data))
    return bytes(msg.data)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with machipc.Server(NAME, POLICY) as server:
        logging.info("serving %s (%s transport)", NAME, server.implementation)
        server.serve(handle)  # SIGTERM from `launchctl bootout` ends it cleanly


if __name__ == "__main__":
    main()
