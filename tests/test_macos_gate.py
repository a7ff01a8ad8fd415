"""tools/macos_check.py: the cross-compile gate for the macOS Mach backend.

Runs on Linux (and macOS). Needs the ``ziglang`` wheel; the gate installs it,
and these tests skip (saying why) when it cannot be installed. A warm run takes
a few seconds; the first run on a machine also builds zig's caches (~30 s).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GATE = ROOT / "tools" / "macos_check.py"
SOURCES = ("_mach.pyx", "_mach.pxd", "_mach_layout.h")


def run_gate(tmp_path: Path, *args: str) -> tuple[int, str, dict]:
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(GATE), "--out", str(out), *args], capture_output=True, text=True,
                       timeout=600)
    if r.returncode == 2:
        pytest.skip(f"ziglang is not installable here: {r.stdout.strip()[-300:]}")
    report_file = out / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return r.returncode, r.stdout + r.stderr, report


def copy_sources(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        shutil.copy(ROOT / "machipc" / name, src / name)
    return src


def test_gate_passes_for_both_targets(tmp_path):
    rc, output, report = run_gate(tmp_path)
    print(output)
    assert rc == 0, output
    assert report["ok"] and not report["failures"]
    assert set(report["targets"]) == {"aarch64-macos", "x86_64-macos"}
    for target, entry in report["targets"].items():
        assert entry["mach_o"]
        syms = set(entry["libsystem_symbols"])
        for needed in ("_mach_msg", "_mach_msg_destroy", "_bootstrap_check_in", "_bootstrap_look_up",
                       "_vm_deallocate", "_mach_port_set_attributes", "_kevent64"):
            assert needed in syms, (target, needed)
        assert entry["undefined_python"] > 0
        assert entry["not_in_libsystem_tbd"] == [] and entry["strict_link_unresolved_non_python"] == []
        assert (tmp_path / "out" / target / "_mach.so").read_bytes()[:4] == b"\xcf\xfa\xed\xfe"
    assert report["static_asserts"] >= 40
    assert report["min_macos"] == "11.0"
    assert "sources from the sdist" in output and "'boundscheck': False" in output


def test_gate_fails_on_typo_in_sdk_declared_call(tmp_path):
    """A misspelt Mach call declared by an SDK header fails at compile time."""
    src = copy_sources(tmp_path)
    for name in ("_mach.pyx", "_mach.pxd"):
        p = src / name
        p.write_text(p.read_text().replace("mach_msg_destroy(", "mach_msg_destroyy("))
    rc, output, report = run_gate(tmp_path, "--src", str(src), "--targets", "aarch64-macos")
    assert rc == 1, output
    assert "mach_msg_destroyy" in output


def test_gate_fails_on_typo_in_hand_declared_call(tmp_path):
    """A misspelt bootstrap call (declared by hand, as the SDK lacks the header)
    compiles and links with dynamic_lookup; only the symbol check catches it."""
    src = copy_sources(tmp_path)
    for name in SOURCES:
        p = src / name
        p.write_text(p.read_text().replace("bootstrap_look_up(", "bootstrap_look_upx("))
    rc, output, report = run_gate(tmp_path, "--src", str(src), "--targets", "x86_64-macos")
    assert rc == 1, output
    entry = report["targets"]["x86_64-macos"]
    assert entry["strict_link_unresolved_non_python"] == ["_bootstrap_look_upx"]
    assert entry["not_in_libsystem_tbd"] == ["_bootstrap_look_upx"]
    assert any("_bootstrap_look_upx" in f for f in report["failures"])


def test_gate_fails_on_wrong_layout_constant(tmp_path):
    """A layout constant that disagrees with the SDK breaks a _Static_assert."""
    src = copy_sources(tmp_path)
    p = src / "_mach_layout.h"
    p.write_text(p.read_text().replace("#define MACHMSG_OFF_TRAILER_AUDIT 20", "#define MACHMSG_OFF_TRAILER_AUDIT 24"))
    rc, output, report = run_gate(tmp_path, "--src", str(src), "--targets", "aarch64-macos")
    assert rc == 1, output
    assert "MACHMSG_OFF_TRAILER_AUDIT" in output


def test_gate_fails_on_api_newer_than_the_minimum_macos(tmp_path):
    """An API newer than MIN_MACOS is an error, not a warning (review finding 17)."""
    src = copy_sources(tmp_path)
    p = src / "_mach_layout.h"
    p.write_text(p.read_text().replace(
        "#endif", "#include <unistd.h>\nstatic inline long machipc_probe(void) { return (long)&freadlink; }\n#endif"))
    p = src / "_mach.pxd"
    p.write_text(p.read_text() + "\ncdef extern from \"_mach_layout.h\":\n    long machipc_probe()\n")
    p = src / "_mach.pyx"
    p.write_text(p.read_text() + "\ndef _probe():\n    return machipc_probe()\n")
    rc, output, report = run_gate(tmp_path, "--src", str(src), "--targets", "x86_64-macos")
    assert rc == 1, output
    assert "freadlink" in output and "macOS 13.0" in output


def copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, root / name)
    return root


def test_gate_fails_when_the_sdist_lacks_a_source(tmp_path):
    """The gate builds from an sdist: a file left out of it fails (review finding 12)."""
    root = copy_tree(tmp_path)
    p = root / "pyproject.toml"
    p.write_text(p.read_text().replace(', "_mach_layout.h"', ""))
    rc, output, report = run_gate(tmp_path, "--root", str(root))
    assert rc == 1, output
    assert "the sdist lacks _mach_layout.h" in output


@pytest.mark.parametrize("old, new, named", [
    ('("vst_ino", ctypes.c_uint64)', '("vst_ino", ctypes.c_uint32)', "vst_ino"),
    ("ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int]", "ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int]", "proc_pidinfo"),
])
def test_gate_fails_on_a_wrong_ctypes_declaration(tmp_path, old, new, named):
    """policies/_macos.py's ctypes structures and libproc signatures are checked against the SDK."""
    root = copy_tree(tmp_path)
    p = root / "policies" / "_macos.py"
    assert old in p.read_text()
    p.write_text(p.read_text().replace(old, new))
    rc, output, report = run_gate(tmp_path, "--root", str(root), "--targets", "x86_64-macos")
    assert rc == 1, output
    assert "ctypes layouts of policies/_macos.py disagree" in output and named in output
