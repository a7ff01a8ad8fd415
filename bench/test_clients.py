"""Many clients (1, 4, 16 processes) doing 64 B request/reply against one server.

Every client is its own process (``peers.py drive`` / ``c_floor drive``); a
round tells all of them to make N requests at once and ends when the last one
has its answers. Reported: total requests per second. The server has one CPU
to itself and the clients share the other.
"""

import pytest

from conftest import BACKENDS, C_VARIANTS, Driven, need, placement, run_case, start_server

SIZE = 64


@pytest.fixture
def fleet(request, sockdir):
    backend, k = request.param
    if backend in C_VARIANTS:
        pytest.skip("the C floor's variants are only measured one-to-one")
    need(backend)
    server_cpus, client_cpus = placement("split")  # the server has a CPU, the clients share the other
    server, addr = start_server(backend, sockdir, cpus=server_cpus)
    clients = []
    try:
        for _ in range(k):
            clients.append(Driven(backend, addr, client_cpus))
        yield backend, k, clients, server
    finally:
        for c in clients:
            c.close()
        server.stop()


@pytest.mark.parametrize("fleet", [(b, k) for k in (1, 4, 16) for b in BACKENDS], indirect=True,
                         ids=lambda p: f"{p[0]}-{p[1]}")
def test_clients(benchmark, fleet, quick):
    backend, k, clients, server = fleet
    per = max(50, (400 if quick else 2000) // k)

    def round_():
        for c in clients:
            c.start("rtt", SIZE, per)
        for c in clients:
            c.finish()

    run_case(benchmark, quick, round_, case=f"{k} client{'s' if k > 1 else ''} rtt 64 B", backend=backend, messages=per * k, size=SIZE,
             kind="throughput", clients=k, rounds=(3, 8), server=server)
