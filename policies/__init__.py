"""Trust policies: decide, per sending process, whether a message is trusted.

``machipc.policies.SameUser`` is the default policy of a ``machipc.Server``.
See ``docs/policies.md`` for what each identity is worth on Linux and macOS.
"""

from .allowlist import Allowlist
from .base import (
    AllOf,
    AllowAll,
    AnyOf,
    Decision,
    Not,
    Policy,
    PolicyLike,
    SameUser,
    as_policy,
    evaluate,
    is_exe_based,
    uses_cgroup,
    uses_label,
)
from .cache import DecisionCache
from .code_signature import CodeSignature
from .config import PolicyFileError, load, loads
from .same_directory import SameDirectory
from .security_label import SecurityLabel
from .systemd_unit import Cgroup, SystemdUnit

__all__ = [
    "Decision",
    "Policy",
    "PolicyLike",
    "SameUser",
    "AllowAll",
    "AllOf",
    "AnyOf",
    "Not",
    "SameDirectory",
    "CodeSignature",
    "Allowlist",
    "SystemdUnit",
    "Cgroup",
    "SecurityLabel",
    "DecisionCache",
    "load",
    "loads",
    "PolicyFileError",
    "as_policy",
    "evaluate",
    "is_exe_based",
    "uses_cgroup",
    "uses_label",
]
