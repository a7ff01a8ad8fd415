"""machipc.policies.load: TOML policy files and their error messages."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

import machipc
from machipc.peer import Peer
from machipc.policies import AllOf, Allowlist, AnyOf, CodeSignature, Not, PolicyFileError, SameDirectory, SameUser, load

needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux pidfd")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def me() -> Peer:
    return Peer.from_pidfd(os.getpid(), os.geteuid(), os.getegid(), os.pidfd_open(os.getpid()))


def test_root_or_signed_helper(tmp_path):
    policy = load(
        write(
            tmp_path,
            """\
            # only my own signed helper or root may talk to me
            [policy]
            any_of = [
              { allowlist = { uids = [0] } },
              { code_signature = { identifier = "org.example.helper", team_id = "ABCDE12345" } },
            ]
            """,
        )
    )
    assert isinstance(policy, AnyOf)
    a, c = policy.policies
    assert isinstance(a, Allowlist) and a.uids == {0}
    assert isinstance(c, CodeSignature) and 'identifier "org.example.helper"' in c.requirement


@needs_linux
def test_several_keys_are_all_of_and_behave(tmp_path):
    exe_dir = os.path.dirname(os.readlink("/proc/self/exe"))
    policy = load(
        write(
            tmp_path,
            f"""\
            [policy]
            same_user = true
            same_directory = "{exe_dir}"

            [policy.not]
            allowlist.uids = [12345]
            """,
        )
    )
    assert isinstance(policy, AllOf)
    kinds = [type(p) for p in policy.policies]
    assert kinds == [SameUser, SameDirectory, Not]
    assert policy(me()).allowed


def test_every_key(tmp_path):
    policy = load(
        write(
            tmp_path,
            """\
            [policy]
            all_of = [
              { same_user = { uid = 501 } },
              { same_directory = { directory = "/opt/example" } },
              { code_signature = { cdhash = "0123456789abcdef0123456789abcdef01234567" } },
              { code_signature = { requirement = 'anchor apple generic and identifier "x"' } },
              { allowlist = { gids = [20], executables = ["/opt/example/helper"], sha256 = ["%s"] } },
              { not = { allow_all = true } },
              { code_signature = "like_me" },
            ]
            """
            % ("ab" * 32),
        )
    )
    assert isinstance(policy, AllOf) and len(policy.policies) == 7
    assert policy.policies[0].uid == 501


@pytest.mark.parametrize(
    "text, line, key, message",
    [
        ("[policy]\nsame_user = \n", 2, "", "invalid TOML"),
        ("[policy]\nsame_usr = true\n", 2, "policy.same_usr", "unknown policy 'same_usr'"),
        ("[policy]\nsame_user = false\n", 2, "policy.same_user", "expected true, not a boolean (False)"),
        ("[policy]\nsame_directory = false\n", 2, "policy.same_directory", "remove the key"),
        ("[polcy]\nsame_user = true\n", 1, "polcy", "unknown top-level key"),
        ("# nothing\n", None, "", "no [policy] table"),
        ("[policy]\n", 1, "policy", "empty policy table"),
        (
            '[policy]\nany_of = [\n  { same_user = true },\n  { code_signature = { team_id = "abc" } },\n]\n',
            4,
            "policy.any_of[1].code_signature",
            "Team ID is 10 capital letters",
        ),
        (
            '[policy]\nany_of = [\n  { same_user = true },\n  { code_signature = { identifier = "org.x" } },\n]\n',
            4,
            "policy.any_of[1].code_signature",
            "missing team fails closed",
        ),
        ("[policy]\nallowlist = { uids = [0, \"root\"] }\n", 2, "policy.allowlist.uids[1]", "expected int, not a string"),
        ("[policy]\nallowlist = { uids = [] }\n", 2, "policy.allowlist", "allows nobody"),
        ("[policy]\nallowlist = { users = [0] }\n", 2, "policy.allowlist.users", "unknown key 'users'"),
        ("[policy]\nany_of = []\n", 2, "policy.any_of", "non-empty array"),
        ("[policy]\nsame_directory = \"relative\"\n", 2, "policy.same_directory", "absolute"),
        ("[policy]\ncode_signature = \"like_you\"\n", 2, "policy.code_signature", '"like_me" or a table'),
        ("[policy]\nnot = [1]\n", 2, "policy.not", "a policy is a table, not an array"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path, text, line, key, message):
    path = str(tmp_path / "bad.toml")
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(PolicyFileError) as info:
        load(path)
    err = info.value
    assert err.path == path and err.line == line and err.key == key
    assert message in str(err)
    assert str(err).startswith(f"{path}:{line}: " if line else f"{path}: ")
    assert isinstance(err, machipc.InvalidArgument) and isinstance(err, ValueError)


def test_toml_syntax_error_has_column(tmp_path):
    with pytest.raises(PolicyFileError, match=r"policy.toml:3: invalid TOML: .*\(column \d+\)"):
        load(write(tmp_path, "[policy]\nsame_user = true\nsame_user = true\n"))


def test_not_utf8_and_missing_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[policy]\n# caf\xe9\n")
    with pytest.raises(PolicyFileError, match=r"latin1.toml:2: not UTF-8"):
        load(path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.toml")
