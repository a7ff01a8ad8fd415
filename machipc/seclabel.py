"""LSM security labels (SELinux, AppArmor, Smack) of processes and socket peers (Linux).

The kernel gives a process's label in ``/proc/PID/attr/current``
(``proc_pid_attr_read`` -> ``security_getprocattr``; ``EINVAL`` when no LSM
provides one) and a socket peer's label as of ``connect()`` with
``getsockopt(SO_PEERSEC)`` (``ENOPROTOOPT`` without such an LSM). A process
gets a label only as the LSM policy allows (SELinux: transitions, usually on
exec of an entrypoint; Smack: ``CAP_MAC_ADMIN``), but AppArmor lets an
unconfined process enter any loaded profile, so what a label proves depends
on the LSM and its policy (docs/policies.md).

Labels look like ``system_u:system_r:backup_t:s0`` (SELinux),
``/usr/bin/backup (enforce)`` or ``unconfined`` (AppArmor; the mode is part
of the label, so a profile in complain mode is not the enforced one) and
``backup`` (Smack).
"""

from __future__ import annotations

import errno
import socket
from typing import Optional

__all__ = ["parse", "check", "peer_label", "SO_PEERSEC", "NO_LSM"]

SO_PEERSEC = getattr(socket, "SO_PEERSEC", 31)  # <asm-generic/socket.h>
_LABEL_MAX = 4096

#: Reason given when the host has no LSM that labels processes.
NO_LSM = "unknown: no security module (SELinux, AppArmor, Smack) labels processes on this host"


def parse(raw: bytes) -> str:
    """The label in the bytes the kernel gave: trailing NULs and newlines dropped.

    SELinux ends it with a NUL, AppArmor with a newline. Raises ValueError for
    an empty label or one that is not UTF-8 (labels are admin-chosen ASCII).
    """
    text = raw.rstrip(b"\0\n")
    if not text:
        raise ValueError("empty security label")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"security label is not UTF-8: {text[:80]!r}") from None


def check(label: str) -> str:
    """A label given by a person, as a policy will compare it; raises ValueError if it cannot match."""
    if not isinstance(label, str) or not label:
        raise ValueError(f"a security label is a non-empty string, not {label!r}")
    if label != label.strip() or "\0" in label or "\n" in label:
        raise ValueError(f"a security label has no surrounding blanks, NULs or newlines: {label!r}")
    return label


def peer_label(sock: socket.socket) -> Optional[str]:
    """The peer's label as of ``connect()`` (``SO_PEERSEC``), or None when no LSM gives one.

    Raises OSError for other failures (e.g. ``ENOTCONN``).
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERSEC, _LABEL_MAX)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return None
        raise
    try:
        return parse(raw)
    except ValueError:
        return None
