"""The policy protocol: ``policy(peer) -> Decision``.

A policy is any callable taking a :class:`machipc.Peer` and returning a
:class:`Decision`. Subclassing :class:`Policy` adds the ``&``, ``|`` and ``~``
operators.

Decisions are three-valued: allow, deny, or *unknown* (the policy cannot tell:
the sender exited, its process cannot be pinned soundly, the policy raised).
Unknown never lets a sender in, and it stays unknown through ``Not`` and
through ``AnyOf``/``AllOf`` unless another branch decides on its own
(Kleene's logic): ``~unknown`` is unknown, ``unknown | allow`` allows,
``unknown & deny`` denies, and so ``~(unknown & deny)`` allows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from machipc._printable import printable

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
    """A policy's verdict on one sender, with a reason a person can read in a log.

    ``allowed`` is what the server acts on. ``known`` is False for "cannot
    tell" (:meth:`unknown`), which is never allowed and which ``Not`` keeps
    as it is instead of turning it into an allow.
    """

    allowed: bool
    reason: str
    known: bool = True

    def __post_init__(self) -> None:
        if self.allowed and not self.known:
            raise ValueError("an unknown decision cannot allow")

    @classmethod
    def allow(cls, reason: str) -> "Decision":
        return cls(True, reason)

    @classmethod
    def deny(cls, reason: str) -> "Decision":
        return cls(False, reason)

    @classmethod
    def unknown(cls, reason: str) -> "Decision":
        """The policy cannot tell (denies, and stays unknown under ``Not``)."""
        return cls(False, reason, False)

    @property
    def state(self) -> str:
        """``"allow"``, ``"deny"`` or ``"unknown"``."""
        return "allow" if self.allowed else "deny" if self.known else "unknown"

    def __bool__(self) -> bool:
        return self.allowed


class Policy:
    """Base class for policies; subclasses implement ``check``.

    ``uses_exe`` is True for policies that may look at the sender's executable
    (path, digest, code signature, or anything else an ``execve()`` changes).
    On Linux a process keeps its pid and pidfd across ``execve()``, so a cached
    decision of such a policy is only reused while the process still runs the
    same file (see ``DecisionCache``). The default is True, the safe side: a
    subclass that only reads uid/gid declares ``uses_exe = False``.
    ``uses_cgroup`` and ``uses_label`` say the same of the cgroup (and the
    systemd unit derived from it) and of the LSM label: a process can move
    between cgroups and change label without changing pid. They default to
    True too; a subclass that reads neither declares them False.
    """

    uses_exe = True
    uses_cgroup = True
    uses_label = True

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
    None by mistake), gives an *unknown* decision: it denies, also under
    ``Not``, so a broken policy never opens the door.
    """
    try:
        decision = policy(peer)
    except Exception as exc:
        log.exception("policy %r raised for pid %d", policy, peer.pid)
        return Decision.unknown(f"policy {policy!r} raised {type(exc).__name__}: {printable(str(exc))}")
    if not isinstance(decision, Decision):
        return Decision.unknown(f"policy {policy!r} returned {type(decision).__name__}, not a Decision")
    return decision


class SameUser(Policy):
    """Allow senders whose uid equals ``uid`` (default: the server's effective uid)."""

    uses_exe = uses_cgroup = uses_label = False

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

    uses_exe = uses_cgroup = uses_label = False
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
    """Allow only if every policy allows.

    A denial decides at once (it is the reason); otherwise an unknown makes
    the whole unknown, since the remaining policies cannot make it an allow.
    """

    def check(self, peer: "Peer") -> Decision:
        reasons = []
        unknown = None
        for p in self.policies:
            d = evaluate(p, peer)
            if not d.allowed:
                if d.known:
                    return d
                unknown = unknown or d
                continue
            reasons.append(d.reason)
        if unknown is not None:
            return unknown
        return Decision.allow(" and ".join(reasons))


class AnyOf(_Combination):
    """Allow if any policy allows; otherwise unknown if any was unknown, else deny.

    A denial lists every reason.
    """

    def check(self, peer: "Peer") -> Decision:
        reasons = []
        known = True
        for p in self.policies:
            d = evaluate(p, peer)
            if d.allowed:
                return d
            known = known and d.known
            reasons.append(d.reason)
        return Decision(False, "; ".join(reasons), known)


class Not(Policy):
    """Invert a policy: allow becomes deny and deny allow; unknown stays unknown (denies)."""

    def __init__(self, policy: PolicyLike) -> None:
        self.policy = as_policy(policy)
        self.uses_exe = is_exe_based(self.policy)
        self.uses_cgroup = uses_cgroup(self.policy)
        self.uses_label = uses_label(self.policy)

    def check(self, peer: "Peer") -> Decision:
        d = evaluate(self.policy, peer)
        if not d.known:
            return Decision.unknown(f"not ({d.reason}): cannot tell, so not inverted")
        return Decision(not d.allowed, f"not ({d.reason})")

    def __repr__(self) -> str:
        return f"Not({self.policy!r})"
