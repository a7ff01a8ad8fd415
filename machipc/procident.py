"""The cgroup, systemd unit and security label of a pinned process (Linux).

:class:`ProcessIdentity` is a base of :class:`machipc.Peer`; it reads
``/proc/PID/cgroup`` and ``/proc/PID/attr/current`` race-free:

1. the file is opened by pid, then the pidfd is asked whether the pinned
   process still lives; if so, the pid named that process at the open, so the
   open file belongs to it (the same argument as for ``Peer.exe``);
2. the file stays open: a procfs file is bound to its process's ``struct
   pid``, not to the number (``get_proc_task`` in fs/proc/base.c), so each
   later ``pread`` at offset 0 reads that very process afresh, and fails with
   ``ESRCH`` once it has exited; a reused pid can never answer.

A re-read costs one ``pread`` (no open, no separate liveness check). A
process can move between cgroups (within a subtree delegated to it) and
change label (exec transitions) without changing pid, so the decision cache
checks them per lookup: the label with a ``pread``, the cgroup with one
``epoll_wait`` of :mod:`machipc.cgroupwatch` while nothing could have moved any
process since it was read, else a ``pread``.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Optional

from . import cgroup as _cg
from . import cgroupwatch as _watch
from . import seclabel

__all__ = ["ProcessIdentity", "NO_LABEL", "UNKNOWN_GONE"]

#: Reason given when an identity attribute is asked of a sender that has exited.
UNKNOWN_GONE = "unknown: the sender exited before its identity could be read"

_LINUX = sys.platform.startswith("linux")
_READ_MAX = 1 << 16

#: The label snapshot on a host where no LSM labels processes (a stable fact, so cacheable).
NO_LABEL = ""

_no_lsm = False  # set once attr/current answered EINVAL: no LSM will appear later


class _Pinned:
    """One ``/proc/PID/NAME`` file open for the pinned process, and what it said last.

    Closed only with its Peer (or when dropped): handler threads may read a
    Peer while the receive thread re-reads it, and closing the fd under them
    could let a read land on a reused fd number.
    """

    __slots__ = ("fd", "raw")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.raw = b""

    def read(self) -> bytes:
        """The file's text now; raises OSError (``ESRCH``: the process exited)."""
        return os.pread(self.fd, _READ_MAX, 0)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    __del__ = close


class ProcessIdentity:
    """Lazily read, cached, race-free ``cgroup``, ``unit`` and ``security_label``.

    Needs ``pid``, ``_pidfd``, ``pin_problem``, ``is_alive()`` and
    ``_unknown(reason)`` from the class it is mixed into. Each attribute is None when it cannot be known for
    this very process; ``unknown_reason`` then says why.
    """

    __slots__ = ("_cgroup_file", "_cgroup", "_cgroup_gen", "_label_file", "_label", "socket_label")

    def _init_identity(self) -> None:
        #: ``SO_PEERSEC`` of the socket this Peer came from (:func:`machipc.peer_of`), or None:
        #: the label of the process that created the other end, as of ``connect()``.
        #: Informational; ``SecurityLabel`` judges the sender's current :attr:`security_label`.
        self.socket_label: Optional[str] = None
        self._cgroup_file: Optional[_Pinned] = None
        self._cgroup: Optional[tuple[str, str]] = None  # (hierarchy, path)
        # (watcher, its generation before the read that gave _cgroup), or None: no watcher
        self._cgroup_gen: Optional[tuple[_watch.Watcher, int]] = None
        self._label_file: Optional[_Pinned] = None
        self._label: Optional[str] = None

    def _close_identity(self) -> None:
        for f in (self._cgroup_file, self._label_file):
            if f is not None:
                f.close()
        self._cgroup_file = self._label_file = None
        self._cgroup_gen = None  # no file, no fast path: the next read says why

    def _open_pinned(self, name: str) -> Optional[_Pinned]:
        if not _LINUX:
            return self._unknown(f"unknown: /proc/PID/{name} does not exist on {sys.platform}")
        if self.pin_problem is not None:  # a pid the sender may have chosen (machipc.peer.claim_problem)
            return self._unknown(self.pin_problem)
        if self._pidfd < 0:
            return self._unknown("unknown: no pidfd pins the sender, so /proc cannot be read race-free")
        try:
            fd = os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if not self.is_alive():
                return self._unknown(UNKNOWN_GONE)
            return self._unknown(f"unknown: cannot open /proc/{self.pid}/{name}: {exc.strerror}")
        if not self.is_alive():
            os.close(fd)
            return self._unknown(UNKNOWN_GONE)
        return _Pinned(fd)

    def _read_pinned(self, attr: str, name: str, passthrough: tuple[int, ...] = ()) -> Optional[bytes]:
        """Read the held file (opening it first); None (reason set) when it cannot be read.

        Errors whose errno is in ``passthrough`` are raised, the file kept.
        """
        f = getattr(self, attr)
        if f is None:
            f = self._open_pinned(name)
            if f is None:
                return None
            setattr(self, attr, f)  # a racing thread's copy is closed when dropped
        try:
            return f.read()
        except OSError as exc:
            if exc.errno in passthrough:
                raise
            # Kept open: it names this process only, and fails alike on every later read.
            if exc.errno == errno.ESRCH:
                return self._unknown(UNKNOWN_GONE)
            return self._unknown(f"unknown: cannot read /proc/{self.pid}/{name}: {exc.strerror}")

    def read_socket_label(self, sock: socket.socket) -> None:
        """Set :attr:`socket_label` from ``SO_PEERSEC`` on ``sock`` (None where no LSM gives one)."""
        try:
            self.socket_label = seclabel.peer_label(sock)
        except OSError:
            self.socket_label = None

    # -- cgroup ------------------------------------------------------------------

    def refresh_cgroup(self) -> Optional[str]:
        """The cgroup path of the pinned process now, or None when unknown.

        Costs one ``epoll_wait`` while nothing could have moved any process since it
        was read (:mod:`machipc.cgroupwatch`), else one ``pread``. It does not
        ask whether the process still lives: what it gives belongs to the
        pinned process, never to a later one with its pid.

        The path is the ``name=systemd`` line on v1/hybrid hosts, else the
        cgroup v2 line, relative to the server's own cgroup namespace (see
        :mod:`machipc.cgroup`).
        """
        watched = self._cgroup_gen  # the per-packet path: nothing moved anybody? (Watcher.unchanged, inlined)
        if watched is not None:
            w = watched[0]
            if w._pending(0):
                w._drain()
            elif w.generation == watched[1] and self._cgroup is not None:
                return self._cgroup[1]
        same = self.running_cgroup()
        if same is not None:
            return same
        w, generation = _watch.watcher(), 0
        if w is not None:
            generation = w.current()  # before the read: a move after it bumps the generation
        raw = self._read_pinned("_cgroup_file", "cgroup")
        if raw is None:
            self._cgroup = self._cgroup_gen = None
            return None
        f = self._cgroup_file
        if raw != f.raw or self._cgroup is None:  # type: ignore[union-attr]
            f.raw = raw  # type: ignore[union-attr]
            self._cgroup = _cg.tracked_path(raw.decode("utf-8", "surrogateescape"))
            if self._cgroup is None:
                self._cgroup_gen = None
                return self._unknown(f"unknown: /proc/{self.pid}/cgroup has neither a name=systemd nor a cgroup v2 line")
        self._cgroup_gen = None if w is None else (w, generation)
        return self._cgroup[1]

    @property
    def cgroup_snapshot(self) -> Optional[str]:
        """The cgroup path read so far, without reading (None: nobody has asked yet, or unknown)."""
        return None if self._cgroup is None else self._cgroup[1]

    def running_cgroup(self) -> Optional[str]:
        """:attr:`cgroup_snapshot` if the process is still in that cgroup, else None.

        One ``epoll_wait`` of the :mod:`machipc.cgroupwatch` watcher when nothing
        could have moved any process since the snapshot was read; otherwise
        one ``pread`` (None also when it fails: the process exited). None when
        nothing was read yet. The snapshot itself is left as it was (see
        :meth:`refresh_cgroup`).
        """
        f = self._cgroup_file
        if f is None or self._cgroup is None:
            return None
        watched = self._cgroup_gen
        if watched is not None:
            w = watched[0]
            if w.unchanged(watched[1]):
                return self._cgroup[1]
            generation = w.current()
        try:
            raw = os.pread(f.fd, _READ_MAX, 0)
        except OSError:
            return None
        if raw != f.raw:
            return None
        if watched is not None:
            self._cgroup_gen = (w, generation) if w.broken is None else None
        return self._cgroup[1]

    @property
    def cgroup(self) -> Optional[str]:
        """The sender's cgroup path (``/system.slice/backup.service``), or None when unknown.

        Read race-free once and kept; the decision cache re-reads it for
        cgroup-based policies (see :meth:`refresh_cgroup`).
        """
        if self._cgroup is None:
            return self.refresh_cgroup()
        return self._cgroup[1]

    @property
    def cgroup_hierarchy(self) -> Optional[str]:
        """Where :attr:`cgroup` was read: ``"name=systemd"`` (v1/hybrid host) or ``""`` (cgroup v2)."""
        if self.cgroup is None:
            return None
        return self._cgroup[0]  # type: ignore[index]

    @property
    def unit(self) -> Optional[str]:
        """The systemd unit the sender runs in, derived from :attr:`cgroup`, or None.

        ``backup.service``, ``session-2.scope``, or for a user's own units
        ``user@1000.service/sync.service`` (see :func:`machipc.cgroup.unit_of`).
        """
        path = self.cgroup
        if path is None:
            return None
        unit = _cg.unit_of(path)
        if unit is None:
            if _cg.outside_namespace(path):
                return self._unknown(f"unknown: cgroup {path!r} is outside the server's cgroup namespace")
            return self._unknown(f"unknown: cgroup {path!r} is not inside a systemd unit")
        return unit

    # -- security label ------------------------------------------------------------

    def refresh_label(self) -> Optional[str]:
        """The LSM label of the pinned process now, :data:`NO_LABEL` when the host has no LSM, or None when unknown."""
        if _no_lsm:
            self._label = NO_LABEL
            return NO_LABEL
        try:
            raw = self._read_pinned("_label_file", "attr/current", (errno.EINVAL,))
        except OSError:  # EINVAL: no LSM provides attr/current (LSMs are not loaded at run time)
            _set_no_lsm()
            self._label = NO_LABEL
            return NO_LABEL
        if raw is None:
            self._label = None
            return None
        f = self._label_file
        if raw != f.raw or self._label is None:  # type: ignore[union-attr]
            f.raw = raw  # type: ignore[union-attr]
            try:
                self._label = seclabel.parse(raw)
            except ValueError as exc:
                self._label = None
                return self._unknown(f"unknown: /proc/{self.pid}/attr/current: {exc}")
        return self._label

    @property
    def security_label(self) -> Optional[str]:
        """The sender's LSM label (``system_u:system_r:backup_t:s0``), or None when unknown or no LSM is active."""
        label = self._label if self._label is not None else self.refresh_label()
        if label == NO_LABEL:
            return self._unknown(seclabel.NO_LSM)
        return label


def _set_no_lsm() -> None:
    global _no_lsm
    _no_lsm = True
