"""Policies, combinators, CodeSignature (with a stand-in codesign) and the decision cache."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from machipc.peer import Peer
from machipc.policies import (
    AllOf,
    Allowlist,
    AllowAll,
    AnyOf,
    CodeSignature,
    Decision,
    DecisionCache,
    Not,
    Policy,
    SameDirectory,
    SameUser,
    evaluate,
    is_exe_based,
    loads,
)
from machipc.policies import allowlist as allowlist_mod
from machipc.policies import code_signature
from machipc.policies.code_signature import CODESIGN_EXIT, build_requirement, parse_codesign_display

LINUX = sys.platform.startswith("linux")
needs_linux = pytest.mark.skipif(not LINUX, reason="Linux pidfd and /proc")

SELF_EXE = os.readlink("/proc/self/exe") if LINUX else sys.executable
TEAM = "ABCDE12345"


def me() -> Peer:
    return Peer.from_pidfd(os.getpid(), os.geteuid(), os.getegid(), os.pidfd_open(os.getpid()))


class Counting(Policy):
    def __init__(self, allowed=True, uses_exe=False):
        self.calls, self.allowed, self.uses_exe = 0, allowed, uses_exe

    def check(self, peer):
        self.calls += 1
        return Decision(self.allowed, f"counting #{self.calls}")


# -- base and combinators ------------------------------------------------------------


@needs_linux
def test_combinators_and_reasons():
    p = me()
    yes, no = SameUser(), SameUser(os.geteuid() + 1)
    assert (yes & yes)(p).allowed and not (yes & no)(p).allowed
    assert (yes | no)(p).allowed and not (no | no)(p).allowed
    assert (~no)(p).allowed and not (~yes)(p).allowed
    both = (no | SameUser(12345))(p)
    assert "is not the server's uid" in both.reason and ";" in both.reason
    assert isinstance(yes & no, AllOf) and isinstance(yes | no, AnyOf) and isinstance(~yes, Not)


@needs_linux
def test_evaluate_fails_closed():
    p = me()

    def broken(peer):
        raise RuntimeError("boom")

    assert not evaluate(broken, p).allowed and "boom" in evaluate(broken, p).reason
    assert not evaluate(lambda peer: True, p).allowed  # not a Decision
    assert not (SameUser() & broken)(p).allowed


class Fixed(Policy):
    """A policy with a fixed outcome: "allow", "deny", "unknown", "raises" or "junk" (not a Decision)."""

    uses_exe = False

    def __init__(self, outcome):
        self.outcome = outcome

    def check(self, peer):
        if self.outcome == "raises":
            raise ZeroDivisionError("broken policy")
        if self.outcome == "junk":
            return True
        return {"allow": Decision.allow, "deny": Decision.deny, "unknown": Decision.unknown}[self.outcome](self.outcome)

    def __repr__(self):
        return f"Fixed({self.outcome!r})"


A, D = Fixed("allow"), Fixed("deny")


@pytest.mark.parametrize("how", ["unknown", "raises", "junk"])
def test_unknown_denies_through_every_combinator(how):
    """F6: "cannot tell" (an unknown decision, a policy that raises or returns junk) never
    turns into an allow: Kleene's three-valued logic, unknown treated as deny at the end."""
    u = Fixed(how)
    peer = Peer(0, 1000, 1000)
    expect = {
        "u": (u, "unknown"),
        "~u": (~u, "unknown"),
        "Not(u)": (Not(u), "unknown"),
        "~~u": (~~u, "unknown"),
        "u | D": (u | D, "unknown"),
        "D | u": (D | u, "unknown"),
        "AnyOf(D, u, D)": (AnyOf(D, u, D), "unknown"),
        "u | A": (u | A, "allow"),
        "A | u": (A | u, "allow"),
        "u & A": (u & A, "unknown"),
        "A & u": (A & u, "unknown"),
        "AllOf(A, u, A)": (AllOf(A, u, A), "unknown"),
        "u & D": (u & D, "deny"),
        "D & u": (D & u, "deny"),
        "~(u | D)": (~(u | D), "unknown"),
        "~(u & A)": (~(u & A), "unknown"),
        "~(u & D)": (~(u & D), "allow"),  # false whatever u is
        "~(u | A)": (~(u | A), "deny"),  # true whatever u is
        "AnyOf(~u, ~D & u)": (AnyOf(~u, ~D & u), "unknown"),
    }
    for text, (policy, state) in expect.items():
        d = evaluate(policy, peer)
        assert d.state == state, f"{text} with u={how}: {d}"
        assert d.allowed == (state == "allow")


@pytest.mark.parametrize(
    "text, state",
    [
        ('not = { same_directory = "/opt/example/libexec" }', "unknown"),
        ('not = { code_signature = { team_id = "ABCDE12345" } }', "unknown"),
        ('any_of = [{ same_directory = "/opt/x" }, { same_user = { uid = 424242 } }]', "unknown"),
        ('not = { any_of = [{ same_directory = "/opt/x" }, { same_user = { uid = 424242 } }] }', "unknown"),
        ('all_of = [{ same_directory = "/opt/x" }, { same_user = { uid = 1000 } }]', "unknown"),
        ('not = { all_of = [{ same_directory = "/opt/x" }, { same_user = { uid = 1000 } }] }', "unknown"),
        ('not = { all_of = [{ same_directory = "/opt/x" }, { same_user = { uid = 424242 } }] }', "allow"),
        ('any_of = [{ same_directory = "/opt/x" }, { same_user = { uid = 1000 } }]', "allow"),
    ],
)
def test_unknown_denies_through_toml_combinators(text, state):
    """The same through policy files: the sender's pid is unknown (another pid namespace),
    so its executable is, and uid 1000 decides only where it can on its own."""
    d = loads("[policy]\n" + text)(Peer(0, 1000, 1000))
    assert d.state == state, d


@needs_linux
def test_allow_all_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(AllowAll, "_warned", False)
    caplog.set_level(logging.WARNING, "machipc.policies")
    AllowAll()(me())
    AllowAll()(me())
    assert caplog.text.count("AllowAll policy in use") == 1


def test_uses_exe_propagates():
    sd = SameDirectory("/usr/bin")
    assert not is_exe_based(SameUser()) and is_exe_based(sd)
    assert is_exe_based(SameUser() & sd) and is_exe_based(SameUser() | ~sd)
    assert not is_exe_based(SameUser() | Allowlist(uids=[0]))
    assert is_exe_based(Allowlist(uids=[0], sha256=["a" * 64]))
    assert is_exe_based(lambda peer: Decision.allow("?"))  # unknown callables count as exe-based

    class Mine(Policy):  # F10: a subclass that does not say is taken to look at the executable
        def check(self, peer):
            return Decision.allow("?")

    assert is_exe_based(Mine()) and is_exe_based(SameUser() | Mine())
    assert not is_exe_based(SameUser()) and not is_exe_based(AllowAll())


# -- SameDirectory -----------------------------------------------------------------------------


@needs_linux
def test_same_directory_default_is_own_executable_dir_and_warns_for_python(caplog):
    caplog.set_level(logging.WARNING, "machipc.policies")
    sd = SameDirectory()
    assert sd.directory == os.path.realpath(os.path.dirname(SELF_EXE))
    assert sd(me()).allowed
    if os.path.basename(SELF_EXE).startswith("python"):
        assert "Python interpreter" in caplog.text


def test_same_directory_needs_absolute_path():
    with pytest.raises(ValueError, match="absolute"):
        SameDirectory("relative/dir")


@needs_linux
def test_same_directory_denies_unknown_with_reason():
    d = SameDirectory("/usr/bin")(Peer(os.getpid(), 0, 0))
    assert not d.allowed and "no pidfd" in d.reason


# -- Allowlist -------------------------------------------------------------------------------------


@needs_linux
def test_allowlist_lists_and_semantics():
    p = me()
    digest = hashlib.sha256(open(SELF_EXE, "rb").read()).hexdigest()
    assert Allowlist(uids=[p.uid])(p).allowed
    assert not Allowlist(uids=[p.uid + 1])(p).allowed
    assert Allowlist(gids=[p.gid])(p).allowed
    assert Allowlist(executables=[SELF_EXE])(p).allowed
    assert Allowlist(sha256=[digest.upper()])(p).allowed
    assert not Allowlist(sha256=["0" * 64])(p).allowed
    # lists combine with AND
    both = Allowlist(uids=[p.uid], sha256=["0" * 64])(p)
    assert not both.allowed and "not an allowed digest" in both.reason
    assert Allowlist(uids=[p.uid], executables=[SELF_EXE], sha256=[digest])(p).allowed


def test_allowlist_refuses_mistakes():
    with pytest.raises(ValueError, match="at least one"):
        Allowlist()
    with pytest.raises(ValueError, match="allows nobody"):
        Allowlist(uids=[])
    with pytest.raises(ValueError, match="identifiers need team_ids"):
        Allowlist(identifiers=["org.example.helper"])
    with pytest.raises(ValueError, match="64 hex"):
        Allowlist(sha256=["abc"])
    with pytest.raises(ValueError, match="single string"):
        Allowlist(executables="/usr/bin/true")
    with pytest.raises(ValueError, match="absolute"):
        Allowlist(executables=["true"])
    with pytest.raises(ValueError, match="non-negative"):
        Allowlist(uids=[-1])


@needs_linux
def test_allowlist_team_ids_are_unknown_on_linux():
    d = Allowlist(team_ids=[TEAM], identifiers=["org.example.helper"])(me())
    assert d.state == "unknown" and "code signatures do not exist on linux" in d.reason


# -- CodeSignature -----------------------------------------------------------------------------------


def test_code_signature_never_allow_all():
    with pytest.raises(ValueError, match="exactly one"):
        CodeSignature()
    with pytest.raises(ValueError, match="without team_id"):
        CodeSignature(identifier="org.example.helper")
    with pytest.raises(ValueError, match="Team ID"):
        CodeSignature(team_id="short")
    with pytest.raises(ValueError, match="invalid signing identifier"):
        CodeSignature(identifier='x" or anchor apple generic or identifier "y', team_id=TEAM)
    with pytest.raises(ValueError, match="40 hex"):
        CodeSignature(cdhash="1234")
    with pytest.raises(ValueError, match="exactly one"):
        CodeSignature(requirement="anchor apple", team_id=TEAM)


def test_requirements_built_with_anchor_and_developer_id_markers():
    req = CodeSignature(identifier="org.example.helper", team_id=TEAM).requirement
    assert req.startswith('(identifier "org.example.helper") and anchor apple generic and ')
    assert "certificate 1[field.1.2.840.113635.100.6.2.6]" in req
    assert "certificate leaf[field.1.2.840.113635.100.6.1.13]" in req
    assert f'certificate leaf[subject.OU] = "{TEAM}"' in req
    assert CodeSignature(cdhash="AB" * 20).requirement == f'cdhash H"{"ab" * 20}"'
    with pytest.raises(ValueError, match="Team ID is required"):
        build_requirement(["org.example.helper"], [])


@needs_linux
def test_code_signature_on_linux_runs_nothing_from_path(stand_in, monkeypatch):
    """F7: a ``codesign`` that would exit 0, first on the server's PATH, is never run on Linux."""
    monkeypatch.setattr(code_signature, "MACOS", False)
    for policy in (CodeSignature(team_id=TEAM), ~CodeSignature(team_id=TEAM), Allowlist(team_ids=[TEAM])):
        d = evaluate(policy, me())
        assert d.state == "unknown" and "code signatures do not exist on linux" in d.reason, d
    assert stand_in() == []
    assert CodeSignature(team_id=TEAM).codesign_path() is None


def test_codesign_tool_must_be_an_absolute_path():
    with pytest.raises(ValueError, match="absolute"):
        CodeSignature(team_id=TEAM, codesign="codesign")


@needs_linux
def test_like_me_on_linux_denies_with_reason():
    d = CodeSignature.like_me()(me())
    assert d.state == "unknown" and "do not exist on linux" in d.reason
    assert evaluate(~CodeSignature.like_me(), me()).state == "unknown"


STAND_IN = textwrap.dedent(
    """\
    #!/bin/sh
    # Stand-in for macOS codesign: records its argv, checks that the path it was
    # given names the same bytes as $EXPECT_FILE, then exits with $CODESIGN_EXIT.
    for a in "$@"; do printf '%s\\n' "$a"; done > "$ARGV_LOG.$$"
    for last in "$@"; do :; done
    if cmp -s "$last" "$EXPECT_FILE"; then echo same > "$ARGV_LOG.$$.cmp"; else echo different > "$ARGV_LOG.$$.cmp"; fi
    if [ "$1" = "-dv" ]; then
        echo "Executable=$last" >&2
        echo "Identifier=org.example.other" >&2
        echo "TeamIdentifier=not set" >&2
        exit 0
    fi
    [ -n "$CODESIGN_SLEEP" ] && sleep "$CODESIGN_SLEEP"
    echo "stand-in: exit $CODESIGN_EXIT" >&2
    exit "$CODESIGN_EXIT"
    """
)


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A fake ``codesign``, first on PATH (Linux has none). With the module made to
    believe it runs on macOS (``mac_policy``) and the stand-in given as ``codesign=``,
    it proves the command line machipc builds for the macOS fallback and the
    exit-code mapping; it proves nothing about Apple's tool or Security.framework,
    which only a Mac can."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "codesign"
    tool.write_text(STAND_IN)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("ARGV_LOG", str(tmp_path / "argv"))
    monkeypatch.setenv("EXPECT_FILE", SELF_EXE)
    monkeypatch.setenv("CODESIGN_EXIT", "0")

    def calls():
        out = []
        for name in sorted(os.listdir(tmp_path)):
            if name.startswith("argv.") and not name.endswith(".cmp"):
                argv = (tmp_path / name).read_text().splitlines()
                out.append((argv, (tmp_path / f"{name}.cmp").read_text().strip()))
        return out

    calls.tool = str(tool)
    return calls


@pytest.fixture
def mac_policy(stand_in, monkeypatch):
    """``CodeSignature(...)`` taking its macOS fallback path, with the stand-in as the tool."""
    monkeypatch.setattr(code_signature, "MACOS", True)
    return lambda **kw: CodeSignature(codesign=stand_in.tool, **kw)


@needs_linux
def test_codesign_command_line_names_the_file_not_a_pid(stand_in, mac_policy):
    """Stand-in codesign: the argv is --verify --strict -R =<req> -- <exe path>,
    and that path names the very file the sender runs (never a bare pid)."""
    policy = mac_policy(identifier="org.example.helper", team_id=TEAM)
    d = policy(me())
    assert d.allowed, d.reason
    [(argv, same)] = stand_in()
    assert argv[:4] == ["--verify", "--strict", "-R", "=" + policy.requirement]
    assert argv[4] == "--" and argv[5] == SELF_EXE
    assert same == "same"
    assert not any(a == str(os.getpid()) for a in argv)


@needs_linux
@pytest.mark.parametrize("code", [1, 2, 3, 7])
def test_codesign_exit_codes_map_to_denials(stand_in, mac_policy, monkeypatch, code):
    """Stand-in codesign: every non-zero exit denies, with what the status means."""
    monkeypatch.setenv("CODESIGN_EXIT", str(code))
    d = mac_policy(team_id=TEAM)(me())
    assert not d.allowed
    meaning = CODESIGN_EXIT[code][1] if code in CODESIGN_EXIT else f"codesign exited with status {code}"
    assert meaning in d.reason and f"stand-in: exit {code}" in d.reason
    if code == 3:  # the denial tells how the code *is* signed (codesign -dv --verbose=4)
        assert "signed as identifier org.example.other, team none" in d.reason
        assert any(argv[:3] == ["-dv", "--verbose=4", "--"] and same == "same" for argv, same in stand_in())


@needs_linux
def test_codesign_timeout_is_unknown(mac_policy, monkeypatch):
    """Stand-in codesign that hangs: the check gives up: unknown, so denied."""
    monkeypatch.setenv("CODESIGN_SLEEP", "5")
    d = mac_policy(team_id=TEAM, timeout=0.3)(me())
    assert d.state == "unknown" and "did not answer" in d.reason


@needs_linux
def test_codesign_for_exited_sender_is_unknown(stand_in, mac_policy):
    proc = subprocess.Popen([shutil.which("true")])
    peer = Peer.from_pidfd(proc.pid, 0, 0, os.pidfd_open(proc.pid))
    proc.wait()
    d = mac_policy(team_id=TEAM)(peer)
    assert d.state == "unknown" and "unknown" in d.reason
    assert stand_in() == []  # codesign never ran on anything


def test_parse_codesign_display():
    text = textwrap.dedent(
        """\
        Executable=/Applications/Helper.app/Contents/MacOS/Helper
        Identifier=org.example.helper
        Format=app bundle with Mach-O thin (arm64)
        CodeDirectory v=20500 size=1234 flags=0x10000(runtime) hashes=28+7 location=embedded
        Hash type=sha256 size=32
        CDHash=0123456789ABCDEF0123456789ABCDEF01234567
        Signature size=8987
        Authority=Developer ID Application: Example Corp (ABCDE12345)
        Authority=Developer ID Certification Authority
        Authority=Apple Root CA
        TeamIdentifier=ABCDE12345
        """
    )
    info = parse_codesign_display(text)
    assert info["identifier"] == "org.example.helper" and info["team_id"] == TEAM
    assert info["authorities"][0].startswith("Developer ID Application") and len(info["authorities"]) == 3
    assert info["cdhash"] == "0123456789abcdef0123456789abcdef01234567" and not info["adhoc"]
    adhoc = parse_codesign_display("Identifier=a.out\nSignature=adhoc\nTeamIdentifier=not set\n")
    assert adhoc["adhoc"] and adhoc["team_id"] is None


# -- DecisionCache -----------------------------------------------------------------------------------


@needs_linux
def test_cache_evaluates_once_per_process():
    pol = Counting()
    cache = DecisionCache(pol)
    p = me()
    assert cache.decide(p).reason == "counting #1"
    assert cache.decide(p).reason == "counting #1" and pol.calls == 1
    assert cache.decide(me()).reason == "counting #1"  # another Peer of the same process
    assert p in cache and len(cache) == 1


@needs_linux
def test_cache_key_includes_credentials():
    """setuid() keeps pid and guard: a new uid must not reuse the old decision."""
    pol = Counting()
    cache = DecisionCache(pol)
    p = me()
    cache.decide(p)
    changed = Peer(p.pid, p.uid + 1, p.gid, -1, p.guard, p.guard_kind)
    cache.decide(changed)
    assert pol.calls == 2


@needs_linux
def test_cache_skips_unguarded_and_unknown_exe():
    pol = Counting(uses_exe=True)
    cache = DecisionCache(pol)
    bare = Peer(os.getpid(), 0, 0)
    cache.decide(bare)
    cache.decide(bare)
    assert pol.calls == 2 and len(cache) == 0


@needs_linux
def test_cache_sweeps_exited_processes_and_is_bounded():
    cache = DecisionCache(SameUser(), maxsize=4)
    procs = [subprocess.Popen([shutil.which("sleep"), "30"]) for _ in range(3)]
    peers = [Peer.from_pidfd(pr.pid, 0, 0, os.pidfd_open(pr.pid)) for pr in procs]
    for peer in peers:
        cache.decide(peer)
    cache.decide(me())
    assert len(cache) == 4
    procs[0].kill()
    procs[0].wait()
    assert cache.sweep() == 1 and len(cache) == 3
    cache.forget(peers[1])
    assert len(cache) == 2
    for pr in procs[1:]:
        pr.kill()
        pr.wait()
    fillers = [Peer(os.getpid(), uid, 0, -1, peers[0].guard + 1000 + uid, "pidfs-inode") for uid in range(5)]
    for f in fillers:  # unknown guards: every sweep drops them, the cap holds
        cache._store((f.pid, f.guard, f.uid, f.gid), Decision.allow("x"), f.guard_kind)
    assert len(cache) <= 4


def test_cache_maxsize_validated():
    with pytest.raises(ValueError):
        DecisionCache(SameUser(), maxsize=0)


@pytest.mark.parametrize("status, state", [(0, "allow"), (-67050, "deny"), (-67062, "deny"), (-67065, "unknown"), (-67063, "unknown")])
def test_security_framework_failures_other_than_a_no_are_unknown(monkeypatch, status, state):
    """macOS (simulated): "does not satisfy", "unsigned" deny; a gone process or a failed check is
    unknown, so ~CodeSignature(...) cannot turn it into an allow."""
    from machipc.policies import _macos

    monkeypatch.setattr(code_signature, "MACOS", True)
    monkeypatch.setattr(_macos, "check_token", lambda token, req: (status, f"status {status}"))
    peer = Peer.from_audit_token([501, 501, 20, 501, 20, 999, 100003, 12])
    assert evaluate(CodeSignature(team_id=TEAM), peer).state == state
    assert evaluate(~CodeSignature(team_id=TEAM), peer).state == {"allow": "deny", "deny": "allow"}.get(state, "unknown")
