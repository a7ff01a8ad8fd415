"""Request/reply round trip, 64 B, one client against one server process.

Measured twice: with both processes on one CPU (the software cost of the
path: no cross-CPU wake-up, and no run-to-run lottery of where the scheduler
puts them) and on two CPUs (what a daemon on an idle machine sees: the wake-up
of the other CPU dominates).
"""

import pytest

from conftest import BACKENDS, P, run_case

SIZE = 64
PLACES = {"same": "rtt 64 B, same CPU", "split": "rtt 64 B, cross-CPU"}


@pytest.mark.parametrize("pair", [P(b, "same") for b in BACKENDS], indirect=True)
def test_rtt_64_same_cpu(benchmark, pair, quick):
    n = 500 if quick else 3000
    run_case(benchmark, quick, lambda: pair.client.rtt(SIZE, n), case=PLACES["same"], backend=pair.backend, server=pair.server,
             messages=n, size=SIZE, kind="latency", place="same")


@pytest.mark.parametrize("pair", [P(b, "split") for b in BACKENDS], indirect=True)
def test_rtt_64_cross_cpu(benchmark, pair, quick):
    n = 300 if quick else 2000
    run_case(benchmark, quick, lambda: pair.client.rtt(SIZE, n), case=PLACES["split"], backend=pair.backend, server=pair.server,
             messages=n, size=SIZE, kind="latency", place="split")
