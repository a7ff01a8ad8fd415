"""Request/reply round trip, 64 B, one client against one server process."""

import pytest

from conftest import BACKENDS, run_case

SIZE = 64


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_rtt_64(benchmark, pair, quick):
    n = 500 if quick else 2000
    run_case(benchmark, quick, lambda: pair.client.rtt(SIZE, n), case="rtt 64 B", backend=pair.backend,
             messages=n, size=SIZE, kind="latency")
