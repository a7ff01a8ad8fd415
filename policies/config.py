"""``load(path)``: a policy from a TOML file, for daemons configured by admins.

The file holds one ``[policy]`` table. A policy is a table whose keys name
policies; several keys in one table must all allow (AND)::

    # root, or our own signed helper
    [policy]
    any_of = [
      { allowlist = { uids = [0] } },
      { code_signature = { identifier = "org.example.helper", team_id = "ABCDE12345" } },
    ]

Keys: ``same_user`` (true, or ``{ uid = N }``), ``same_directory`` (true for
the server's own directory, or a path), ``code_signature`` (``"like_me"``, or
a table of ``requirement``/``identifier``/``team_id``/``cdhash``),
``allowlist`` (a table of ``uids``, ``gids``, ``executables``, ``sha256``,
``team_ids``, ``identifiers``), ``systemd_unit`` (unit names), ``cgroup``
(cgroup paths), ``security_label`` (LSM labels) -- each a string or an array
of strings --, ``allow_all`` (true), ``all_of`` / ``any_of`` (arrays of
policies) and ``not`` (a policy).

Errors name the file, the line when it can be found, and the key path
(``policy.any_of[1].code_signature.team_id``).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from machipc.errors import InvalidArgument

from .allowlist import Allowlist
from .base import AllOf, AllowAll, AnyOf, Not, Policy, SameUser
from .code_signature import CodeSignature
from .same_directory import SameDirectory
from .security_label import SecurityLabel
from .systemd_unit import Cgroup, SystemdUnit

__all__ = ["load", "loads", "PolicyFileError"]

_LINE_COL = re.compile(r"\(at line (\d+), column (\d+)\)")

Path = tuple[Union[str, int], ...]


class PolicyFileError(InvalidArgument):
    """A policy file is not valid TOML or does not describe a policy.

    ``path``, ``line`` (1-based, or None when unknown) and ``key`` (the key
    path inside the file) say where.
    """

    def __init__(self, path: str, line: Optional[int], key: str, message: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {key + ': ' if key else ''}{message}")
        self.path, self.line, self.key, self.message = path, line, key, message


class _Loader:
    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    # -- error reporting ---------------------------------------------------------

    def fail(self, at: Path, message: str) -> PolicyFileError:
        return PolicyFileError(self.source, self._line_of(at), _key_text(at), message)

    def _line_of(self, at: Path) -> Optional[int]:
        """Best effort: follow the key names of ``at`` through the text, in order."""
        line = 0
        found = None
        for part in at:
            if not isinstance(part, str):
                continue
            pattern = re.compile(rf"""(?<![\w-])(?:{re.escape(part)}|"{re.escape(part)}"|'{re.escape(part)}')\s*(?:=|\.|\])""")
            for i in range(line, len(self.lines)):
                text = self.lines[i].split("#", 1)[0]
                if pattern.search(text):
                    line = i
                    found = i + 1
                    break
            else:
                return found
        return found

    # -- building ------------------------------------------------------------------

    def document(self, data: dict) -> Policy:
        extra = sorted(set(data) - {"policy"})
        if extra:
            raise self.fail((extra[0],), f"unknown top-level key {extra[0]!r}; the file holds one [policy] table")
        if "policy" not in data:
            raise self.fail((), "no [policy] table")
        return self.policy(data["policy"], ("policy",))

    def policy(self, node: Any, at: Path) -> Policy:
        if not isinstance(node, dict):
            raise self.fail(at, f"a policy is a table, not {_type(node)}")
        if not node:
            raise self.fail(at, "empty policy table: name at least one policy (" + ", ".join(sorted(_BUILDERS)) + ")")
        parts = []
        for key, value in node.items():
            builder = _BUILDERS.get(key)
            if builder is None:
                raise self.fail(at + (key,), f"unknown policy {key!r}; known: {', '.join(sorted(_BUILDERS))}")
            parts.append(builder(self, value, at + (key,)))
        return parts[0] if len(parts) == 1 else AllOf(*parts)

    def construct(self, at: Path, factory: Callable[..., Policy], **kwargs: Any) -> Policy:
        try:
            return factory(**kwargs)
        except (TypeError, ValueError) as exc:
            raise self.fail(at, str(exc)) from None

    def table(self, value: Any, at: Path, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(at, f"expected a table, not {_type(value)}")
        for key in value:
            if key not in allowed:
                raise self.fail(at + (key,), f"unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")
        return value

    def true_flag(self, value: Any, at: Path) -> None:
        if value is not True:
            raise self.fail(at, f"expected true, not {_show(value)} (remove the key to leave the policy out)")

    def list_of(self, value: Any, at: Path, kind: type) -> list:
        if not isinstance(value, list):
            raise self.fail(at, f"expected an array of {kind.__name__}, not {_type(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, kind) or isinstance(item, bool):
                raise self.fail(at + (i,), f"expected {kind.__name__}, not {_type(item)}")
        return value

    def string(self, value: Any, at: Path) -> str:
        if not isinstance(value, str):
            raise self.fail(at, f"expected a string, not {_type(value)}")
        return value


def _same_user(ld: _Loader, value: Any, at: Path) -> Policy:
    if value is True:
        return SameUser()
    if isinstance(value, bool):
        ld.true_flag(value, at)
    table = ld.table(value, at, {"uid"})
    uid = table.get("uid")
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
        raise ld.fail(at + ("uid",), f"expected a non-negative integer, not {_show(uid)}")
    return SameUser(uid)


def _allow_all(ld: _Loader, value: Any, at: Path) -> Policy:
    ld.true_flag(value, at)
    return AllowAll()


def _same_directory(ld: _Loader, value: Any, at: Path) -> Policy:
    if value is True:
        return ld.construct(at, SameDirectory)
    if isinstance(value, bool):
        ld.true_flag(value, at)
    if isinstance(value, dict):
        value = ld.table(value, at, {"directory"}).get("directory")
        at = at + ("directory",)
    return ld.construct(at, SameDirectory, directory=ld.string(value, at))


def _code_signature(ld: _Loader, value: Any, at: Path) -> Policy:
    if value == "like_me":
        return CodeSignature.like_me()
    if isinstance(value, str):
        raise ld.fail(at, f'expected "like_me" or a table, not the string {value!r}')
    table = ld.table(value, at, {"requirement", "identifier", "team_id", "cdhash"})
    kwargs = {k: ld.string(v, at + (k,)) for k, v in table.items()}
    return ld.construct(at, CodeSignature, **kwargs)


_ALLOWLIST_KINDS = {"uids": int, "gids": int, "executables": str, "sha256": str, "team_ids": str, "identifiers": str}


def _allowlist(ld: _Loader, value: Any, at: Path) -> Policy:
    table = ld.table(value, at, set(_ALLOWLIST_KINDS))
    kwargs = {k: ld.list_of(v, at + (k,), _ALLOWLIST_KINDS[k]) for k, v in table.items()}
    return ld.construct(at, Allowlist, **kwargs)


def _names(factory: Callable[..., Policy]) -> Callable[[_Loader, Any, Path], Policy]:
    """A policy built from one string or a non-empty array of strings."""

    def build(ld: _Loader, value: Any, at: Path) -> Policy:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ld.fail(at, f"expected a string or a non-empty array of strings, not {_show(value)}")
        ld.list_of(value, at, str)
        try:
            return factory(*value)
        except ValueError as exc:
            raise ld.fail(at, str(exc)) from None

    return build


def _combination(cls: type) -> Callable[[_Loader, Any, Path], Policy]:
    def build(ld: _Loader, value: Any, at: Path) -> Policy:
        if not isinstance(value, list) or not value:
            raise ld.fail(at, f"expected a non-empty array of policies, not {_show(value)}")
        return cls(*(ld.policy(item, at + (i,)) for i, item in enumerate(value)))

    return build


def _not(ld: _Loader, value: Any, at: Path) -> Policy:
    return Not(ld.policy(value, at))


_BUILDERS: dict[str, Callable[[_Loader, Any, Path], Policy]] = {
    "same_user": _same_user,
    "allow_all": _allow_all,
    "same_directory": _same_directory,
    "code_signature": _code_signature,
    "allowlist": _allowlist,
    "systemd_unit": _names(SystemdUnit),
    "cgroup": _names(Cgroup),
    "security_label": _names(SecurityLabel),
    "all_of": _combination(AllOf),
    "any_of": _combination(AnyOf),
    "not": _not,
}


def _key_text(at: Path) -> str:
    out = ""
    for part in at:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _type(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean", int: "an integer", float: "a float"}.get(
        type(value), type(value).__name__
    )


def _show(value: Any) -> str:
    return "nothing" if value is None else f"{_type(value)} ({value!r})"


def loads(text: str, source: str = "<string>") -> Policy:
    """The policy described by TOML ``text`` (``source`` names it in errors)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _LINE_COL.search(str(exc))
        message = _LINE_COL.sub("", str(exc)).strip()
        raise PolicyFileError(source, int(m.group(1)) if m else None, "", f"invalid TOML: {message}" + (f" (column {m.group(2)})" if m else "")) from None
    return _Loader(text, source).document(data)


def load(path: Union[str, "os.PathLike[str]"]) -> Policy:
    """The policy described by the TOML file at ``path``.

    Raises PolicyFileError (an InvalidArgument, so a ValueError) naming the
    file, line and key, and OSError when the file cannot be read.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PolicyFileError(path, line, "", "not UTF-8 text") from None
    return loads(text, path)
