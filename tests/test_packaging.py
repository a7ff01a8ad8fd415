"""The sdist and wheel carry what they should, and nothing generated; an uninstalled
source tree says how to install."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_copy(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = os.path.join(ROOT, os.fsdecode(name))
        if not os.path.isfile(src):
            continue  # deleted in the work tree
        target = os.path.join(dest, os.fsdecode(name))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(src, "rb") as f, open(target, "wb") as g:
            g.write(f.read())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: cannot tell tracked files from built ones")
    tree = str(tmp_path_factory.mktemp("tree"))
    _tracked_copy(tree)
    code = (
        "import sys; from setuptools import build_meta as b\n"
        "s = b.build_sdist('dist'); w = b.build_wheel('dist')\n"
        "sys.stderr.write('\\nBUILT ' + s + ' ' + w + '\\n')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sdist, wheel = done.stderr.rsplit("BUILT ", 1)[1].split()
    return os.path.join(tree, "dist", sdist), os.path.join(tree, "dist", wheel), done.stdout + done.stderr


def test_sdist_contents(built):
    names = tarfile.open(built[0]).getnames()
    top = names[0].split("/")[0]
    for needed in ("LICENSE", "README.md", "machipc/_mach_layout.h", "machipc/_stream_copy.h", "machipc/_unix.pyx", "docs/protocol.md", "policies/__init__.py"):
        assert f"{top}/{needed}" in names, needed
    assert not [n for n in names if n.endswith((".c", ".so"))]


def test_wheel_contents(built):
    names = zipfile.ZipFile(built[1]).namelist()
    assert any(n.endswith("/licenses/LICENSE") for n in names)
    assert "machipc/policies/__init__.py" in names and "machipc/py.typed" in names
    assert not [n for n in names if n.endswith(".c")], "the generated C file is shipped"


def test_no_license_deprecation_banner(built):
    assert "SetuptoolsDeprecationWarning" not in built[2] and "is deprecated" not in built[2], built[2][-2000:]


def test_uninstalled_source_tree_says_how_to_install(tmp_path):
    _tracked_copy(str(tmp_path))
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import machipc"
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "ImportError" in last and "make install" in last and "pip install -e ." in last, done.stderr
    assert "circular" not in done.stderr


@pytest.mark.parametrize("setup, expected", [
    ("", "False"),  # the extension is built in the test environment (test_backend insists)
    ("os.environ['MACHIPC_PURE_PYTHON'] = '1'", "True"),
    ("sys.modules['machipc._unix'] = None", "True"),  # the extension does not import: the pure twin runs
])
def test_pure_python_flag_is_truthful(setup, expected):
    code = f"import os, sys\n{setup}\nimport machipc, machipc._backend as b\nprint(machipc.PURE_PYTHON, b.DEFAULT.IMPLEMENTATION)"
    env = {k: v for k, v in os.environ.items() if k != "MACHIPC_PURE_PYTHON"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    flag, impl = done.stdout.split()
    assert flag == expected and (impl == "py") == (expected == "True"), done.stdout + done.stderr
