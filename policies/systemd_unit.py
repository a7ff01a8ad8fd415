"""``SystemdUnit`` and ``Cgroup``: trust a sender by where its service manager put it (Linux).

A process's cgroup is a boundary a same-uid process cannot cross: moving into
a cgroup needs write access to its ``cgroup.procs`` (owned by root for system
units), so only a subtree delegated to the process is reachable. See
:mod:`machipc.cgroup` for how paths are read and unit names derived, and
docs/policies.md for what this is worth in containers and on v1/hybrid hosts.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from machipc import cgroup as _cg

from .base import Decision, Policy

if TYPE_CHECKING:
    from machipc.peer import Peer

__all__ = ["SystemdUnit", "Cgroup"]

_INSTANCE = r"[A-Za-z0-9:_.\\-]+"  # what "*" stands for: one template instance, never "/" or "@"


def _check_unit(name: str) -> str:
    """One ``SystemdUnit`` name, validated; returns it."""
    if not isinstance(name, str):
        raise ValueError(f"a unit name is a string, not {name!r}")
    parts = name.split("/")
    if len(parts) > 2 or (len(parts) == 2 and not re.fullmatch(r"user@([0-9]+|\*)\.service", parts[0])):
        raise ValueError(f"a unit name is NAME.TYPE, or user@UID.service/NAME.TYPE for a user's unit, not {name!r}")
    for part in parts:
        if part.count("*") > 1 or ("*" in part and "@*." not in part):
            raise ValueError(
                f"{name!r}: '*' may only stand for a whole template instance (NAME@*.TYPE); other globs are ambiguous"
            )
        if not _cg.valid_unit_name(part.replace("@*.", "@x.")):
            raise ValueError(f"{part!r} is not a valid systemd unit name (NAME.service, NAME.scope, ...)")
        if part.endswith(".slice"):
            raise ValueError(
                f"{part!r} is a slice, not a unit that runs processes; to allow every unit below it use Cgroup with "
                f"the slice's path (e.g. Cgroup('/system.slice'))"
            )
    return name


def _pattern(name: str) -> "re.Pattern[str]":
    return re.compile("".join(_INSTANCE if c == "*" else re.escape(c) for c in name) + r"\Z")


class SystemdUnit(Policy):
    """Allow senders running in one of the named systemd units.

    ``SystemdUnit("backup.service")``: processes systemd started for
    ``backup.service`` (and sub-cgroups it delegated itself). A user's own
    units are named with their manager: ``"user@1000.service/sync.service"``.
    A template's instances may be allowed with ``"backup@*.service"`` (``*``
    is exactly one instance name, nothing else; no other glob is accepted).
    Names are compared exactly with ``Peer.unit``; a sender whose unit cannot
    be known (no cgroup, not in a unit, outside the server's cgroup
    namespace, exited) is denied with the reason.
    """

    uses_exe = uses_label = False
    uses_cgroup = True

    def __init__(self, *names: str) -> None:
        if not names:
            raise ValueError("SystemdUnit needs at least one unit name")
        self.names = tuple(_check_unit(n) for n in names)
        self._exact = frozenset(n for n in self.names if "*" not in n)
        self._globs = tuple(_pattern(n) for n in self.names if "*" in n)

    def check(self, peer: "Peer") -> Decision:
        unit = peer.unit
        if unit is None:
            return Decision.unknown(f"pid {peer.pid}: {peer.unknown_reason}; not known to run in {self._show()}")
        if unit in self._exact or any(p.match(unit) for p in self._globs):
            return Decision.allow(f"unit {unit!r} allowed")
        return Decision.deny(f"unit {unit!r} is not {self._show()}")

    def _show(self) -> str:
        return " or ".join(self.names)

    def __repr__(self) -> str:
        return f"SystemdUnit({', '.join(map(repr, self.names))})"


class Cgroup(Policy):
    """Allow senders whose cgroup is one of ``paths`` or below it.

    ``Cgroup("/system.slice")`` allows every system service; paths are
    matched by whole components (``/system.slice-x`` is not below
    ``/system.slice``) in the server's own cgroup namespace. A sender outside
    that namespace, or whose cgroup cannot be read, is denied with the reason.
    """

    uses_exe = uses_label = False
    uses_cgroup = True

    def __init__(self, *paths: str) -> None:
        if not paths:
            raise ValueError("Cgroup needs at least one path")
        self.paths = tuple(_cg.normalize(p) for p in paths)

    def check(self, peer: "Peer") -> Decision:
        path = peer.cgroup
        if path is None:
            return Decision.unknown(f"pid {peer.pid}: {peer.unknown_reason}; not known to be in {self._show()}")
        if _cg.outside_namespace(path):
            return Decision.deny(f"cgroup {path!r} is outside the server's cgroup namespace")
        for allowed in self.paths:
            if _cg.is_within(path, allowed):
                return Decision.allow(f"cgroup {path!r} is within {allowed}")
        return Decision.deny(f"cgroup {path!r} is not within {self._show()}")

    def _show(self) -> str:
        return " or ".join(self.paths)

    def __repr__(self) -> str:
        return f"Cgroup({', '.join(map(repr, self.paths))})"
