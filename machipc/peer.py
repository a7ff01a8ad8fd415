"""``Peer``: who sent a message, as the kernel reported it.

On Linux the transport hands over the kernel's ``SCM_CREDENTIALS`` (pid, uid,
gid) and a pidfd for the sending process (``SCM_PIDFD``, or ``pidfd_open`` on
kernels without it). The pidfd pins the process: a pid can be reused once the
sender exits, a pidfd cannot. Anything read from ``/proc/<pid>`` is trusted
only when the pidfd still refers to a live process *after* the read.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

__all__ = ["Peer", "GUARD_PIDFS", "GUARD_STARTTIME", "GUARD_NONE", "pidfs_available"]

#: The pid-reuse guard is the pidfd's inode on pidfs (unique per process).
GUARD_PIDFS = "pidfs-inode"
#: The guard is the process start time from /proc (kernels without pidfs).
GUARD_STARTTIME = "start-time"
#: No guard could be had (e.g. the sender is already gone).
GUARD_NONE = "none"

_pidfs: Optional[bool] = None


def pidfs_available() -> bool:
    """True when pidfds live on pidfs, so their inode identifies one process.

    Before Linux 6.9 every pidfd shares one anonymous inode; then the process
    start time is the guard instead.
    """
    global _pidfs
    if _pidfs is None:
        try:
            a = os.pidfd_open(os.getpid())
            try:
                b = os.pidfd_open(os.getppid())
                try:
                    _pidfs = os.fstat(a).st_ino != os.fstat(b).st_ino
                finally:
                    os.close(b)
            finally:
                os.close(a)
        except (OSError, AttributeError):
            _pidfs = False
    return _pidfs


def _start_time(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/pid/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19])


class Peer:
    """The process on the other end of a message.

    ``pid``, ``uid`` and ``gid`` come from the kernel and cannot be forged by the
    sender. ``guard`` distinguishes this process from a later one that reuses the
    pid; ``key`` = ``(pid, guard)`` identifies the process for caches.
    """

    __slots__ = ("pid", "uid", "gid", "_pidfd", "guard", "guard_kind", "_exe", "__weakref__")

    def __init__(
        self,
        pid: int,
        uid: int,
        gid: int,
        pidfd: int = -1,
        guard: Optional[int] = None,
        guard_kind: str = GUARD_NONE,
    ) -> None:
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self._pidfd = pidfd
        self.guard = guard
        self.guard_kind = guard_kind
        self._exe: Optional[str] = None

    @classmethod
    def from_pidfd(cls, pid: int, uid: int, gid: int, pidfd: int, inode: int = 0) -> "Peer":
        """Build a Peer around a pidfd it then owns, choosing the best guard."""
        if pidfd >= 0 and pidfs_available():
            if not inode:
                inode = os.fstat(pidfd).st_ino
            return cls(pid, uid, gid, pidfd, inode, GUARD_PIDFS)
        peer = cls(pid, uid, gid, pidfd)
        start = _start_time(pid)
        if start is not None and peer.is_alive():
            peer.guard, peer.guard_kind = start, GUARD_STARTTIME
        return peer

    @property
    def pidfd(self) -> int:
        """The pidfd pinning the sender, or -1 when there is none (owned by this Peer)."""
        return self._pidfd

    @property
    def key(self) -> tuple[int, Optional[int]]:
        """``(pid, guard)``: one running process, never a later one with the same pid."""
        return (self.pid, self.guard)

    def is_alive(self) -> bool:
        """True while the pinned process has not exited (signal 0 through the pidfd)."""
        if self._pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, but we may not signal it (another uid)
        return True

    @property
    def exe(self) -> Optional[str]:
        """The sender's executable path, or None when it cannot be known race-free.

        ``/proc/<pid>/exe`` is read first and trusted only if the pidfd shows the
        same process is still alive afterwards, so a reused pid never lends its
        executable. Unreadable (non-dumpable, other namespace) means None.
        """
        if self._exe is None and sys.platform.startswith("linux"):
            try:
                path = os.readlink(f"/proc/{self.pid}/exe")
            except OSError:
                return None
            if not self.is_alive():
                return None
            self._exe = path
        return self._exe

    def close(self) -> None:
        """Release the pidfd (idempotent)."""
        fd, self._pidfd = self._pidfd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Peer(pid={self.pid}, uid={self.uid}, gid={self.gid}, guard={self.guard_kind})"
