"""Notice cgroup moves without re-reading ``/proc/PID/cgroup`` for every packet (Linux).

Re-reading a held ``/proc/PID/cgroup`` costs a few µs, most of it the kernel
rendering one line per hierarchy. A process changes cgroup only when someone
writes its pid into a ``cgroup.procs``, ``cgroup.threads`` or (v1) ``tasks``
file, or renames a v1 cgroup directory; moving into a cgroup that does not
exist yet needs a ``mkdir`` first. :class:`Watcher` keeps an inotify watch on
every directory of the hierarchy units are read from, so each such write,
rename or mkdir queues an event, and counts them in a *generation*.

Why that is sound: ``vfs_write()`` queues the ``IN_MODIFY`` event
(``fsnotify_modify``, fs/read_write.c) before the write returns, so a process
that moved itself and then sent a packet has the event queued before the
packet exists (``writev``, ``pwrite``, ``splice`` and io_uring writes notify
the same way); the server checks the queue (``epoll_wait``, timeout 0) after
receiving it. A
snapshot taken at generation G is reused only while the queue is empty and
the generation is still G; draining bumps the generation before reading
events and again after watching new directories, so a write into a directory
not yet watched is always followed by a bump. A move done by a third process
races with the sender's packet whatever the server does.

The watcher is used only where it can see every move: the server is in the
initial cgroup namespace (``PROC_CGROUP_INIT_INO``), the hierarchy's root is
mounted, and every watch could be added. Otherwise (and after any failure
later) callers fall back to re-reading the file.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import struct
import sys
import threading
from typing import Optional

from . import cgroup as _cg

__all__ = ["Watcher", "watcher"]

log = logging.getLogger("machipc")

# <linux/inotify.h>
IN_MODIFY, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE = 0x2, 0x40, 0x80, 0x100
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR, IN_ONLYDIR = 0x4000, 0x8000, 0x40000000, 0x01000000
_MASK = IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_ONLYDIR
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len
_INIT_CGROUP_NS = 0xEFFFFFFB  # PROC_CGROUP_INIT_INO, include/linux/proc_ns.h


class Watcher:
    """Inotify watches on every directory below ``root``; :attr:`generation` counts what they saw."""

    def __init__(self, root: str) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        self.fd = fd
        self.root = root
        self.generation = 0
        #: Why the watcher can no longer see every move (None while it can).
        self.broken: Optional[str] = None
        self._lock = threading.Lock()
        # pending(0): non-empty when events are queued. epoll_wait(0) only looks at the
        # ready list, which the event's wake-up filled before the mover's write returned.
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)
        self._pending = self._epoll.poll
        self._paths: dict[int, str] = {}  # watch descriptor -> directory
        self._watch_tree(root)

    def _watch_tree(self, top: str) -> None:
        for dirpath, _dirs, _files in os.walk(top, onerror=self._unlisted):
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(dirpath), _MASK)
            if wd < 0:
                err = ctypes.get_errno()
                if err == errno.ENOENT:
                    continue  # removed meanwhile: an empty cgroup, nobody to move
                self._break(f"cannot watch {dirpath}: {os.strerror(err)}")
                return
            self._paths[wd] = dirpath

    def _unlisted(self, exc: OSError) -> None:
        # A directory we cannot list (its owner made it 0700) hides the ones below it.
        if exc.errno != errno.ENOENT:
            self._break(f"cannot list {exc.filename}: {exc.strerror}")

    def _break(self, why: str) -> None:
        """Stop vouching: every later check says "maybe moved", so holders re-read the file."""
        if self.broken is None:
            self.broken = why
            self._pending = _always
            log.info("cgroup moves are checked by re-reading /proc/PID/cgroup: %s", why)

    def current(self) -> int:
        """The generation now (after taking in every queued event): take it *before* reading a cgroup."""
        if self._pending(0):
            self._drain()
        return self.generation

    def unchanged(self, generation: int) -> bool:
        """True when nothing that could move a process happened since ``generation`` was current.

        A watcher that broke bumped its generation on the way, and callers take
        no new generation from a broken one (:func:`watcher`, :attr:`broken`).
        """
        if self._pending(0):
            self._drain()
            return False
        return self.generation == generation

    def disown(self, why: str) -> None:
        """Stop vouching for anything, and let go of the inotify queue (a forked child shares it)."""
        self._break(why)
        self._epoll.close()
        try:
            os.close(self.fd)
        except OSError:
            pass

    def _drain(self) -> None:
        if self.broken is not None:
            return  # nothing is watched reliably any more: the generation stays as it is
        with self._lock:
            self.generation += 1  # before reading: a concurrent unchanged() that finds the queue empty sees it
            new_dirs: list[str] = []
            while True:
                try:
                    data = os.read(self.fd, 65536)
                except BlockingIOError:
                    break
                offset = 0
                while offset < len(data):
                    wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
                    name = data[offset + _EVENT.size : offset + _EVENT.size + size].rstrip(b"\0")
                    offset += _EVENT.size + size
                    if mask & IN_Q_OVERFLOW:
                        new_dirs.append(self.root)  # events were lost, mkdirs among them: watch all again
                    elif mask & IN_IGNORED:
                        self._paths.pop(wd, None)  # the directory is gone
                    elif mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) and wd in self._paths:
                        new_dirs.append(os.path.join(self._paths[wd], os.fsdecode(name)))
            for top in new_dirs:  # existing watches are reused; renamed ones get their new path
                self._watch_tree(top)
            self.generation += 1  # after the new watches: a write they missed came before this


def _always(_timeout: int) -> list:
    return [True]


_watcher: Optional[Watcher] = None
_watcher_tried = False
_watcher_lock = threading.Lock()


def _forked() -> None:
    # Parent and child would share one inotify queue: an event one of them drains, the
    # other never sees. The child's inherited watcher stops vouching; it makes its own.
    global _watcher, _watcher_tried, _watcher_lock
    if _watcher is not None:
        _watcher.disown("inherited across fork()")
    _watcher, _watcher_tried, _watcher_lock = None, False, threading.Lock()


os.register_at_fork(after_in_child=_forked)


def watcher() -> Optional[Watcher]:
    """The process-wide :class:`Watcher` for the hierarchy units are read from, or None where it cannot see every move."""
    global _watcher, _watcher_tried
    if _watcher_tried:
        return _watcher if _watcher is None or _watcher.broken is None else None
    with _watcher_lock:
        if not _watcher_tried:
            _watcher = _make()
            _watcher_tried = True
    return _watcher


def _make() -> Optional[Watcher]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        if os.stat("/proc/self/ns/cgroup").st_ino != _INIT_CGROUP_NS:
            return None  # paths and mounts are a subtree: moves outside it would go unseen
        with open("/proc/self/cgroup") as f:
            tracked = _cg.tracked_path(f.read())
        if tracked is None:
            return None
        mountpoint = _cg.mount_of(tracked[0])
        if mountpoint is None:
            return None
        w = Watcher(mountpoint)
    except OSError as exc:
        log.info("cgroup moves are checked by re-reading /proc/PID/cgroup: %s", exc)
        return None
    return w if w.broken is None else None
