"""``SameDirectory``: the sender's executable lives in a given directory."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Optional

from .base import Decision, Policy

if TYPE_CHECKING:
    from machipc.peer import Peer

__all__ = ["SameDirectory", "own_executable"]

log = logging.getLogger("machipc.policies")

_DELETED = " (deleted)"


def own_executable() -> str:
    """The path of the executable this process runs (the interpreter, for Python)."""
    if sys.platform.startswith("linux"):
        return os.readlink("/proc/self/exe")
    return os.path.realpath(sys.executable)


class SameDirectory(Policy):
    """Allow senders whose executable lies directly in ``directory``.

    ``directory`` defaults to the directory of the server's own executable and
    is resolved (symlinks followed) once, here. The sender's path is the one
    the kernel reports for that very process (``/proc/<pid>/exe`` confirmed by
    the pidfd; ``proc_pidpath_audittoken`` on macOS), which is already free of
    symlinks; it is deliberately *not* resolved again, since a directory the
    sender controls could be swapped for a symlink in between.

    The trap: for a Python program the executable is the interpreter, so
    ``SameDirectory()`` in a Python daemon means "any program in the
    interpreter's directory" (often ``/usr/bin``). Pass the directory of a
    compiled helper instead. ``argv`` and ``/proc/<pid>/cmdline`` are never
    consulted: a process can rewrite them.

    Denies when the executable cannot be known (sender exited, non-dumpable,
    another namespace) and when it was deleted or replaced on disk.
    """

    uses_exe = True

    def __init__(self, directory: Optional[str] = None) -> None:
        if directory is None:
            exe = own_executable()
            directory = os.path.dirname(exe)
            if os.path.basename(exe).startswith(("python", "pypy")):
                log.warning(
                    "SameDirectory() defaults to the directory of this process's executable, the "
                    "Python interpreter %s: every program in %s passes. Pass directory= explicitly.",
                    exe,
                    directory,
                )
        if not os.path.isabs(directory):
            raise ValueError(f"SameDirectory needs an absolute directory, not {directory!r}")
        self.directory = os.path.realpath(directory)

    def check(self, peer: "Peer") -> Decision:
        exe = peer.exe
        if exe is None:
            return Decision.deny(f"pid {peer.pid}: {peer.unknown_reason}; not known to be in {self.directory}")
        if exe.endswith(_DELETED):
            return Decision.deny(f"executable {exe} was deleted or replaced since pid {peer.pid} started")
        if os.path.dirname(exe) == self.directory:
            return Decision.allow(f"executable {exe} is in {self.directory}")
        return Decision.deny(f"executable {exe} is not in {self.directory}")

    def __repr__(self) -> str:
        return f"SameDirectory({self.directory!r})"
