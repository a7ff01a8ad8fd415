#!/usr/bin/env python3
"""``make macos-check``: prove on Linux that the macOS Mach backend builds and links.

No machine here runs macOS, so this gate checks everything a compiler and a
linker can: it cythonizes ``machipc/_mach.pyx`` and compiles it for
``aarch64-macos`` and ``x86_64-macos`` with ``zig cc`` against the macOS SDK
shipped in the ``ziglang`` wheel, then fails unless

(a) both outputs are Mach-O 64-bit shared objects of the right CPU type;
(b) every undefined symbol is CPython's (``_Py*``/``__Py*``) or exported by the
    SDK's libSystem: checked twice, by reading the Mach-O symbol table against
    ``libSystem.tbd`` and by linking once more *without*
    ``-undefined dynamic_lookup`` so the linker itself names every missing
    symbol (``-undefined dynamic_lookup`` alone would hide a typo'd Mach call);
(c) the ``_Static_assert``\\ s of ``machipc/_mach_layout.h`` hold (they are part of
    the compile) and the compiler really enforces ``_Static_assert`` (a probe
    with a false assertion must fail to compile);
(d) nothing used is newer than the minimum macOS docs/macos.md states
    (:data:`MIN_MACOS`): both targets are compiled for that version with
    ``-Werror=unguarded-availability(-new)``, and a probe calling an 11.0 API
    for 10.15 must fail, so the check is known to be live.

The sources are those of an sdist built from the tree (``setup.py sdist``), so
a file missing from the sdist fails the gate; the C is generated with the
Cython directives ``setup.py`` uses. Every undefined symbol is checked against
the libSystem exports listed for *its* architecture in the SDK's tbd
(``arm64`` accepts ``arm64e`` entries: zig's trimmed tbds list only those).
The ctypes side of ``policies/_macos.py`` is checked the same way: a generated
file of ``_Static_assert``\\ s on its structures' sizes and offsets, and its
libproc signatures as function pointers initialised from ``<libproc.h>`` (at
macOS 11.0, so availability too). Not covered (only a Mac can): the runtime
Python headers (these are the host's CPython's), the Security.framework and
CoreFoundation signatures (zig ships no headers for them), and behaviour.

Results go to ``.macos-check/`` (``report.json`` + the two ``.so`` files).
Exit status 0 when every check passes, 1 otherwise, 2 when ziglang cannot be
installed. ``--src DIR`` checks another copy of the sources instead of the
sdist's (the tests inject a typo that way).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import concurrent.futures
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("_mach.pyx", "_mach.pxd", "_mach_layout.h")
TARGETS = {
    # zig target: (Mach-O cputype, tbd targets whose exports this arch may link)
    "aarch64-macos": (0x0100000C, ("arm64-macos", "arm64e-macos")),
    "x86_64-macos": (0x01000007, ("x86_64-macos",)),
}
#: The oldest macOS machipc supports (docs/macos.md): Apple silicon's first, and the
#: first with proc_pidpath_audittoken (API_AVAILABLE(macos(11.0)) in <libproc.h>),
#: which machipc.peer calls through ctypes.
MIN_MACOS = "11.0"
AVAILABILITY = ("-Werror=unguarded-availability", "-Werror=unguarded-availability-new")
MH_MAGIC_64 = 0xFEEDFACF
MH_DYLIB, MH_BUNDLE = 6, 8
LC_SYMTAB = 0x2
N_TYPE, N_EXT, N_UNDF = 0x0E, 0x01, 0x00


class GateError(Exception):
    pass


def log(msg: str) -> None:
    print(f"macos-check: {msg}", flush=True)


def ensure_ziglang() -> Path:
    """The ziglang package directory, installing the wheel from PyPI if needed."""
    try:
        import ziglang  # noqa: F401
    except ImportError:
        log("installing ziglang into this Python (pip install ziglang) ...")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "ziglang"], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"SKIP: cannot install ziglang: {r.stderr.strip()[-500:]}")
            raise SystemExit(2) from None
        import importlib

        importlib.invalidate_caches()
    import ziglang

    return Path(ziglang.__file__).resolve().parent


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def sdist_sources(out: Path, root: Path = ROOT) -> Path:
    """Build an sdist of the tree at ``root`` and return its unpacked ``machipc`` directory."""
    dist = out / "sdist"
    if dist.exists():
        shutil.rmtree(dist)
    dist.mkdir(parents=True)
    env = dict(os.environ, MACHIPC_PURE_PYTHON="1")  # an sdist needs no extension build
    r = run([sys.executable, "setup.py", "-q", "sdist", "--formats=gztar", "-d", str(dist)], cwd=root, env=env)
    tarballs = list(dist.glob("*.tar.gz"))
    if r.returncode != 0 or len(tarballs) != 1:
        raise GateError(f"setup.py sdist failed:\n{_tail(r.stdout + r.stderr)}")
    with tarfile.open(tarballs[0]) as tar:
        tar.extractall(dist, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(dist)
    src = next(dist.glob("*/machipc"))
    missing = [name for name in SOURCES if not (src / name).exists()]
    if missing:
        raise GateError(f"the sdist lacks {', '.join(missing)}: installing it on macOS would fail")
    return src


def setup_directives() -> dict:
    """The ``compiler_directives`` literal of setup.py's cythonize() call."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "compiler_directives":
            return ast.literal_eval(node.value)
    raise GateError("setup.py has no compiler_directives= for cythonize(): the gate cannot match them")


def cythonize(src: Path, out: Path) -> Path:
    """Cythonize ``src/_mach.pyx`` (with its .pxd and header) into ``out/_mach.c``,
    with setup.py's compiler directives."""
    work = out / "src" / "machipc"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in SOURCES:
        shutil.copy(src / name, work / name)
    (work / "__init__.py").write_text("")
    c_file = work / "_mach.c"
    directives = [arg for key, value in setup_directives().items() for arg in ("-X", f"{key}={value}")]
    r = run([sys.executable, "-m", "cython", "-3", "--fast-fail", "--module-name", "machipc._mach", *directives,
             "-o", str(c_file), str(work / "_mach.pyx")])
    if r.returncode != 0:
        raise GateError(f"cython failed:\n{r.stdout}{r.stderr}")
    text = c_file.read_text()
    if '#include "_mach_layout.h"' not in text:
        raise GateError("the generated C does not include _mach_layout.h (its _Static_asserts would not run)")
    return c_file


def zig_cc(target: str, *args: str, macos: str = MIN_MACOS) -> list[str]:
    """zig cc for ``target`` at deployment target ``macos`` (zig's default would be its newest)."""
    return [sys.executable, "-m", "ziglang", "cc", "-target", f"{target}.{macos}", *args]


def compile_target(target: str, c_file: Path, out: Path) -> dict:
    """Compile, link (with and without dynamic_lookup) and inspect one target."""
    tdir = out / target
    tdir.mkdir(parents=True, exist_ok=True)
    obj, so = tdir / "_mach.o", tdir / "_mach.so"
    include = sysconfig.get_paths()["include"]
    t0 = time.monotonic()
    r = run(zig_cc(target, "-c", "-O1", "-fPIC", "-Werror=implicit-function-declaration",
                   "-Werror=incompatible-pointer-types", *AVAILABILITY, "-Wno-unused-function", "-I", include,
                   "-I", str(c_file.parent), "-o", str(obj), str(c_file)))
    if r.returncode != 0:
        raise GateError(f"{target}: compile failed:\n{_tail(r.stderr)}")
    r = run(zig_cc(target, "-shared", "-Wl,-undefined,dynamic_lookup", "-o", str(so), str(obj)))
    if r.returncode != 0:
        raise GateError(f"{target}: link failed:\n{_tail(r.stderr)}")
    # The strict link: no dynamic_lookup, so the linker names every symbol libSystem lacks.
    r = run(zig_cc(target, "-shared", "-o", str(tdir / "strict.so"), str(obj)))
    strict = sorted(set(re.findall(r"undefined symbol: (\S+)", r.stderr)))
    other_errors = [ln for ln in r.stderr.splitlines() if "error:" in ln and "undefined symbol" not in ln]
    return {"target": target, "so": str(so), "strict_undefined": strict, "strict_other_errors": other_errors,
            "seconds": round(time.monotonic() - t0, 1)}


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def macho_undefined(path: Path, cputype: int) -> list[str]:
    """Check the Mach-O header of ``path``; return its undefined external symbols."""
    data = path.read_bytes()
    if len(data) < 32:
        raise GateError(f"{path}: too short to be Mach-O")
    magic, cpu, _sub, filetype, ncmds, _sizeofcmds, _flags, _res = struct.unpack_from("<IiiIIIII", data)
    if magic != MH_MAGIC_64:
        raise GateError(f"{path}: not a 64-bit Mach-O file (magic {magic:#x})")
    if cpu != cputype:
        raise GateError(f"{path}: CPU type {cpu:#x}, expected {cputype:#x}")
    if filetype not in (MH_DYLIB, MH_BUNDLE):
        raise GateError(f"{path}: Mach-O file type {filetype}, expected a dylib/bundle")
    off = 32
    symbols: list[str] = []
    for _ in range(ncmds):
        cmd, cmdsize = struct.unpack_from("<II", data, off)
        if cmd == LC_SYMTAB:
            symoff, nsyms, stroff, _strsize = struct.unpack_from("<IIII", data, off + 8)
            for i in range(nsyms):
                n_strx, n_type, _n_sect, _n_desc, _n_value = struct.unpack_from("<IBBhQ", data, symoff + 16 * i)
                if (n_type & N_TYPE) == N_UNDF and n_type & N_EXT:
                    end = data.index(b"\0", stroff + n_strx)
                    symbols.append(data[stroff + n_strx : end].decode())
        off += cmdsize
    return sorted(set(symbols))


def libsystem_exports(zig_dir: Path, tbd_targets: tuple) -> set[str]:
    """Symbols libSystem.tbd exports (or re-exports) for any of ``tbd_targets``.

    A TBD v4 lists exports in blocks ``- targets: [...]`` followed by their
    ``symbols:``/``weak-symbols:``/``thread-local-symbols:``; only the blocks
    naming one of this architecture's targets count.
    """
    text = (zig_dir / "lib" / "libc" / "darwin" / "libSystem.tbd").read_text()
    heads = list(re.finditer(r"^\s*-\s*targets:\s*\[(.*?)\]", text, re.S | re.M))
    names: set[str] = set()
    for i, head in enumerate(heads):
        targets = {t.strip() for t in head.group(1).split(",")}
        if not targets & set(tbd_targets):
            continue
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        body = text[head.end() : end].split("--- !tapi-tbd")[0]
        for block in re.findall(r"(?:symbols|weak-symbols|thread-local-symbols):\s*\[(.*?)\]", body, re.S):
            names.update(tok.strip().strip("'\"") for tok in block.split(","))
    names.discard("")
    return names


def is_python(sym: str) -> bool:
    return sym.startswith("_Py") or sym.startswith("__Py")


def probe_static_assert(out: Path, src: Path, target: str) -> None:
    """The compiler must reject a false _Static_assert next to the real header."""
    probe = out / "static_assert_probe.c"
    probe.write_text('#include "_mach_layout.h"\n_Static_assert(sizeof(mach_msg_header_t) == 25, "probe");\n')
    r = run(zig_cc(target, "-fsyntax-only", "-I", str(src), "-o", str(out / "static_assert_probe.o"), str(probe)))
    if r.returncode == 0 or "probe" not in r.stderr:
        raise GateError("a false _Static_assert compiled: the layout assertions prove nothing")


def probe_availability(out: Path) -> None:
    """The availability errors must be live: an 11.0 API called for 10.15 must fail
    (on x86_64: Apple silicon has no macOS before 11, so zig has no headers for it)."""
    probe = out / "availability_probe.c"
    probe.write_text("#include <libproc.h>\n"
                     "int probe(audit_token_t *t, char *b) { return proc_pidpath_audittoken(t, b, 1024); }\n")
    r = run(zig_cc("x86_64-macos", "-fsyntax-only", *AVAILABILITY, "-o", str(out / "availability_probe.o"), str(probe),
                   macos="10.15"))
    if r.returncode == 0 or "proc_pidpath_audittoken" not in r.stderr:
        raise GateError("an API newer than the deployment target compiled: the minimum-macOS check proves nothing")


def probe_ctypes_layouts(out: Path, root: Path, target: str) -> int:
    """The ctypes structures of policies/_macos.py must match the SDK's (sizes and the
    offsets of every field read): a C file of _Static_asserts generated from them."""
    spec = importlib.util.spec_from_file_location("_macos_probe", root / "policies" / "_macos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # only defines ctypes types; nothing is loaded before first use
    ct, info, vip = mod.ctypes, mod.ProcRegionWithPathInfo, mod.VnodeInfoPath
    base = info.prp_vip.offset
    fields = [(f"prp_prinfo.{f}", getattr(mod.ProcRegionInfo, f)) for f in ("pri_protection", "pri_address", "pri_size")]
    fields += [(f"prp_vip.vip_vi.vi_stat.{f}", getattr(mod.VinfoStat, f)) for f in ("vst_dev", "vst_ino")]
    checks = [(f"sizeof(((struct proc_regionwithpathinfo *)0)->{path})", field.size) for path, field in fields]
    checks += [
        ("sizeof(struct proc_regionwithpathinfo)", ct.sizeof(info)),
        ("sizeof(audit_token_t)", ct.sizeof(mod.AuditToken)),
        ("PROC_PIDREGIONPATHINFO", mod.PROC_PIDREGIONPATHINFO),
        ("VM_PROT_EXECUTE", mod.VM_PROT_EXECUTE),
        ("MAXPATHLEN", mod.MAXPATHLEN),
        ("PROC_PIDPATHINFO_MAXSIZE", mod._PATH_MAX),
    ] + [(f"offsetof(struct proc_regionwithpathinfo, prp_prinfo.{f})", getattr(mod.ProcRegionInfo, f).offset)
         for f in ("pri_protection", "pri_address", "pri_size")] + [
        ("offsetof(struct proc_regionwithpathinfo, prp_vip.vip_vi.vi_stat.vst_dev)", base + vip.vi_stat.offset),
        ("offsetof(struct proc_regionwithpathinfo, prp_vip.vip_vi.vi_stat.vst_ino)",
         base + vip.vi_stat.offset + mod.VinfoStat.vst_ino.offset),
        ("offsetof(struct proc_regionwithpathinfo, prp_vip.vip_path)", base + vip.vip_path.offset),
    ]
    ctype = {ct.c_int: "int", ct.c_uint32: "uint32_t", ct.c_uint64: "uint64_t", ct.c_void_p: "void *",
             ct.POINTER(mod.AuditToken): "audit_token_t *"}
    signatures = [
        f"{ctype[res]} (*const check_{name})({', '.join(ctype[a] for a in args)}) = {name};\n"
        for name, (res, args) in mod.LIBPROC_SIGNATURES.items()
    ]
    probe = out / "ctypes_layout_probe.c"
    probe.write_text("#include <stddef.h>\n#include <stdint.h>\n#include <sys/param.h>\n#include <mach/vm_prot.h>\n"
                     "#include <bsm/audit.h>\n#include <libproc.h>\n#include <sys/proc_info.h>\n"
                     + "".join(f'_Static_assert({c} == {v}, "policies/_macos.py: {c} == {v}");\n' for c, v in checks)
                     + "".join(signatures))
    r = run(zig_cc(target, "-c", "-Werror=incompatible-function-pointer-types", "-Werror=incompatible-pointer-types",
                   *AVAILABILITY, "-o", str(out / f"ctypes_layout_probe_{target}.o"), str(probe)))
    if r.returncode != 0:
        raise GateError(f"{target}: the ctypes layouts of policies/_macos.py disagree with the SDK:\n{_tail(r.stderr)}")
    return len(checks) + len(signatures)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=None,
                    help="directory holding _mach.pyx/.pxd/_mach_layout.h (default: those of an sdist of the tree)")
    ap.add_argument("--root", type=Path, default=ROOT, help="the source tree whose sdist is checked")
    ap.add_argument("--out", type=Path, default=ROOT / ".macos-check")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    zig_dir = ensure_ziglang()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"ok": False, "targets": {}, "failures": [], "min_macos": MIN_MACOS}
    try:
        if args.src is None:
            args.src = sdist_sources(out, args.root.resolve())
            log(f"sources from the sdist: {args.src}")
        c_file = cythonize(args.src.resolve(), out)
        log(f"cythonized {args.src / '_mach.pyx'} with setup.py's directives {setup_directives()} -> {c_file}")
        with concurrent.futures.ThreadPoolExecutor(len(args.targets)) as pool:
            results = list(pool.map(lambda t: compile_target(t, c_file, out), args.targets))
        for res in results:
            target = res["target"]
            cputype, tbd_targets = TARGETS[target]
            exports = libsystem_exports(zig_dir, tbd_targets)
            undefined = macho_undefined(Path(res["so"]), cputype)
            py = [s for s in undefined if is_python(s)]
            system = [s for s in undefined if not is_python(s)]
            missing_tbd = [s for s in system if s not in exports]
            missing_link = [s for s in res["strict_undefined"] if not is_python(s)]
            entry = {
                "mach_o": True,
                "undefined_total": len(undefined),
                "undefined_python": len(py),
                "undefined_libsystem": len(system),
                "libsystem_symbols": system,
                "not_in_libsystem_tbd": missing_tbd,
                "strict_link_unresolved_non_python": missing_link,
                "strict_link_other_errors": res["strict_other_errors"],
                "compile_seconds": res["seconds"],
            }
            report["targets"][target] = entry
            for sym in sorted(set(missing_tbd) | set(missing_link)):
                report["failures"].append(f"{target}: undefined symbol {sym} is neither CPython's nor libSystem's")
            for line in res["strict_other_errors"]:
                report["failures"].append(f"{target}: strict link: {line.strip()}")
            if not system:
                report["failures"].append(f"{target}: no libSystem symbols at all (did the Mach code compile in?)")
            log(f"{target}: Mach-O OK; {len(undefined)} undefined symbols = {len(py)} CPython + "
                f"{len(system)} libSystem ({', '.join(system)}); {res['seconds']} s")
        probe_static_assert(out, args.src.resolve(), args.targets[0])
        probe_availability(out)
        for target in args.targets:
            report["ctypes_asserts"] = probe_ctypes_layouts(out, args.root.resolve(), target)
        log(f"{report['ctypes_asserts']} ctypes layouts and libproc signatures of policies/_macos.py match the SDK")
        log(f"built for macOS {MIN_MACOS} with {' '.join(AVAILABILITY)}; an 11.0 API for 10.15 is rejected")
        report["static_asserts"] = _count_asserts(args.src / "_mach_layout.h")
        log(f"{report['static_asserts']} _Static_asserts on SDK layouts hold; a false one is rejected")
    except GateError as exc:
        report["failures"].append(str(exc))
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["ok"] = not report["failures"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for failure in report["failures"]:
        log(f"FAIL: {failure}")
    log(f"{'PASS' if report['ok'] else 'FAIL'} in {report['seconds']} s (report: {out / 'report.json'})")
    return 0 if report["ok"] else 1


def _count_asserts(header: Path) -> int:
    return len(re.findall(r"^MACHIPC_ASSERT\(", header.read_text(), re.M))


if __name__ == "__main__":
    sys.exit(main())
