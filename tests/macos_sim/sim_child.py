"""Run a snippet in a fresh simulated-macOS interpreter (for signal and two-process tests)."""

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
