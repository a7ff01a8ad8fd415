"""Fixtures of the benchmark suite: servers and clients in separate processes.

Each case starts its server process once (a fixture), then times rounds of a
fixed number of messages with ``benchmark.pedantic``. Every round ends with a
correctness check (all messages arrived, in order, from the right pid), so a
wrong fast path fails instead of winning. ``--quick`` (or ``BENCH_QUICK=1``)
runs fewer messages and rounds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import peers

HERE = Path(__file__).resolve().parent
C_FLOOR_SRC = HERE / "c_floor.c"
C_FLOOR = HERE / "bin" / "c_floor"

#: Every backend, in table order. "c" is the C floor (machipc's per-packet path:
#: credentials and a liveness check of the pidfd pinned at accept); "c-pidfd" gets a
#: new pidfd with every packet instead (SO_PASSPIDFD); "c-nopidfd" has credentials only.
BACKENDS = ["c", "c-pidfd", "c-nopidfd", "socket", "mpconn", "zmq", "machipc-py", "machipc-c"]
#: The C floor's variants, measured only one-to-one with 64 B messages.
C_VARIANTS = {"c-pidfd": "pidfd", "c-nopidfd": "nopidfd"}
PY_BACKENDS = ["socket", "mpconn", "zmq", "machipc-py", "machipc-c"]
START_TIMEOUT = 30.0


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False, help="fewer messages and rounds (make bench-quick)")


def pytest_configure(config):
    config.bench_quick = config.getoption("--quick") or os.environ.get("BENCH_QUICK", "") not in ("", "0")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.bench_quick


# --------------------------------------------------------------------------- availability


def _build_c_floor() -> str | None:
    """Build bench/bin/c_floor if it is missing or stale; None when ready, else why not."""
    if C_FLOOR.exists() and C_FLOOR.stat().st_mtime >= C_FLOOR_SRC.stat().st_mtime:
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler to build bench/bin/c_floor (run make bench)"
    C_FLOOR.parent.mkdir(exist_ok=True)
    res = subprocess.run([cc, "-O2", "-Wall", "-o", str(C_FLOOR), str(C_FLOOR_SRC)], capture_output=True, text=True)
    return None if res.returncode == 0 else f"c_floor did not build: {res.stderr.strip()[:300]}"


_why_missing: dict[str, str | None] = {}


def missing(backend: str) -> str | None:
    """Why ``backend`` cannot run here (None when it can)."""
    if backend not in _why_missing:
        why = None
        if backend.startswith("c"):
            why = _build_c_floor()
        elif backend == "zmq":
            try:
                import zmq  # noqa: F401
            except ImportError:
                why = "pyzmq is not installed (pip install pyzmq, or make bench)"
        elif backend == "machipc-c":
            try:
                from machipc import _backend

                _backend.transport("c")
            except ImportError as exc:
                why = f"machipc Cython transport not available: {exc}"
        _why_missing[backend] = why
        if why:
            print(f"\n[bench] skipping {backend}: {why}", file=sys.stderr)
    return _why_missing[backend]


def need(backend: str) -> None:
    why = missing(backend)
    if why:
        pytest.skip(why)


# --------------------------------------------------------------------------- processes


class Proc:
    """A child process that prints ``READY <pid> ...`` once it is usable."""

    def __init__(self, argv: list[str], env: dict | None = None, stdin: bool = False, cpus: set[int] | None = None) -> None:
        self.argv = argv
        self.p = subprocess.Popen(
            argv,
            cwd=HERE,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
            # before exec, so every thread the child starts (zmq's I/O thread) inherits it
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        line = self.p.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"{' '.join(argv)} did not start (exit {self.p.returncode}): {line!r}")
        self.info = line.split()[1:]
        self.pid = int(self.info[0])

    def stop(self) -> None:
        if self.p.poll() is None:
            if self.p.stdin:
                try:
                    self.p.stdin.write("quit\n")
                    self.p.stdin.flush()
                    self.p.wait(2)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for f in (self.p.stdin, self.p.stdout):
            if f:
                try:
                    f.close()
                except OSError:
                    pass


class Driven:
    """A client in its own process (c_floor drive or peers.py drive), run by commands."""

    def __init__(self, backend: str, addr: str, cpus: set[int] | None = None) -> None:
        if backend.startswith("c"):
            argv = [str(C_FLOOR), "drive", addr]
        else:
            name, _, impl = backend.partition("-")
            argv = [sys.executable, str(HERE / "peers.py"), "drive", name, addr, "--impl", impl or "py"]
        self.proc = Proc(argv, stdin=True, cpus=cpus)
        self.pid = self.proc.pid

    def start(self, op: str, size: int, count: int, batch: int = 0) -> None:
        self.proc.p.stdin.write(f"{op} {size} {count} {batch}\n")
        self.proc.p.stdin.flush()

    def finish(self) -> dict:
        line = self.proc.p.stdout.readline()
        if not line:
            raise peers.BenchError(f"client process {self.pid} died")
        res = json.loads(line)
        if res["errors"]:
            raise peers.BenchError(f"client {self.pid}: {res['op']} had {res['errors']} errors {res.get('error', '')}")
        return res

    def run(self, op: str, size: int, count: int, batch: int = 0) -> dict:
        self.start(op, size, count, batch)
        return self.finish()

    def rtt(self, size: int, count: int) -> None:
        self.run("rtt", size, count)

    def oneway(self, size: int, count: int) -> None:
        self.run("oneway", size, count)

    def batch(self, size: int, count: int, batch: int) -> None:
        self.run("batch", size, count, batch)

    def close(self) -> None:
        self.proc.stop()


_serial = itertools.count()


@pytest.fixture(scope="session")
def sockdir():
    d = tempfile.mkdtemp(prefix="mbench.", dir="/tmp")  # short: sun_path is 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_server(backend: str, sockdir: str, policy: str = "sameuser", cpus: set[int] | None = None,
                 loop: str = "serve") -> tuple[Proc, str]:
    """Start ``backend``'s server in its own process; returns it and its address.

    ``loop``: how a machipc server takes its messages (peers.serve_machipc).
    """
    need(backend)
    addr = os.path.join(sockdir, f"s{next(_serial)}")
    if backend.startswith("c"):
        env = {"C_FLOOR_IDENTITY": C_VARIANTS.get(backend, "pin")}
        return Proc([str(C_FLOOR), "serve", addr], env=env, cpus=cpus), addr
    name, _, impl = backend.partition("-")
    argv = [sys.executable, str(HERE / "peers.py"), "serve", name, addr, "--impl", impl or "py", "--policy", policy, "--loop", loop]
    return Proc(argv, cpus=cpus), addr


def make_client(backend: str, addr: str, cpus: set[int] | None = None):
    """A client for ``backend``: in this process for Python backends, driven for C.

    An in-process client runs on ``cpus``: the caller pins this thread first.
    """
    if backend.startswith("c"):
        return Driven(backend, addr, cpus)
    name, _, impl = backend.partition("-")
    return peers.CLIENTS[name](addr, impl=impl or "py")


def placement(place: str | None) -> tuple[set[int] | None, set[int] | None]:
    """CPU sets (server, client) for a placement.

    ``"same"``: both on one CPU, so a round trip costs only the software on
    the path (no cross-CPU wake-up; the scheduler's choice varies it 2-10x
    otherwise). ``"split"``: server and client on different CPUs, which run
    in parallel (one-way throughput; round trips then include a cross-CPU
    wake-up). None: wherever the scheduler puts them.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if place is None:
        return None, None
    if place == "same" or len(cpus) < 2:
        return {cpus[0]}, {cpus[0]}
    return {cpus[1]}, {cpus[0]}


def P(backend: str, place: str | None = None, policy: str = "sameuser", id: str | None = None, loop: str = "serve"):
    """A ``pair`` parameter with a readable id."""
    return pytest.param((backend, policy, place, loop), id=id or backend)


@pytest.fixture
def pair(request, sockdir):
    """Server process and client for ``request.param`` = (backend, policy, placement, loop)."""
    backend, policy, place, loop = request.param
    server_cpus, client_cpus = placement(place)
    server, addr = start_server(backend, sockdir, policy, server_cpus, loop)
    saved = os.sched_getaffinity(0)
    try:
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)
        client = make_client(backend, addr, client_cpus)
    except BaseException:
        os.sched_setaffinity(0, saved)
        server.stop()
        raise
    try:
        yield SimpleNamespace(server=server, client=client, backend=backend, policy=policy, place=place)
    finally:
        client.close()
        server.stop()
        os.sched_setaffinity(0, saved)


def process_cpu_ns(pid: int) -> int:
    """Nanoseconds process ``pid`` has spent on a CPU so far, all its threads (live or exited).

    The kernel's per-process CPU clock, what ``clock_getcpuclockid(3)`` returns:
    MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) = ``(~pid << 3) | 2``
    (include/linux/posix-timers.h), the sum of the threads' ``sum_exec_runtime``
    (kernel/time/posix-cpu-timers.c) -- user and system time, the counter
    ``/proc/PID/task/*/schedstat`` shows per thread. Nanosecond resolution,
    unlike the tick-based utime/stime of ``/proc/PID/stat``. Raises OSError
    when the process is gone.
    """
    return time.clock_gettime_ns(((~pid) << 3) | 2)


WARMUP_ROUNDS = 1


def run_case(benchmark, quick: bool, fn, *, case: str, backend: str, messages: int, size: int, kind: str, rounds=(3, 10),
             server: Proc | None = None, **extra):
    """Time ``fn`` in pedantic mode: one round moves ``messages`` messages of ``size`` bytes.

    With ``server`` (its process), also the server's CPU time per message:
    process CPU time read before and after each round (see process_cpu_ns), the
    median over the timed rounds divided by ``messages``, stored in
    ``extra_info["server_cpu_ns_per_msg"]``. A round ends only when the server
    has handled its last message (sync reply or echo), so the round holds all
    of its work (plus that one sync message).
    """
    benchmark.group = case
    benchmark.extra_info.update(case=case, backend=backend, messages=messages, size=size, kind=kind, quick=quick, **extra)
    timed, cpu = fn, []
    if server is not None and sys.platform.startswith("linux"):  # (the clock id encoding is Linux's)
        def timed():
            before = process_cpu_ns(server.pid)
            fn()
            cpu.append(process_cpu_ns(server.pid) - before)

    benchmark.pedantic(timed, rounds=rounds[0] if quick else rounds[1], iterations=1, warmup_rounds=WARMUP_ROUNDS)
    if cpu[WARMUP_ROUNDS:]:
        per_round = sorted(cpu[WARMUP_ROUNDS:])
        benchmark.extra_info["server_cpu_ns_per_msg"] = round(per_round[len(per_round) // 2] / messages, 1)
