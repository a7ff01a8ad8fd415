"""fork() detection for objects that own connections (Client, Server).

A child made by ``fork()`` inherits its parent's sockets: the same kernel
connection, read and written by two processes, so each could read the other's
replies. ``os.register_at_fork`` bumps :data:`generation` in every child, so an
object compares one integer per call to learn that it now lives in a child
(cheaper than ``os.getpid()``, a system call).
"""

from __future__ import annotations

import os

__all__ = ["generation"]

#: How many fork()s lie between the first import and this process (0 in the original).
generation = 0


def _in_child() -> None:
    global generation
    generation += 1


os.register_at_fork(after_in_child=_in_child)
