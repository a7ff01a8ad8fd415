"""The cost of trust: a machipc server with a policy vs with none.

``SameDirectory`` (a cached executable-directory check) comes in a later
issue; until then the comparison is ``SameUser`` (the default, uid compare)
against ``AllowAll``. Decisions are cached per sending process by the server,
so the policy runs once per connection, not once per message. Round trips run
with both processes on one CPU, one-way with them on two (see test_rtt.py).
"""

import pytest

from conftest import P, run_case

SIZE = 64
IMPLS, POLICIES = ("machipc-py", "machipc-c"), ("allowall", "sameuser")


@pytest.mark.parametrize("pair", [P(i, "same", p, f"{i}-{p}") for i in IMPLS for p in POLICIES], indirect=True)
def test_policy_rtt(benchmark, pair, quick):
    n = 500 if quick else 2000
    run_case(benchmark, quick, lambda: pair.client.rtt(SIZE, n), case=f"policy rtt 64 B, same CPU ({pair.policy})",
             backend=pair.backend, server=pair.server, messages=n, size=SIZE, kind="latency", policy=pair.policy)


@pytest.mark.parametrize("pair", [P(i, "split", p, f"{i}-{p}") for i in IMPLS for p in POLICIES], indirect=True)
def test_policy_oneway(benchmark, pair, quick):
    n = 5000 if quick else 20000
    run_case(benchmark, quick, lambda: pair.client.oneway(SIZE, n), case=f"policy one-way 64 B ({pair.policy})",
             backend=pair.backend, server=pair.server, messages=n, size=SIZE, kind="throughput", policy=pair.policy)
