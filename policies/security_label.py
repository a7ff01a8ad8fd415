"""``SecurityLabel``: trust a sender by its LSM label (SELinux, AppArmor, Smack; Linux)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from machipc import seclabel

from .base import Decision, Policy

if TYPE_CHECKING:
    from machipc.peer import Peer

__all__ = ["SecurityLabel"]


class SecurityLabel(Policy):
    """Allow senders whose security label is exactly one of ``labels``.

    The label is the pinned process's ``/proc/PID/attr/current`` (see
    :mod:`machipc.seclabel`), compared as the kernel spells it:
    ``"system_u:system_r:backup_t:s0"``, ``"/usr/bin/backup (enforce)"``.
    Where no LSM labels processes, every sender is denied with that reason.
    """

    uses_exe = uses_cgroup = False
    uses_label = True

    def __init__(self, *labels: str) -> None:
        if not labels:
            raise ValueError("SecurityLabel needs at least one label")
        self.labels = frozenset(seclabel.check(label) for label in labels)

    def check(self, peer: "Peer") -> Decision:
        label = peer.security_label
        if label is None:
            return Decision.unknown(f"pid {peer.pid}: {peer.unknown_reason}; its label is not known to be allowed")
        if label in self.labels:
            return Decision.allow(f"security label {label!r} allowed")
        return Decision.deny(f"security label {label!r} is not one of {sorted(self.labels)}")

    def __repr__(self) -> str:
        return f"SecurityLabel({', '.join(map(repr, sorted(self.labels)))})"
