"""One-way 64 B messages: one call per message, and batched where the API has it.

A round sends N messages, then one sync request that proves all N arrived in
order from the right pid; the sync's round trip is included in the round.
"""

import pytest

from conftest import BACKENDS, P, run_case

SIZE = 64


@pytest.mark.parametrize("pair", [P(b, "split") for b in BACKENDS], indirect=True)
def test_oneway_64(benchmark, pair, quick):
    n = 5000 if quick else 20000
    run_case(benchmark, quick, lambda: pair.client.oneway(SIZE, n), case="one-way 64 B", backend=pair.backend, server=pair.server,
             messages=n, size=SIZE, kind="throughput")


BATCH = 32
NO_BATCH_API = {
    "socket": "Python's socket module has no sendmmsg",
    "mpconn": "multiprocessing.connection has no batch send",
    "zmq": "pyzmq has no batch send (PUSH already batches inside libzmq: see one-way)",
}


@pytest.mark.parametrize("pair", [P(b, "split", loop="receive_many") for b in BACKENDS], indirect=True)
def test_oneway_batched_64(benchmark, pair, quick):
    """Issue 16's batched case: ``send_many`` on the sender, ``receive_many`` on a machipc server."""
    batched(benchmark, pair, quick, f"one-way batched 64 B (x{BATCH})")


@pytest.mark.parametrize("pair", [P(b, "split") for b in ("machipc-py", "machipc-c")], indirect=True)
def test_oneway_batched_64_serve(benchmark, pair, quick):
    """The same sender against ``serve()``: what batching only on the sending side gives."""
    batched(benchmark, pair, quick, f"one-way batched 64 B (x{BATCH}), serve()")


def batched(benchmark, pair, quick, case: str) -> None:
    if pair.backend in NO_BATCH_API:
        pytest.skip(NO_BATCH_API[pair.backend])
    if pair.backend.startswith("machipc") and not hasattr(pair.client.cli, "send_many"):
        pytest.skip("machipc.Client has no batch API (send_many) yet")
    n = 5000 if quick else 20000
    run_case(benchmark, quick, lambda: pair.client.batch(SIZE, n, BATCH), case=case, backend=pair.backend,
             server=pair.server, messages=n, size=SIZE, kind="throughput", batch=BATCH)
