"""Every policy example in README.md and docs/*.md means what its comment says (F13).

Each code block that builds a policy is taken from the document itself, run
(its ``/opt/example/...`` directories replaced by real ones), and asked about
real processes: copies of ``sleep`` started inside and outside the example's
directory as root, as the daemon's own user and as other users. The daemon's
user is uid 1000 here (``os.geteuid`` is patched while the example builds its
policy), so "the daemon's user" and "root" are told apart. A new example in
the docs fails ``test_every_example_is_checked`` until it is added below.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from machipc.peer import Peer
from machipc.policies import evaluate, loads

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and pidfds")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))]
POLICY_WORDS = re.compile(r"policies\.|Allowlist\(|SameUser\(|SameDirectory\(|CodeSignature\(|SystemdUnit\(|Cgroup\(|SecurityLabel\(|^\[policy\]", re.M)
DAEMON_UID = 1000

# (file, a line that identifies the block) -> {(sender uid, where it runs): allowed?}
# "in": the example's directory; "out": elsewhere. What each comment (or heading) promises, on Linux.
ROOT_OR_SIGNED = {(0, "in"): True, (0, "out"): True, (DAEMON_UID, "in"): False, (65534, "in"): False}
EXPECTED = {
    # "Root may always talk; my own uid only from programs installed in /opt/example/bin;
    # everyone else is rejected"
    ("README.md", "policy = policies.SameUser(uid=0) | (policies.SameUser() & policies.SameDirectory"): {
        (0, "in"): True, (0, "out"): True, (DAEMON_UID, "in"): True, (DAEMON_UID, "out"): False,
        (12345, "in"): False, (65534, "in"): False,
    },
    # asyncio example: root or the daemon's own user
    ("docs/daemons.md", "POLICY = Allowlist(uids=[0]) | SameUser()"): {
        (0, "out"): True, (DAEMON_UID, "out"): True, (12345, "out"): False, (65534, "out"): False,
    },
    # "Only my own signed helper or root may talk to me": on Linux there are no signatures, so root only
    ("docs/policies.md", "policy = Allowlist(uids=[0]) | CodeSignature("): ROOT_OR_SIGNED,
    ("docs/policies.md", "  { code_signature = { identifier = \"org.example.helper\""): ROOT_OR_SIGNED,
    # "helpers installed in /opt/example/libexec, running as the daemon's user or root"
    ("docs/policies.md", "# helpers installed in /opt/example/libexec, running as the daemon's user or root"): {
        (0, "in"): True, (DAEMON_UID, "in"): True, (0, "out"): False, (DAEMON_UID, "out"): False,
        (12345, "in"): False, (65534, "in"): False,
    },
}


def _blocks() -> list[tuple[str, str, str]]:
    """(file, language, text) of every fenced code block that builds a policy."""
    out = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            if POLICY_WORDS.search(body) and lang in ("python", "toml"):
                out.append((doc, lang, body))
    return out


def _find(doc: str, marker: str) -> tuple[str, str]:
    found = [(lang, body) for d, lang, body in _blocks() if d == doc and marker in body]
    assert len(found) == 1, f"{doc}: {len(found)} code blocks contain {marker!r}"
    return found[0]


def test_every_example_is_checked():
    for doc, _lang, body in _blocks():
        assert any(d == doc and marker in body for d, marker in EXPECTED), f"{doc}: example not checked here:\n{body}"


@pytest.fixture(scope="module")
def places():
    """The example's directory and another one, each with a copy of sleep every uid may run."""
    dirs = {}
    for where in ("in", "out"):
        d = tempfile.mkdtemp(prefix=f"mi-doc-{where}-")
        os.chmod(d, 0o755)
        shutil.copy2(shutil.which("sleep"), os.path.join(d, "helper"))
        os.chmod(os.path.join(d, "helper"), 0o755)
        dirs[where] = d
    yield dirs
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)


def _build(lang: str, body: str, directory: str, monkeypatch):
    """Run the example's policy-building part with the daemon's uid set to DAEMON_UID."""
    body = body.replace("/opt/example/bin", directory).replace("/opt/example/libexec", directory)
    monkeypatch.setattr(os, "geteuid", lambda: DAEMON_UID)
    try:
        if lang == "toml":
            return loads(body)
        setup = []
        for line in body.splitlines():
            if line.startswith(("def ", "with ", "async ", "asyncio.run")):
                break
            setup.append(line)
        scope: dict = {}
        exec(compile("\n".join(setup), "<example>", "exec"), scope)
        return scope.get("policy") or scope["POLICY"]
    finally:
        monkeypatch.undo()


def _sender(uid: int, exe: str) -> tuple[subprocess.Popen, Peer]:
    """A real process running ``exe`` as ``uid``, and its Peer as the server would build it."""
    proc = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", exe, "60"])
    want = os.stat(exe)
    for _ in range(500):
        st = os.stat(f"/proc/{proc.pid}/exe")
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            break
        time.sleep(0.01)
    return proc, Peer.from_pidfd(proc.pid, uid, uid, os.pidfd_open(proc.pid), claimed=True)


@pytest.mark.parametrize("doc, marker", list(EXPECTED), ids=[f"{d}:{m[:40]}" for d, m in EXPECTED])
def test_example_means_what_its_comment_says(doc, marker, places, monkeypatch):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to start senders as other uids")
    lang, body = _find(doc, marker)
    policy = _build(lang, body, places["in"], monkeypatch)
    for (uid, where), allowed in EXPECTED[(doc, marker)].items():
        proc, peer = _sender(uid, os.path.join(places[where], "helper"))
        try:
            d = evaluate(policy, peer)
            assert d.allowed == allowed, f"{doc} example, uid {uid} running from {where}: {d}"
        finally:
            proc.kill()
            proc.wait()
            peer.close()
