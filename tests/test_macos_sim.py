"""Runs the simulated-macOS suite (tests/macos_sim) on Linux: one fresh interpreter per module.

Each module runs with ``sys.platform == "darwin"``, the standard library as
CPython builds it on macOS, and the fake Mach kernel as ``machipc._mach``
(tests/macos_sim/darwin.py). On a real Mac the Mach end-to-end tests run
instead (tests/test_mach_e2e.py), so this is skipped there.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent
MODULES = sorted(p.name for p in (HERE / "macos_sim").glob("test_*.py"))

pytestmark = pytest.mark.skipif(sys.platform == "darwin", reason="a real Mac runs tests/test_mach_e2e.py instead")


@pytest.mark.parametrize("module", MODULES)
def test_simulated_macos(module):
    env = dict(os.environ, MACHIPC_SIMULATE_DARWIN="1", PYTHONPATH=str(ROOT))
    env.pop("MACHIPC_PURE_PYTHON", None)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--confcutdir", str(HERE / "macos_sim"),
         "-o", "addopts=", "--timeout=300", str(HERE / "macos_sim" / module)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, f"simulated-macOS {module} failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"


def test_mach_backend_is_not_built_on_linux():
    from machipc import mach

    if mach._mach is None:
        with pytest.raises(ImportError, match="macOS"):
            mach.server_transport("org.machipc.x")
