"""Installs the macOS simulation before machipc is imported (MACHIPC_SIMULATE_DARWIN=1).

tests/test_macos_sim.py runs each module here in a fresh interpreter with that
variable set and ``--confcutdir`` here; collected by the ordinary Linux run
(machipc already imported for real), the modules are left out.
"""

import os
import sys

if os.environ.get("MACHIPC_SIMULATE_DARWIN") == "1" and "machipc" not in sys.modules:
    from tests.macos_sim import darwin

    darwin.install()
    collect_ignore_glob: list = []
else:
    collect_ignore_glob = ["test_*.py"]
