"""Builds machipc's Cython extensions (the metadata lives in pyproject.toml).

``MACHIPC_PURE_PYTHON=1`` at build time skips the extensions; the package then
runs on its pure-Python twins. The build prints which kind it made.
"""

import os
import sys

from setuptools import Extension, setup

PURE = os.environ.get("MACHIPC_PURE_PYTHON", "") not in ("", "0")


def extensions():
    if PURE:
        return []
    from Cython.Build import cythonize

    exts = []
    if sys.platform.startswith("linux"):
        exts.append(Extension("machipc._unix", ["machipc/_unix.pyx"]))
        exts.append(Extension("machipc._message", ["machipc/_message.pyx"]))
    if sys.platform == "darwin" and os.path.exists("machipc/_mach.pyx"):
        exts.append(Extension("machipc._mach", ["machipc/_mach.pyx"]))
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )


ext_modules = extensions()
print(f"machipc: building {'Accelerated (' + ', '.join(e.name for e in ext_modules) + ')' if ext_modules else 'Pure'}")
setup(ext_modules=ext_modules)
