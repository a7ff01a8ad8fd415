"""Service names and where their sockets live.

A name maps to a socket path:

1. ``$MACHIPC_RUNTIME_DIR/<name>`` when that variable is set;
2. else ``$XDG_RUNTIME_DIR/machipc/<name>`` (directory created 0700);
3. else, for root, ``/run/machipc/<name>`` (directory created 0755);
4. else ``/tmp/machipc-<uid>/<name>`` (created 0700, refused if another user owns it).

Directories and sockets owned by someone other than the expected user are
refused, so nobody can squat a name and impersonate a daemon.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Optional

from .errors import InvalidArgument, NotPermitted

__all__ = ["validate_name", "runtime_dir", "service_path", "check_socket_owner", "SUN_PATH_MAX"]

#: sun_path is 108 bytes on Linux including the terminating NUL.
SUN_PATH_MAX = 107
NAME_MAX = 100
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid service name, else raise InvalidArgument.

    Names are 1-100 characters of letters, digits, ``.``, ``_`` and ``-``, not
    starting with ``.`` or ``-`` (reverse-DNS style: ``org.example.echo``).
    """
    if not isinstance(name, str):
        raise InvalidArgument(f"service name must be a str, not {type(name).__name__}")
    if not name or len(name) > NAME_MAX or not _NAME.match(name):
        raise InvalidArgument(
            f"invalid service name {name!r}: use 1-{NAME_MAX} letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-' (e.g. 'org.example.echo')"
        )
    return name


def _ensure_dir(path: str, mode: int, create: bool) -> str:
    uid = os.geteuid()
    if create:
        try:
            os.makedirs(path, mode=mode, exist_ok=True)
        except PermissionError as exc:
            raise NotPermitted(f"cannot create the runtime directory {path}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path  # a client looking up a name in a directory nobody made yet
    if not stat.S_ISDIR(st.st_mode):
        raise NotPermitted(f"{path} should be a directory but is not (squatted?)")
    if st.st_uid not in (uid, 0):
        raise NotPermitted(f"{path} is owned by uid {st.st_uid}, not by you ({uid}) or root: refusing it")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise NotPermitted(f"{path} is writable by others (mode {st.st_mode & 0o7777:o}): refusing it")
    return path


def runtime_dir(create: bool = False) -> str:
    """The directory holding this user's service sockets (see the module doc)."""
    explicit = os.environ.get("MACHIPC_RUNTIME_DIR")
    if explicit:
        return _ensure_dir(explicit, 0o755, create)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return _ensure_dir(os.path.join(xdg, "machipc"), 0o700, create)
    if os.geteuid() == 0:
        return _ensure_dir("/run/machipc", 0o755, create)
    return _ensure_dir(f"/tmp/machipc-{os.geteuid()}", 0o700, create)


def service_path(name: str, create_dir: bool = False, directory: Optional[str] = None) -> str:
    """Socket path for service ``name``; raises InvalidArgument if it is too long."""
    validate_name(name)
    path = os.path.join(directory or runtime_dir(create_dir), name)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise InvalidArgument(
            f"socket path {path!r} is longer than {SUN_PATH_MAX} bytes; use a shorter name "
            "or set MACHIPC_RUNTIME_DIR to a shorter directory"
        )
    return path


def check_socket_owner(path: str, allowed_uids: tuple[int, ...]) -> os.stat_result:
    """lstat ``path`` and refuse it unless it is a socket owned by one of ``allowed_uids``.

    Raises FileNotFoundError (from lstat) when nothing is there.
    """
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise NotPermitted(f"{path} exists and is not a socket: refusing to use or replace it")
    if st.st_uid not in allowed_uids:
        raise NotPermitted(
            f"{path} is owned by uid {st.st_uid}, expected one of {sorted(set(allowed_uids))}: "
            "another user may be squatting this service name"
        )
    return st
