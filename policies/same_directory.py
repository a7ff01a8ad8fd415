"""``SameDirectory``: the sender's executable lives in a given directory."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Optional

from machipc._printable import printable

from .base import Decision, Policy

if TYPE_CHECKING:
    from machipc.peer import Peer

__all__ = ["SameDirectory", "own_executable", "same_file_problem"]

log = logging.getLogger("machipc.policies")

_DELETED = " (deleted)"


def own_executable() -> str:
    """The path of the executable this process runs (the interpreter, for Python)."""
    if sys.platform.startswith("linux"):
        return os.readlink("/proc/self/exe")
    return os.path.realpath(sys.executable)


def same_file_problem(path: str, ident: tuple[int, int]) -> Optional[str]:
    """None when ``path``, looked up in the server's own mount namespace, is the running file ``ident``.

    ``ident`` is ``(st_dev, st_ino)`` of the file the process runs (read through
    its pinned ``/proc/<pid>/exe``). The path the kernel reports for it is
    relative to the *process's* mount namespace: inside ``unshare -Urm`` a
    tmpfs mounted over a trusted directory makes any file read as a trusted
    path. Comparing the file itself with what the path names here catches it.
    Returns the reason for a denial otherwise.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        return (
            f"executable {printable(path)} does not exist in the server's mount namespace ({exc.strerror}): "
            "the sender runs it from a mount the server cannot see"
        )
    if (st.st_dev, st.st_ino) != tuple(ident):
        return (
            f"the running executable (dev {ident[0]}, inode {ident[1]}) is not the file {printable(path)} "
            f"names in the server's mount namespace (dev {st.st_dev}, inode {st.st_ino}): another mount "
            "namespace shows a different file at that path"
        )
    return None


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

    The running file must also *be* the file its path names in the server's
    mount namespace (same ``st_dev``/``st_ino``, see :func:`same_file_problem`),
    so a private mount over the directory does not pass.

    Unknown (denies) when the executable cannot be known (sender exited,
    non-dumpable, unpinned); denies when it was deleted or replaced on disk.
    """

    uses_exe = True
    uses_cgroup = uses_label = False

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
        exe, ident = peer.exe, peer.exe_id
        if exe is None or ident is None:
            return Decision.unknown(f"pid {peer.pid}: {peer.unknown_reason}; not known to be in {printable(self.directory)}")
        shown = printable(exe)
        if exe.endswith(_DELETED):
            return Decision.deny(f"executable {shown} was deleted or replaced since pid {peer.pid} started")
        if os.path.dirname(exe) != self.directory:
            return Decision.deny(f"executable {shown} is not in {printable(self.directory)}")
        mismatch = same_file_problem(exe, ident)
        if mismatch is not None:
            return Decision.deny(mismatch)
        return Decision.allow(f"executable {shown} is in {printable(self.directory)}")

    def __repr__(self) -> str:
        return f"SameDirectory({self.directory!r})"
