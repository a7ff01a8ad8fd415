"""``DecisionCache``: one policy decision per sending process.

A daemon sees many messages from few processes, and some policies are slow
(``codesign`` runs a program). The cache remembers each decision under the
process's identity, so the policy runs once per sender process and a repeat
costs one dictionary lookup.

The key is ``(pid, guard, uid, gid)``: the guard (pidfs inode, start time, or
macOS pidversion) keeps a later process with a reused pid from inheriting a
decision, and uid/gid are in it because a process can change credentials
(``setuid()``, a set-uid exec) without changing pid. For exe-based policies
the executable's ``(dev, inode)``, read afresh and race-free on every lookup,
joins the key: on Linux ``execve()`` keeps the pid and the pidfd, and a
decision about the old program must not be reused for the new one. Likewise
the cgroup path (for policies that look at the cgroup or systemd unit; one
``epoll_wait`` of :mod:`machipc.cgroupwatch`, or a ``pread`` of a held
``/proc/PID/cgroup``) and the LSM label: a process can
move within a delegated cgroup subtree, or change label, without exec.

Entries of processes that have exited are dropped lazily: when the cache is
full, and at most every ``sweep_interval`` seconds when something is added.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Optional

from machipc.peer import process_alive

from .base import Decision, PolicyLike, as_policy, evaluate, is_exe_based, uses_cgroup, uses_label

if TYPE_CHECKING:
    from machipc.peer import Peer

__all__ = ["DecisionCache"]

# Elsewhere there are no cgroups or /proc labels: policies naming them deny, always alike.
_LINUX = sys.platform.startswith("linux")


class DecisionCache:
    """Evaluate ``policy`` at most once per sending process (see the module doc)."""

    def __init__(self, policy: PolicyLike, maxsize: int = 4096, sweep_interval: float = 60.0) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        self.policy = as_policy(policy)
        #: True when the policy looks at the executable (the key then includes it).
        self.exe_based = is_exe_based(self.policy)
        #: True when the policy looks at the cgroup / systemd unit (the key then includes the cgroup path).
        self.cgroup_based = _LINUX and uses_cgroup(self.policy)
        #: True when the policy looks at the LSM label (the key then includes it).
        self.label_based = _LINUX and uses_label(self.policy)
        #: True when a decision can change while pid, pidfd and credentials stay (re-ask per packet).
        self.volatile = self.exe_based or self.cgroup_based or self.label_based
        self.maxsize = maxsize
        self.sweep_interval = sweep_interval
        self.evaluations = 0  #: how many times the policy itself ran
        self._entries: dict[tuple, tuple[Decision, str]] = {}
        self._last_sweep = time.monotonic()

    def decide(self, peer: "Peer", exe_id: Optional[tuple[int, int]] = None, cgroup: Optional[str] = None) -> Decision:
        """The policy's decision for ``peer``, from the cache when this process was seen.

        ``exe_id``, ``cgroup``: the executable identity and cgroup path the
        caller has just read and found equal to ``peer``'s snapshots (saves
        reading them a second time).
        """
        guard = peer.guard
        if guard is None:  # nothing pins the process: its identity cannot key a cache
            return self._evaluate(peer)
        if self.volatile:
            now = self._read(peer, exe_id, cgroup)
            if now is None:  # gone or unreadable: the policy says why; not cached
                return self._evaluate(peer)
            key: tuple = (peer.pid, guard, peer.uid, peer.gid, now)
        else:
            key = (peer.pid, guard, peer.uid, peer.gid)
        entry = self._entries.get(key)
        if entry is not None:
            return entry[0]
        decision = self._evaluate(peer)
        if self.volatile and self._held(peer) != key[4]:
            return decision  # the snapshot changed under the policy: do not remember it
        self._store(key, decision, peer.guard_kind)
        return decision

    def _read(self, peer: "Peer", exe_id: Optional[tuple[int, int]] = None, cgroup: Optional[str] = None) -> Optional[tuple]:
        """The attributes the policy looks at, read afresh (None when one cannot be known)."""
        label = None
        if not self.exe_based:
            exe_id = None
        elif exe_id is None and (exe_id := peer.refresh_exe()) is None:
            return None
        if not self.cgroup_based:
            cgroup = None
        elif cgroup is None and (cgroup := peer.refresh_cgroup()) is None:
            return None
        if self.label_based and (label := peer.refresh_label()) is None:
            return None
        return (exe_id, cgroup, label)

    def _held(self, peer: "Peer") -> tuple:
        """The same attributes as the Peer holds them now (after the policy ran), without reading."""
        return (
            peer._exe_id if self.exe_based else None,
            peer._cgroup[1] if self.cgroup_based and peer._cgroup is not None else None,
            peer._label if self.label_based else None,
        )

    __call__ = decide

    def _evaluate(self, peer: "Peer") -> Decision:
        self.evaluations += 1
        return evaluate(self.policy, peer)

    def _store(self, key: tuple, decision: Decision, guard_kind: str) -> None:
        now = time.monotonic()
        if len(self._entries) >= self.maxsize or now - self._last_sweep >= self.sweep_interval:
            self.sweep()
            if len(self._entries) >= self.maxsize:
                # Every process is still alive: forget the older half.
                for old in list(self._entries)[: max(1, self.maxsize // 2)]:
                    self._entries.pop(old, None)
        self._entries[key] = (decision, guard_kind)

    def sweep(self) -> int:
        """Drop the entries of processes that have exited; return how many were dropped."""
        self._last_sweep = time.monotonic()
        dropped = 0
        for key, (_decision, guard_kind) in list(self._entries.items()):
            if not process_alive(key[0], key[1], guard_kind):
                if self._entries.pop(key, None) is not None:
                    dropped += 1
        return dropped

    def forget(self, peer: "Peer") -> None:
        """Drop every entry of ``peer``'s process (e.g. after its connection closed)."""
        for key in [k for k in self._entries if k[0] == peer.pid and k[1] == peer.guard]:
            self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer: object) -> bool:
        pid, guard = getattr(peer, "pid", None), getattr(peer, "guard", None)
        return any(k[0] == pid and k[1] == guard for k in self._entries)

    def __repr__(self) -> str:
        return f"DecisionCache({self.policy!r}, {len(self)} processes)"

