"""machipc.ratelog: rejection logs are bounded, the counters are not (issue 12, item 6)."""

from __future__ import annotations

import logging
import os
import socket

import pytest

import machipc
from machipc import wire
from machipc.ratelog import RateLimitedLog
from machipc.wire import Kind

from conftest import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_log_lets_burst_through_then_summarises(caplog):
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("machipc.test"), interval=10, burst=3, clock=clock)
    with caplog.at_level(logging.WARNING, "machipc.test"):
        written = [rl.warning(1000, "rejected", "no %d", i) for i in range(50)]
        assert written == [True] * 3 + [False] * 47
        assert rl.warning(1001, "rejected", "other uid")  # keys are per uid
        assert rl.warning(1000, "dropped: BAD_MAGIC", "other reason")  # and per reason
        clock.now += 10.5
        assert rl.warning(1000, "rejected", "next window")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["no 0", "no 1", "no 2"]
    assert "47 more from uid 1000 in the last 10 s: rejected" in lines
    assert lines[-1] == "next window"
    assert len(lines) == 7  # 3 + other uid + other reason + summary + next window


def test_log_keys_are_bounded(caplog):
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("machipc.test"), interval=10, burst=1, max_keys=4, clock=clock)
    with caplog.at_level(logging.WARNING, "machipc.test"):
        for uid in range(1000):
            rl.warning(uid, "rejected", "uid %d", uid)
        assert len(rl._windows) == 5  # four keys and the shared overflow window
        rl.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6
    assert lines[-1] == "995 more from other senders in the last 10 s: rejected"


def test_rejected_flood_writes_few_lines_and_counts_all(serve, caplog):
    """A real flood of rejected packets: every one counted, a handful logged."""
    caplog.set_level(logging.WARNING, "machipc")
    srv = serve(policy=machipc.policies.Allowlist(uids={os.geteuid() + 1}), max_rejections=None)  # keep the connection
    n = 3000
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.connect(srv.path)
        raw.settimeout(30)
        for i in range(n):
            raw.send(wire.pack_header(Kind.MESSAGE, 0, 3) + b"bad")
        for i in range(n // 2):
            raw.send(b"\x00" * 24)  # bad magic: dropped, not rejected
        assert wait_for(lambda: srv.stats.rejected + srv.stats.dropped_total == n + n // 2, 60)
    assert srv.stats.rejected == n
    assert srv.stats.dropped["BAD_MAGIC"] == n // 2
    lines = [r.getMessage() for r in caplog.records if r.name == "machipc"]
    rejected = [line for line in lines if line.startswith("rejected message")]
    dropped = [line for line in lines if line.startswith("dropped packet")]
    print(f"{n + n // 2} bad packets -> {len(lines)} log lines")
    assert len(rejected) == srv.rate_log.burst
    assert len(dropped) == srv.rate_log.burst
    srv.rate_log.flush()
    summaries = [r.getMessage() for r in caplog.records if "more from uid" in r.getMessage()]
    assert f"{n - srv.rate_log.burst} more from uid {os.geteuid()} in the last 10 s: rejected" in summaries
