"""A few seconds of the coverage-guided receive-path fuzzer (fuzz/fuzz_recv.py; ``make fuzz`` runs longer)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_atheris_receive_path_short_run(tmp_path):
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris is not installed (pip install atheris): coverage-guided fuzzing skipped")
    try:
        import machipc._unix  # noqa: F401
    except ImportError:
        pytest.skip("the Cython transport is not built: the differential fuzzer needs both")
    corpus = tmp_path / "corpus"
    shutil.copytree(os.path.join(ROOT, "fuzz", "corpus"), corpus)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "fuzz", "fuzz_recv.py"), "-max_total_time=3", "-print_final_stats=1", str(corpus)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-5:])
    print(tail)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Done" in proc.stderr
