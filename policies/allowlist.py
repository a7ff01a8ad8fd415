"""``Allowlist``: the sender matches lists of allowed identities."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Iterable, Optional

from machipc._printable import printable
from machipc.digest import MAX_HASH_BYTES

from .base import Decision, Policy
from .code_signature import CodeSignature, build_requirement
from .same_directory import same_file_problem

if TYPE_CHECKING:
    from machipc.peer import Peer

__all__ = ["Allowlist"]

_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def _ints(name: str, values: Optional[Iterable[int]]) -> Optional[frozenset[int]]:
    if values is None:
        return None
    out = frozenset(values)
    for v in out:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must hold non-negative integers, not {v!r}")
    return out


def _strs(name: str, values: Optional[Iterable[str]]) -> Optional[tuple[str, ...]]:
    if values is None:
        return None
    if isinstance(values, str):
        raise ValueError(f"{name} must be a list of strings, not the single string {values!r}")
    out = tuple(values)
    for v in out:
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must hold non-empty strings, not {v!r}")
    return out


class Allowlist(Policy):
    """Allow senders that match every list given (any entry of each list).

    * ``uids`` / ``gids``: the kernel-reported uid / gid (the primary gid;
      supplementary groups are not consulted);
    * ``executables``: exact executable paths (resolved here, once); the running
      file must be the file the path names in the server's mount namespace
      (same ``st_dev``/``st_ino``);
    * ``sha256``: SHA-256 digests (hex) of the executable file the process runs,
      as a list, or as a mapping ``{digest: size in bytes}`` (see
      :meth:`for_files`): then a sender whose file has none of those sizes is
      refused without reading it. Files over ``max_hash_bytes`` (default
      64 MiB, ``machipc.digest.MAX_HASH_BYTES``) are never read: such a sender
      is refused as unknown, so hashing a sender costs the server at most that
      much reading (once per file version; see machipc.digest);
    * ``team_ids`` (with optional ``identifiers``): macOS Developer ID code of
      one of these teams, checked as a code requirement against the audit token
      (see :class:`CodeSignature`); identifiers without a team are refused.

    Lists combine with AND: ``Allowlist(uids=[0], sha256=[d])`` is root running
    that file. For "root, or that file", write
    ``Allowlist(uids=[0]) | Allowlist(sha256=[d])``. An empty list allows nobody
    and is refused as a likely mistake.
    """

    uses_cgroup = uses_label = False

    def __init__(
        self,
        *,
        uids: Optional[Iterable[int]] = None,
        gids: Optional[Iterable[int]] = None,
        executables: Optional[Iterable[str]] = None,
        sha256: "Optional[Iterable[str] | Mapping[str, int]]" = None,
        team_ids: Optional[Iterable[str]] = None,
        identifiers: Optional[Iterable[str]] = None,
        max_hash_bytes: int = MAX_HASH_BYTES,
    ) -> None:
        self.uids = _ints("uids", uids)
        self.gids = _ints("gids", gids)
        exes = _strs("executables", executables)
        if exes is not None:
            for e in exes:
                if not os.path.isabs(e):
                    raise ValueError(f"executables must be absolute paths, not {e!r}")
        self.executables = None if exes is None else frozenset(os.path.realpath(e) for e in exes)
        digests = _strs("sha256", sha256)
        if digests is not None:
            digests = tuple(d.lower() for d in digests)
            for d in digests:
                if not _SHA256.match(d):
                    raise ValueError(f"sha256 entries are 64 hex digits, not {d!r}")
        self.sha256 = None if digests is None else frozenset(digests)
        #: Sizes of the allowed files (None: not known); only files of these sizes are hashed.
        self.sha256_sizes: Optional[frozenset[int]] = None
        if isinstance(sha256, Mapping):
            self.sha256_sizes = _ints("sha256 sizes", sha256.values())
        if max_hash_bytes < 0:
            raise ValueError(f"max_hash_bytes must be >= 0, not {max_hash_bytes}")
        self.max_hash_bytes = max_hash_bytes
        self.team_ids = _strs("team_ids", team_ids)
        self.identifiers = _strs("identifiers", identifiers)
        if self.identifiers is not None and self.team_ids is None:
            raise ValueError("identifiers need team_ids: an identifier alone can be claimed by anyone's signature")
        self._signature: Optional[CodeSignature] = None
        if self.team_ids is not None:
            self._signature = CodeSignature(requirement=build_requirement(self.identifiers or (), self.team_ids))
        lists = {
            "uids": self.uids,
            "gids": self.gids,
            "executables": self.executables,
            "sha256": self.sha256,
            "team_ids": self.team_ids,
            "identifiers": self.identifiers,
        }
        given = {k: v for k, v in lists.items() if v is not None}
        if not given:
            raise ValueError("Allowlist needs at least one of uids, gids, executables, sha256, team_ids, identifiers")
        for k, v in given.items():
            if not v:
                raise ValueError(f"Allowlist({k}=[]) allows nobody; leave {k} out instead")
        self._given = given
        self.uses_exe = any(k in given for k in ("executables", "sha256", "team_ids", "identifiers"))

    @classmethod
    def for_files(cls, paths: Iterable[str], **kwargs) -> "Allowlist":
        """Allow processes running a file with the same content as one of ``paths`` (read now).

        ``Allowlist(sha256={digest: size, ...})`` for those files, so senders of
        any other size are refused unread; ``kwargs`` go to the constructor.
        """
        sizes = {}
        for path in _strs("paths", paths) or ():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                sizes[h.hexdigest()] = f.tell()
        return cls(sha256=sizes, **kwargs)

    def check(self, peer: "Peer") -> Decision:
        reasons = []
        if self.uids is not None:
            if peer.uid not in self.uids:
                return Decision.deny(f"uid {peer.uid} is not in the allowed uids {sorted(self.uids)}")
            reasons.append(f"uid {peer.uid} allowed")
        if self.gids is not None:
            if peer.gid not in self.gids:
                return Decision.deny(f"gid {peer.gid} is not in the allowed gids {sorted(self.gids)}")
            reasons.append(f"gid {peer.gid} allowed")
        if self.executables is not None:
            exe, ident = peer.exe, peer.exe_id
            if exe is None or ident is None:
                return Decision.unknown(f"pid {peer.pid}: {peer.unknown_reason}; not known to be an allowed executable")
            if exe not in self.executables:
                return Decision.deny(f"executable {printable(exe)} is not an allowed executable")
            mismatch = same_file_problem(exe, ident)
            if mismatch is not None:
                return Decision.deny(mismatch)
            reasons.append(f"executable {printable(exe)} allowed")
        if self.sha256 is not None:
            digest = peer.exe_digest(self.max_hash_bytes, self.sha256_sizes)
            if digest is None:
                return Decision.unknown(f"pid {peer.pid}: {peer.unknown_reason}; its digest is not known to be allowed")
            if digest not in self.sha256:
                return Decision.deny(f"executable {printable(str(peer.exe))} has sha256 {digest}, not an allowed digest")
            reasons.append(f"sha256 {digest[:16]}... allowed")
        if self._signature is not None:
            d = self._signature.check(peer)
            if not d.allowed:
                return d
            reasons.append(d.reason)
        return Decision.allow("; ".join(reasons))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={sorted(v)!r}" for k, v in self._given.items())
        return f"Allowlist({inner})"
