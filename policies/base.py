"""The policy protocol: ``policy(peer) -> Decision``.

A policy is any callable taking a :class:`machipc.Peer` and returning a
:class:`Decision`. Subclassing :class:`Policy` adds the ``&``, ``|`` and ``~``
operators. Policies must fail closed: when they cannot tell, they deny, and
their reason says why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:
    from machipc.peer import Peer

__all__ = [
    "Decision",
    "Policy",
    "PolicyLike",
    "evaluate",
    "SameUser",
    "AllowAll",
    "AllOf",
    "AnyOf",
    "Not",
    "as_policy",
    "is_exe_based",
    "uses_cgroup",
    "uses_label",
]

log = logging.getLogger("machipc.policies")


@dataclass(frozen=True)
class Decision:
    """A policy's verdict on one sender, with a reason a person can read in a log."""

    allowed: bool
    reason: str

    @classmethod
    def allow(cls, reason: str) -> "Decision":
        return cls(True, reason)

    @classmethod
    def deny(cls, reason: str) -> "Decision":
        return cls(False, reason)

    def __bool__(self) -> bool:
        return self.allowed


class Policy:
    """Base class for policies; subclasses implement ``check``.

    ``uses_exe`` is True for policies that look at the sender's executable
    (path, digest, code signature). On Linux a process keeps its pid and pidfd
    across ``execve()``, so a cached decision of such a policy is only reused
    while the process still runs the same file (see ``DecisionCache``).
    ``uses_cgroup`` and ``uses_label`` say the same of the cgroup (and the
    systemd unit derived from it) and of the LSM label: a process can move
    between cgroups and change label without changing pid.
    """

    uses_exe = False
    uses_cgroup = False
    uses_label = False

    def check(self, peer: "Peer") -> Decision:
        raise NotImplementedError

    def __call__(self, peer: "Peer") -> Decision:
        return self.check(peer)

    def __and__(self, other: "PolicyLike") -> "AllOf":
        return AllOf(self, other)

    def __or__(self, other: "PolicyLike") -> "AnyOf":
        return AnyOf(self, other)

    def __invert__(self) -> "Not":
        return Not(self)


PolicyLike = Union[Policy, Callable[["Peer"], Decision]]


def as_policy(p: PolicyLike) -> PolicyLike:
    """Check that ``p`` can be used as a policy and return it."""
    if not callable(p):
        raise TypeError(f"a policy must be callable as policy(peer) -> Decision, not {type(p).__name__}")
    return p


def is_exe_based(policy: PolicyLike) -> bool:
    """Whether ``policy``'s decision can change when the sender execs another program.

    A plain callable might look at anything, so it counts as exe-based.
    """
    return bool(getattr(policy, "uses_exe", True))


def uses_cgroup(policy: PolicyLike) -> bool:
    """Whether ``policy``'s decision can change when the sender moves to another cgroup (a plain callable: yes)."""
    return bool(getattr(policy, "uses_cgroup", True))


def uses_label(policy: PolicyLike) -> bool:
    """Whether ``policy``'s decision can change with the sender's LSM label (a plain callable: yes)."""
    return bool(getattr(policy, "uses_label", True))


def evaluate(policy: PolicyLike, peer: "Peer") -> Decision:
    """Ask ``policy`` about ``peer``, failing closed.

    A policy that raises, or returns something other than a Decision (True or
    None by mistake), denies: a broken policy must never open the door.
    """
    try:
        decision = policy(peer)
    except Exception as exc:
        log.exception("policy %r raised for pid %d", policy, peer.pid)
        return Decision.deny(f"policy {policy!r} raised {type(exc).__name__}: {exc}")
    if not isinstance(decision, Decision):
        return Decision.deny(f"policy {policy!r} returned {type(decision).__name__}, not a Decision")
    return decision


class SameUser(Policy):
    """Allow senders whose uid equals ``uid`` (default: the server's effective uid)."""

    def __init__(self, uid: int | None = None) -> None:
        self.uid = os.geteuid() if uid is None else uid

    def check(self, peer: "Peer") -> Decision:
        if peer.uid == self.uid:
            return Decision.allow(f"uid {peer.uid} is the server's uid")
        return Decision.deny(f"uid {peer.uid} is not the server's uid {self.uid}")

    def __repr__(self) -> str:
        return f"SameUser(uid={self.uid})"


class AllowAll(Policy):
    """Allow every sender. Explicit on purpose; logs a warning once when first used."""

    _warned = False

    def check(self, peer: "Peer") -> Decision:
        if not AllowAll._warned:
            AllowAll._warned = True
            log.warning("AllowAll policy in use: every local process may talk to this server")
        return Decision.allow("AllowAll policy")

    def __repr__(self) -> str:
        return "AllowAll()"


class _Combination(Policy):
    """Shared parts of AllOf and AnyOf: the policies, and whether any looks at the executable."""

    def __init__(self, *policies: PolicyLike) -> None:
        if not policies:
            raise ValueError(f"{type(self).__name__} needs at least one policy")
        self.policies = tuple(as_policy(p) for p in policies)
        self.uses_exe = any(is_exe_based(p) for p in self.policies)
        self.uses_cgroup = any(uses_cgroup(p) for p in self.policies)
        self.uses_label = any(uses_label(p) for p in self.policies)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.policies!r}"


class AllOf(_Combination):
    """Allow only if every policy allows; the first denial is the reason."""

    def check(self, peer: "Peer") -> Decision:
        reasons = []
        for p in self.policies:
            d = evaluate(p, peer)
            if not d.allowed:
                return d
            reasons.append(d.reason)
        return Decision.allow(" and ".join(reasons))


class AnyOf(_Combination):
    """Allow if any policy allows; a denial lists every reason."""

    def check(self, peer: "Peer") -> Decision:
        reasons = []
        for p in self.policies:
            d = evaluate(p, peer)
            if d.allowed:
                return d
            reasons.append(d.reason)
        return Decision.deny("; ".join(reasons))


class Not(Policy):
    """Invert a policy."""

    def __init__(self, policy: PolicyLike) -> None:
        self.policy = as_policy(policy)
        self.uses_exe = is_exe_based(self.policy)
        self.uses_cgroup = uses_cgroup(self.policy)
        self.uses_label = uses_label(self.policy)

    def check(self, peer: "Peer") -> Decision:
        d = evaluate(self.policy, peer)
        return Decision(not d.allowed, f"not ({d.reason})")

    def __repr__(self) -> str:
        return f"Not({self.policy!r})"
