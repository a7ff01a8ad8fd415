"""A cached policy decision must cost under 1 µs (issue 5).

``DecisionCache.decide`` for a process already seen: a uid policy (the key is
pid, guard, uid, gid: one tuple and one dict lookup), and for contrast an
exe-based policy, whose key must include the executable's (dev, inode) read
afresh from /proc on every lookup (execve keeps pid and pidfd on Linux), and
the uncached evaluation.
"""

from __future__ import annotations

import os
import sys

import pytest

from machipc.peer import Peer
from machipc.policies import DecisionCache, SameDirectory, SameUser, evaluate

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux pidfd")


@pytest.fixture(scope="module")
def peer():
    return Peer.from_pidfd(os.getpid(), os.geteuid(), os.getegid(), os.pidfd_open(os.getpid()))


def test_cached_decision_uid_policy(benchmark, peer):
    cache = DecisionCache(SameUser() | SameUser(12345))
    assert cache.decide(peer).allowed
    benchmark(cache.decide, peer)
    assert cache.evaluations == 1
    assert benchmark.stats.stats.median < 1e-6, f"cached decision took {benchmark.stats.stats.median * 1e9:.0f} ns"


def test_cached_decision_exe_policy(benchmark, peer):
    cache = DecisionCache(SameDirectory(os.path.dirname(os.readlink("/proc/self/exe"))))
    assert cache.decide(peer).allowed
    benchmark(cache.decide, peer)
    assert cache.evaluations == 1


def test_uncached_evaluation_uid_policy(benchmark, peer):
    policy = SameUser() | SameUser(12345)
    benchmark(evaluate, policy, peer)
