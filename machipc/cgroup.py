"""Control-group paths and the systemd unit names derived from them (Linux).

A process's cgroup is where its service manager put it; an unprivileged
process can only move into cgroups whose ``cgroup.procs`` it may write (on
cgroup v2 also the common ancestor's), i.e. inside a subtree delegated to it.
So the cgroup of ``system.slice/backup.service`` is a boundary a same-uid
process cannot cross, unlike its executable path.

``/proc/PID/cgroup`` (kernel: ``proc_cgroup_show`` in kernel/cgroup/cgroup.c)
has one ``ID:CONTROLLERS:PATH`` line per hierarchy; the cgroup v2 line is
``0::PATH``. Paths are relative to the *reader's* cgroup namespace root; a
process outside it shows a path starting with ``/..``.

Which line is the process's unit: on a v1 ("legacy") or hybrid host systemd
keeps its own ``name=systemd`` hierarchy, and there the ``0::`` line may say
``/`` for everyone (v2 not mounted); so the ``name=systemd`` line wins when
present, else the ``0::`` line (a pure v2 host). The choice is per host (every
process lists the same hierarchies), never per process.

Unit names follow systemd's own derivation (``cg_path_get_unit`` in
src/basic/cgroup-util.c): leading ``*.slice`` components are skipped and the
next component is the unit; anything below it is the unit's own business (a
``Delegate=yes`` service or a container may name sub-cgroups as it likes, so
those names are never read as host units). A user's units live below
``user@UID.service``; they are named ``user@UID.service/NAME.service``, never
bare ``NAME.service``, because the user may create any name there.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = [
    "SYSTEMD_HIERARCHY",
    "V2_HIERARCHY",
    "tracked_path",
    "components",
    "outside_namespace",
    "is_within",
    "unit_of",
    "valid_unit_name",
    "normalize",
    "mount_of",
]

#: The hierarchy systemd tracks units in on v1/hybrid hosts.
SYSTEMD_HIERARCHY = "name=systemd"
#: The cgroup v2 (unified) hierarchy.
V2_HIERARCHY = ""

# systemd's unit name rules (src/basic/unit-name.c): name chars, at most one
# "@" (template instance), a known type suffix, at most 255 bytes.
_UNIT_TYPES = ("service", "socket", "device", "mount", "automount", "swap", "target", "path", "timer", "slice", "scope")
_NAME_CHARS = r"[A-Za-z0-9:_.\\-]"
_UNIT_NAME = re.compile(rf"{_NAME_CHARS}+(?:@{_NAME_CHARS}*)?\.(?:{'|'.join(_UNIT_TYPES)})\Z")
_USER_MANAGER = re.compile(r"user@[0-9]+\.service\Z")
_UNIT_NAME_MAX = 255


def tracked_path(text: str) -> Optional[tuple[str, str]]:
    """``(hierarchy, path)`` of the unit-tracking line of a ``/proc/PID/cgroup`` text.

    ``hierarchy`` is :data:`SYSTEMD_HIERARCHY` or :data:`V2_HIERARCHY`. None
    when neither line is there (a kernel without cgroups, or garbage).
    """
    v2 = None
    for line in text.splitlines():
        ident, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not sep or not sep2 or not path.startswith("/"):
            continue
        if SYSTEMD_HIERARCHY in controllers.split(","):
            return SYSTEMD_HIERARCHY, path
        if ident == "0" and controllers == "":
            v2 = path
    return None if v2 is None else (V2_HIERARCHY, v2)


def components(path: str) -> tuple[str, ...]:
    """The names along a cgroup path: ``"/a/b"`` -> ``("a", "b")``, ``"/"`` -> ``()``."""
    return tuple(p for p in path.split("/") if p)


def outside_namespace(path: str) -> bool:
    """True for a path the kernel shows relative to the reader's cgroup namespace root from outside it (``/..``)."""
    return ".." in components(path)


def normalize(path: str) -> str:
    """A cgroup path given by a person, checked and in canonical form (``/a/b``).

    Raises ValueError for relative paths and ``.``/``..`` components: a
    policy names a place in the server's cgroup namespace, exactly.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"a cgroup path is absolute (starts with '/'), not {path!r}")
    parts = components(path)
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"a cgroup path has no '.' or '..' components: {path!r}")
    return "/" + "/".join(parts)


def is_within(path: str, ancestor: str) -> bool:
    """Whether cgroup ``path`` is ``ancestor`` or below it, by whole components.

    ``/system.slice/backup.service`` is within ``/system.slice`` but
    ``/system.slice-evil`` is not (never a string prefix). A path from outside
    the reader's cgroup namespace is within nothing.
    """
    if outside_namespace(path):
        return False
    want = components(ancestor)
    return components(path)[: len(want)] == want


def _unescape(name: str) -> str:
    # systemd prefixes "_" to names that could clash with kernel files or start
    # with "_" or "." (cg_escape); undo it as cg_unescape does.
    return name[1:] if name.startswith("_") else name


def valid_unit_name(name: str) -> bool:
    """Whether ``name`` is a syntactically valid systemd unit name (``foo.service``, ``a@b.scope``)."""
    return len(name) <= _UNIT_NAME_MAX and _UNIT_NAME.match(name) is not None


def _first_unit(parts: tuple[str, ...]) -> Optional[tuple[int, str]]:
    """Index and name of the first non-slice unit after leading slices, as systemd derives it."""
    for i, raw in enumerate(parts):
        name = _unescape(raw)
        if not valid_unit_name(name):
            return None  # not a systemd-shaped path (or a directory someone made by hand)
        if not name.endswith(".slice"):
            return i, name
    return None


def unit_of(path: str) -> Optional[str]:
    """The systemd unit of a process in cgroup ``path``, or None when it is in none.

    ``/system.slice/backup.service`` -> ``backup.service``;
    ``/user.slice/user-1000.slice/session-2.scope`` -> ``session-2.scope``;
    ``/user.slice/user-1000.slice/user@1000.service/app.slice/sync.service`` ->
    ``user@1000.service/sync.service``; ``/`` (a kernel thread, or no systemd),
    a bare slice, and paths outside the reader's cgroup namespace -> None.
    """
    if outside_namespace(path):
        return None
    parts = components(path)
    found = _first_unit(parts)
    if found is None:
        return None
    i, unit = found
    if _USER_MANAGER.match(unit):
        inner = _first_unit(parts[i + 1 :])
        if inner is not None:
            return f"{unit}/{inner[1]}"
    return unit


def mount_of(hierarchy: str, mountinfo: str = "/proc/self/mountinfo") -> Optional[str]:
    """Where the whole of ``hierarchy`` (:data:`SYSTEMD_HIERARCHY` or :data:`V2_HIERARCHY`) is mounted, or None.

    Only a mount of the hierarchy's root counts (``/`` in mountinfo's root
    field), not a bind mount of a subtree.
    """
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, rest = pre.split(), post.split()
        if len(fields) < 5 or len(rest) < 3 or fields[3] != "/":
            continue
        fstype, options = rest[0], rest[2].split(",")
        if hierarchy == V2_HIERARCHY and fstype == "cgroup2":
            return fields[4]
        if hierarchy == SYSTEMD_HIERARCHY and fstype == "cgroup" and SYSTEMD_HIERARCHY in options:
            return fields[4]
    return None
