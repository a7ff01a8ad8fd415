"""Trust policies: decide, per sending process, whether a message is trusted.

``machipc.policies.SameUser`` is the default policy of a ``machipc.Server``.
"""

from .base import AllOf, AllowAll, AnyOf, Decision, Not, Policy, PolicyLike, SameUser, as_policy, evaluate

__all__ = ["Decision", "Policy", "PolicyLike", "SameUser", "AllowAll", "AllOf", "AnyOf", "Not", "as_policy", "evaluate"]
