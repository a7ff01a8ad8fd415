"""Helpers of the simulated-macOS tests: a fresh simulated interpreter (for signal and
two-process tests), and a Mach server transport + client pair."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRELUDE = "from tests.macos_sim import darwin\ndarwin.install()\n"


def spawn(code: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MACHIPC_SIMULATE_DARWIN="1")
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def transport_pair(name: str):
    """Yield ``(ServerTransport, Conn)`` for ``name``; both closed afterwards."""
    from machipc import mach

    server = mach.server_transport(name)
    client = mach.client_conn(name, 5.0)
    try:
        yield server, client
    finally:
        client.close()
        server.close()
