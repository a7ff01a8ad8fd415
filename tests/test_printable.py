"""Strings a peer controls (file names, cgroup names, exception texts) never break a log line or
drive a terminal: they reach logs and the CLI escaped."""

from __future__ import annotations

import logging
import os
import shutil
from types import SimpleNamespace

from machipc._printable import printable
from machipc.cli import _describe
from machipc.policies import SameDirectory
from test_policies_processes import REJECTED, client, dirs, serve  # noqa: F401 (fixtures)


def test_printable_escapes_controls_and_is_idempotent():
    raw = "a\nb\r\x1b[31mred\x7f\x85\u2028\udcff tab\there \\x0a ok é"
    out = printable(raw)
    assert out == "a\\x0ab\\x0d\\x1b[31mred\\x7f\\x85\\u2028\\udcff tab\\x09here \\x0a ok é"
    assert out.isprintable() and printable(out) == out


def test_a_newline_in_the_senders_file_name_stays_on_one_log_line(dirs, serve, caplog):  # noqa: F811
    """A sender running a file named "client\\n<fake log line>" cannot add a line to the server's log."""
    caplog.set_level(logging.WARNING, "machipc")
    evil = os.path.join(dirs["outside"], "client\nmachipc: allowed request from pid 1 uid 0")
    shutil.copy2(client(dirs, "outside"), evil)
    try:
        running = serve(SameDirectory(dirs["trusted"]))
        assert running.run(evil).returncode == REJECTED
        [line] = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
        assert "\n" not in line and "client\\x0amachipc: allowed" in line
    finally:
        os.unlink(evil)


def test_cli_shows_the_senders_exe_escaped():
    sender = SimpleNamespace(pid=7, uid=0, gid=0, exe="/tmp/x\x1b]0;pwned\x07", unit="a\nb.service")
    msg = SimpleNamespace(sender=sender, expects_reply=False, data=b"hi")
    line = _describe(msg)
    assert "\x1b" not in line and "\n" not in line and "\\x1b]0;pwned\\x07" in line and "a\\x0ab.service" in line
