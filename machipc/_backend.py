"""Chooses the transport implementation: the one place MACHIPC_PURE_PYTHON is read.

``MACHIPC_PURE_PYTHON=1`` selects the pure-Python twin; otherwise the Cython
extension is used when it imports, and the pure twin when it does not.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Optional

from . import unix as _pure
from .errors import InvalidArgument

_PURE_REQUESTED = os.environ.get("MACHIPC_PURE_PYTHON", "") not in ("", "0")

try:
    from . import _unix as _compiled  # type: ignore[attr-defined]
except ImportError:  # not built (pure install, or an unsupported platform)
    _compiled = None

DEFAULT: ModuleType = _pure if _PURE_REQUESTED or _compiled is None else _compiled
#: True when the Linux transport in use is the pure-Python twin: requested with
#: MACHIPC_PURE_PYTHON=1, or because the Cython extension is not built or did not import.
#: Always False on macOS, whose Mach transport (machipc._mach) has no pure twin.
PURE_PYTHON = sys.platform != "darwin" and DEFAULT is _pure


def transport(impl: Optional[str] = None) -> ModuleType:
    """The transport module for ``impl``: ``"c"``, ``"py"``, or None for the default."""
    if impl is None:
        return DEFAULT
    if impl == "py":
        return _pure
    if impl == "c":
        if _compiled is None:
            raise ImportError("machipc._unix (the Cython transport) is not built")
        return _compiled
    raise InvalidArgument(f"impl must be 'c', 'py' or None, not {impl!r}")
