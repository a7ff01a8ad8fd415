"""``CodeSignature``: the sender's code satisfies a macOS code requirement.

On macOS the check is bound to the sender's audit token through
Security.framework (``SecCodeCopyGuestWithAttributes`` with
``kSecGuestAttributeAudit``, ``SecRequirementCreateWithString``,
``SecCodeCheckValidity``): it judges the code of exactly the process that sent
the message, as the kernel runs it. That is a real security boundary.

When Security.framework cannot be used, the ``codesign`` tool is the fallback
(and the diagnostic): ``codesign --verify --strict -R =<requirement> -- <path>``
on the audit-token path of the very file the process runs, checked to be the
same file before and after, never a bare pid, which ``codesign`` would resolve
on its own, racily. Exit codes:
0 valid, 1 invalid, 2 usage error, 3 requirement not met; anything else, a
timeout or a missing tool denies.

Without macOS there are no code signatures: the policy's decision is always
*unknown* (it denies, also under ``Not``), with that reason, and it runs
nothing. On macOS the fallback runs ``/usr/bin/codesign`` (never a ``codesign``
found on ``PATH``) or an absolute ``codesign=`` path given by the caller.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import TYPE_CHECKING, Optional, Sequence

from machipc._printable import printable

from .base import Decision, Policy

if TYPE_CHECKING:
    from machipc.peer import Peer

__all__ = ["CodeSignature", "build_requirement", "parse_codesign_display", "DEVELOPER_ID_MARKERS"]

MACOS = sys.platform == "darwin"

_TEAM_ID = re.compile(r"[A-Z0-9]{10}\Z")
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")
_CDHASH = re.compile(r"[0-9a-f]{40}\Z")

#: A Developer ID Application certificate: issued by the Developer ID CA
#: (1.2.840.113635.100.6.2.6) with the Developer ID Application marker
#: (1.2.840.113635.100.6.1.13) on the leaf.
DEVELOPER_ID_MARKERS = (
    "certificate 1[field.1.2.840.113635.100.6.2.6] /* exists */ and "
    "certificate leaf[field.1.2.840.113635.100.6.1.13] /* exists */"
)

#: Security.framework statuses that say the code is known not to qualify (others: cannot tell).
_KNOWN_NO = frozenset({-67050, -67062, -67061})  # errSecCSReqFailed, errSecCSUnsigned, errSecCSSignatureFailed

#: codesign exit status -> (allowed, what it means)
CODESIGN_EXIT = {
    0: (True, "satisfies the requirement"),
    1: (False, "signature invalid or verification failed"),
    2: (False, "codesign usage error (bad arguments or requirement text)"),
    3: (False, "does not satisfy the requirement"),
}


def _check_team(team_id: str) -> str:
    if not isinstance(team_id, str) or not _TEAM_ID.match(team_id):
        raise ValueError(f"a Team ID is 10 capital letters or digits, not {team_id!r}")
    return team_id


def _check_identifier(identifier: str) -> str:
    if not isinstance(identifier, str) or not _IDENTIFIER.match(identifier):
        raise ValueError(f"invalid signing identifier {identifier!r} (letters, digits, '.', '_', '-')")
    return identifier


def build_requirement(identifiers: Sequence[str] = (), team_ids: Sequence[str] = ()) -> str:
    """A code requirement for Developer ID code of one of ``team_ids`` (and one of ``identifiers``).

    A Team ID alone is never enough: the requirement also demands an Apple
    anchor and the Developer ID markers, and a team is mandatory.
    """
    if not team_ids:
        raise ValueError(
            "a Team ID is required: an identifier alone (or 'anchor apple generic' alone) "
            "can be claimed by code anyone signed"
        )
    teams = " or ".join(f'certificate leaf[subject.OU] = "{_check_team(t)}"' for t in team_ids)
    parts = ["anchor apple generic", DEVELOPER_ID_MARKERS, f"({teams})"]
    if identifiers:
        idents = " or ".join(f'identifier "{_check_identifier(i)}"' for i in identifiers)
        parts.insert(0, f"({idents})")
    return " and ".join(parts)


def parse_codesign_display(text: str) -> dict:
    """Parse ``codesign -dv --verbose=4`` output (it goes to stderr).

    Returns ``identifier``, ``team_id`` (None for "not set"), ``authorities``
    (leaf first), ``cdhash``, ``adhoc`` and every other ``Key=value`` line
    under its own name.
    """
    info: dict = {"identifier": None, "team_id": None, "authorities": [], "cdhash": None, "adhoc": False}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "Identifier":
            info["identifier"] = value
        elif key == "TeamIdentifier":
            info["team_id"] = None if value == "not set" else value
        elif key == "Authority":
            info["authorities"].append(value)
        elif key == "CDHash":
            info["cdhash"] = value.lower()
        elif key == "Signature" and value == "adhoc":
            info["adhoc"] = True
        else:
            info.setdefault(key, value)
    return info


class CodeSignature(Policy):
    """Allow senders whose code satisfies a code-signing requirement (macOS).

    Give exactly one of:

    * ``requirement``: requirement text, e.g. ``'anchor apple generic and
      identifier "org.example.helper" and certificate leaf[subject.OU] = "ABCDE12345"'``;
    * ``team_id`` (and optionally ``identifier``): Developer ID code of that
      team, built with :func:`build_requirement`;
    * ``cdhash``: pinned ad-hoc mode, exactly this code directory hash
      (40 hex digits), for ad-hoc signed helpers.

    An ``identifier`` without a team, or nothing at all, is refused: this
    policy never turns into allow-all.
    """

    uses_exe = True
    uses_cgroup = uses_label = False

    def __init__(
        self,
        requirement: Optional[str] = None,
        identifier: Optional[str] = None,
        team_id: Optional[str] = None,
        *,
        cdhash: Optional[str] = None,
        codesign: Optional[str] = None,
        timeout: float = 10.0,
    ) -> None:
        given = [x is not None for x in (requirement, team_id or identifier, cdhash)]
        if sum(given) != 1:
            raise ValueError("CodeSignature needs exactly one of requirement=, team_id= (with identifier=), or cdhash=")
        if requirement is not None:
            if not isinstance(requirement, str) or not requirement.strip():
                raise ValueError("requirement must be non-empty requirement text")
            if "\0" in requirement:
                raise ValueError("requirement text must not contain NUL")
        elif cdhash is not None:
            cdhash = cdhash.lower()
            if not _CDHASH.match(cdhash):
                raise ValueError(f"cdhash must be 40 hex digits, not {cdhash!r}")
            requirement = f'cdhash H"{cdhash}"'
        else:
            if team_id is None:
                raise ValueError(
                    f"identifier={identifier!r} without team_id: a missing team fails closed "
                    "(anyone can sign code with any identifier); give team_id= or requirement="
                )
            requirement = build_requirement([identifier] if identifier else [], [team_id])
        self.requirement: str = requirement
        self.identifier = identifier
        self.team_id = team_id
        self.cdhash = cdhash
        self.timeout = timeout
        if codesign is not None and not os.path.isabs(codesign):
            raise ValueError(f"codesign must be an absolute path (PATH is never searched), not {codesign!r}")
        self._codesign = codesign
        self._unusable: Optional[str] = None

    @classmethod
    def like_me(cls) -> "Policy":
        """Code signed like this server: same Developer ID team, or the server's designated requirement.

        An ad-hoc signed server pins its own cdhash. An unsigned server (and
        every Linux server) gets a policy that denies everyone, saying why.
        Beware the interpreter trap: a Python daemon is "signed like" its
        interpreter (python.org's build is signed by the PSF), not like itself.
        """
        if not MACOS:
            return _Never(f"CodeSignature.like_me(): code signatures do not exist on {sys.platform}")
        from . import _macos

        try:
            info = _macos.self_signing_info()
            designated = _macos.self_designated_requirement()
        except OSError as exc:
            return _Never(f"CodeSignature.like_me(): cannot read the server's own signature: {exc}")
        team, cdhash = info.get("team_id"), info.get("cdhash")
        if team:
            req = build_requirement([], [team])
            if designated:
                req = f"({req}) or ({designated})"
            return cls(requirement=req)
        if cdhash:
            return cls(cdhash=cdhash)
        return _Never("CodeSignature.like_me(): the server itself is not code-signed, so there is nothing to match")

    # -- checking -------------------------------------------------------------

    def check(self, peer: "Peer") -> Decision:
        if not MACOS:
            return Decision.unknown(
                f"code signatures do not exist on {sys.platform}: pid {peer.pid}'s code cannot be checked "
                f"against {self.requirement!r}"
            )
        if peer.pin_problem is not None:
            return Decision.unknown(f"pid {peer.pid}: {peer.pin_problem}")
        if peer.audit_token is not None:
            decision = self._check_security_framework(peer)
            if decision is not None:
                return decision
        return self._check_codesign(peer)

    def _check_security_framework(self, peer: "Peer") -> Optional[Decision]:
        from . import _macos

        try:
            status, text = _macos.check_token(peer.audit_token, self.requirement)
        except _macos.FrameworkUnavailable as exc:  # framework missing or symbol absent: the only fallback case
            self._unusable = f"Security.framework unusable ({exc}); using codesign"
            return None
        # Any other Security.framework failure came back as a status (never an allow below),
        # never a fall back to the path-based codesign check (macOS review finding 12).
        if status == 0:
            return Decision.allow(f"pid {peer.pid}'s code satisfies {self.requirement!r}")
        said = f"pid {peer.pid}'s code: {text} (requirement {self.requirement!r})"
        if status in _KNOWN_NO:
            return Decision.deny(said)
        return Decision.unknown(said)  # the process is gone, the check failed, ...: cannot tell

    def codesign_path(self) -> Optional[str]:
        """The ``codesign`` tool of the macOS fallback: ``codesign=`` if given, else
        ``/usr/bin/codesign``; None where there is none (and always off macOS).

        ``PATH`` is never searched: a server must not run whatever a directory on
        its ``PATH`` holds under that name.
        """
        if not MACOS:
            return None
        if self._codesign:
            return self._codesign
        return "/usr/bin/codesign" if os.path.exists("/usr/bin/codesign") else None

    def _check_codesign(self, peer: "Peer") -> Decision:
        tool = self.codesign_path()
        if tool is None:
            return Decision.unknown(f"cannot check pid {peer.pid}'s code signature: no /usr/bin/codesign")
        with _RaceFreePath(peer) as target:
            if target.path is None:
                return Decision.unknown(f"pid {peer.pid}: {target.error}")
            argv = [tool, "--verify", "--strict", "-R", "=" + self.requirement, "--", target.path]
            try:
                done = subprocess.run(
                    argv,
                    capture_output=True,
                    timeout=self.timeout,
                    stdin=subprocess.DEVNULL,
                )
            except subprocess.TimeoutExpired:
                return Decision.unknown(f"codesign did not answer within {self.timeout} s for pid {peer.pid}")
            except OSError as exc:
                return Decision.unknown(f"cannot run {tool}: {exc.strerror or exc}")
            still = target.still_same()
        if still is not None:
            return Decision.unknown(f"pid {peer.pid}: {still}")
        allowed, meaning = CODESIGN_EXIT.get(done.returncode, (False, f"codesign exited with status {done.returncode}"))
        detail = _last_line(done.stderr)
        what = f"{printable(target.shown)} (pid {peer.pid}) {meaning}"
        if allowed:
            return Decision.allow(f"{what}: {self.requirement!r}")
        if done.returncode == 3:
            signed = self.describe(peer)
            if signed:
                what += f" (signed as identifier {signed.get('identifier')}, team {signed.get('team_id') or 'none'})"
        return Decision.deny(f"{what}: {self.requirement!r}" + (f" [{printable(detail)}]" if detail else ""))

    def describe(self, peer: "Peer") -> dict:
        """``codesign -dv --verbose=4`` of the sender's executable, parsed (empty if unavailable)."""
        tool = self.codesign_path()
        if tool is None:
            return {}
        with _RaceFreePath(peer) as target:
            if target.path is None:
                return {}
            try:
                done = subprocess.run(
                    [tool, "-dv", "--verbose=4", "--", target.path],
                    capture_output=True,
                    timeout=self.timeout,
                    stdin=subprocess.DEVNULL,
                )
            except (OSError, subprocess.TimeoutExpired):
                return {}
            if target.still_same() is not None:
                return {}
        return parse_codesign_display(done.stderr.decode("utf-8", "replace"))

    def __repr__(self) -> str:
        return f"CodeSignature(requirement={self.requirement!r})"


class _RaceFreePath:
    """The path of the very file a process runs, for a tool that takes paths (macOS).

    The kernel-reported (audit-token) path, with the same (dev, inode)
    required before and after the tool ran, and the process required to be
    the same.
    """

    def __init__(self, peer: "Peer") -> None:
        self.peer = peer
        self.path: Optional[str] = None
        self.shown = "executable"
        self.error = ""
        self._ident: Optional[tuple[int, int]] = None

    def __enter__(self) -> "_RaceFreePath":
        peer = self.peer
        ident = peer.exe_id
        exe = peer.exe
        if ident is None or exe is None:
            self.error = str(peer.unknown_reason or "executable unknown")
            return self
        self._ident, self.shown, self.path = ident, exe, exe
        return self

    def still_same(self) -> Optional[str]:
        """None if the checked file is still the one the same process runs, else why not."""
        if not self.peer.is_alive():
            return "unknown: the process exited during the check"
        if self.peer.refresh_exe() != self._ident:
            return "the process exec'd another program during the check"
        try:
            st = os.stat(self.path)  # type: ignore[arg-type]
        except OSError as exc:
            return f"{printable(str(self.path))} vanished during the check: {exc.strerror}"
        if (st.st_dev, st.st_ino) != self._ident:
            return f"{printable(str(self.path))} was replaced during the check"
        return None

    def __exit__(self, *exc_info) -> None:
        pass


def _last_line(data: bytes) -> str:
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


class _Never(Policy):
    """Denies everyone with a fixed reason (what ``like_me()`` gives where nothing can match)."""

    uses_exe = uses_cgroup = uses_label = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def check(self, peer: "Peer") -> Decision:
        return Decision.unknown(self.reason)

    def __repr__(self) -> str:
        return f"<CodeSignature that denies: {self.reason}>"
