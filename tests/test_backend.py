"""The implementation switch: the extension must be built, and the pure twin must match it."""

import os
import subprocess
import sys

import pytest

from machipc import _backend, unix


def test_c_extension_loaded():
    # Fails CI when the Cython extension silently did not build (aiohttp's trick).
    if os.environ.get("MACHIPC_PURE_PYTHON"):
        pytest.skip("MACHIPC_PURE_PYTHON is set: this run checks the pure twin on purpose")
    assert _backend._compiled is not None, "machipc._unix did not build or import"
    assert _backend.DEFAULT is _backend._compiled


def test_pure_python_env_selects_twin():
    out = subprocess.run(
        [sys.executable, "-c", "import machipc._backend as b; print(b.DEFAULT.IMPLEMENTATION)"],
        env={**os.environ, "MACHIPC_PURE_PYTHON": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "py"


def test_transport_impl_names():
    assert _backend.transport("py") is unix
    with pytest.raises(ValueError):
        _backend.transport("rust")


@pytest.mark.skipif(_backend._compiled is None, reason="Cython extension not built")
def test_both_transports_export_the_same_api():
    c = _backend._compiled
    for name in ("Conn", "ServerTransport", "IMPLEMENTATION"):
        assert hasattr(unix, name) and hasattr(c, name), name
    for cls in ("Conn", "ServerTransport"):
        py_methods = {m for m in dir(getattr(unix, cls)) if not m.startswith("_")}
        c_methods = {m for m in dir(getattr(c, cls)) if not m.startswith("_")}
        assert py_methods - {"sock"} <= c_methods | {"sock"}, (cls, py_methods - c_methods)
