#!/usr/bin/env python3
"""machipc asyncio daemon: systemd socket activation, launchd, or by hand (see README.md here)."""
import asyncio
import logging
import sys

import machipc
from machipc import aio
from machipc.policies import Allowlist, SameUser

NAME = sys.argv[1] if len(sys.argv) > 1 else "org.example.hello"
POLICY = Allowlist(uids=[0]) | SameUser()  # root, or the user the daemon runs as


async def hello(msg: machipc.Message) -> bytes:
    return b"hello pid %d uid %d: %s" % (msg.sender.pid, msg.sender.uid, bytes(msg.data))


async def main() -> None:
    async with aio.Server(NAME, POLICY) as srv:  # takes systemd's socket when activated
        logging.info("serving %s at %s (activated: %s)", NAME, srv.path, srv.activated)
        await srv.serve(hello)  # READY=1; SIGTERM: answer what was sent, STOPPING=1, close


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    asyncio.run(main())
