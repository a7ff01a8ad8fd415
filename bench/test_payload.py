"""One-way throughput by payload size (bytes delivered to the receiver per second).

Up to 64 KiB every transport sends inline. Above it the C floor and the raw
socket baseline send a fresh sealed memfd per message (SCM_RIGHTS) that the
receiver maps read-only and copies out; multiprocessing and zmq stream the
bytes. machipc sends them through its arena (copied out by the receiver)
or as sealed memfds. ``memcpy`` is the same bytes copied once in one process:
the bandwidth ceiling the large-payload targets are judged against.
"""

import ctypes

import pytest

import machipc
from conftest import BACKENDS, C_VARIANTS, P, run_case

KiB, MiB = 1024, 1024 * 1024
SIZES = [1 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB]
# messages per round (full, quick): about 10-300 MB per round
COUNTS = {1 * KiB: (20000, 5000), 64 * KiB: (2000, 300), 1 * MiB: (200, 30), 16 * MiB: (16, 3), 64 * MiB: (4, 1)}


def label(size):
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


@pytest.mark.parametrize("pair", [P(b, "split") for b in BACKENDS], indirect=True)
@pytest.mark.parametrize("size", SIZES, ids=label)
def test_payload(benchmark, pair, quick, size):
    if pair.backend in C_VARIANTS:
        pytest.skip("the C floor's variants are only measured for 64 B messages")
    n = COUNTS[size][1 if quick else 0]
    if pair.backend.startswith("machipc"):
        try:
            pair.client.oneway(size, 1)
        except machipc.MessageTooLarge as exc:
            pytest.skip(f"machipc: {exc} (large payloads come with the memfd path)")
    run_case(benchmark, quick, lambda: pair.client.oneway(size, n), case=f"payload {label(size)}", backend=pair.backend, server=pair.server,
             messages=n, size=size, kind="throughput", rounds=(2, 5) if size >= 16 * MiB else (3, 10))


@pytest.mark.parametrize("size", [s for s in SIZES if s >= MiB], ids=label)
def test_memcpy(benchmark, quick, size):
    """One memcpy of each message into a reused destination: the copy ceiling."""
    n = COUNTS[size][1 if quick else 0]
    src = ctypes.create_string_buffer(b"\x5a" * size, size)
    dst = ctypes.create_string_buffer(size)
    ctypes.memmove(dst, src, size)  # fault the destination in once, like a reused buffer

    def copy():
        for _ in range(n):
            ctypes.memmove(dst, src, size)

    run_case(benchmark, quick, copy, case=f"payload {label(size)}", backend="memcpy", messages=n, size=size,
             kind="throughput", rounds=(2, 5) if size >= 16 * MiB else (3, 10))
    assert dst.raw[-1] == 0x5A
