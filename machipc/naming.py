"""Service names and where their sockets live (Linux).

Two kinds of directory hold service sockets, the way D-Bus has a system and a
session bus:

* the **system directory**, ``/run/machipc`` (``$MACHIPC_SYSTEM_DIR`` overrides
  it, for tests and unusual layouts): root's services and those of
  ``machipc unit``. Created ``0755`` and owned by root, so every user can reach
  the services in it and nobody but root can add one.
* the **per-user directory** of a non-root user: ``$XDG_RUNTIME_DIR/machipc``,
  else ``/tmp/machipc-UID``. Created ``0700``; it must be owned by that user.

A server binds in ``$MACHIPC_RUNTIME_DIR`` when that is set, else in the system
directory when it runs as root, else in its user's per-user directory.

A client looks a name up in ``$MACHIPC_RUNTIME_DIR`` alone when that is set;
otherwise first in its own per-user directory (only services it owns can be
there, so they shadow nothing that is not its own), then in the system
directory. Root's per-user directory is the system directory.

Directories are refused when owned by someone else (another user created
``/tmp/machipc-UID`` first: the error names that user and the fix) or when
writable by group or others, sticky bit or not. Sockets owned by anyone but
root or the caller are refused, so nobody can squat a name and impersonate a
daemon. Created directories get their mode with ``chmod``, whatever the umask.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from typing import NamedTuple, Optional

from .errors import InvalidArgument, NotPermitted, ServiceNotFound
from .peer import OVERFLOW_UID

__all__ = [
    "validate_name",
    "system_dir",
    "runtime_dir",
    "lookup_dirs",
    "find_sockets",
    "service_path",
    "check_socket_owner",
    "SYSTEM_DIR",
    "SUN_PATH_MAX",
]

#: The system directory unless ``$MACHIPC_SYSTEM_DIR`` is set.
SYSTEM_DIR = "/run/machipc"
#: sun_path is 108 bytes on Linux including the terminating NUL.
SUN_PATH_MAX = 107
NAME_MAX = 100
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
_FIX = "set XDG_RUNTIME_DIR or MACHIPC_RUNTIME_DIR to a directory of your own"


class _Dir(NamedTuple):
    path: str
    mode: int  # given to it when created
    owners: tuple[int, ...]  # uids it may belong to


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


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _ensure_dir(d: _Dir, create: bool) -> str:
    """Check (and with ``create``, make) directory ``d``; raises NotPermitted."""
    path = d.path
    if create:
        try:
            os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
            os.mkdir(path, d.mode)
            os.chmod(path, d.mode)  # mkdir's mode is cut by the umask
        except FileExistsError:
            pass
        except PermissionError as exc:
            raise NotPermitted(f"cannot create the runtime directory {path}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path  # a client looking up a name in a directory nobody made yet
    except PermissionError as exc:
        raise NotPermitted(f"cannot look into {os.path.dirname(path)}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotPermitted(
            f"{path} should be a directory but is not (owner {_user_name(st.st_uid)}): "
            f"refusing it; remove it, or {_FIX}"
        )
    if st.st_uid not in d.owners:
        raise NotPermitted(
            f"{path} belongs to {_user_name(st.st_uid)}, not to {' or '.join(_user_name(u) for u in d.owners)}: "
            f"refusing it, as it may have been made to squat service names; "
            f"remove it (as root or its owner: rm -r {path}), or {_FIX}"
        )
    if st.st_mode & 0o022:
        raise NotPermitted(
            f"{path} is writable by others (mode {st.st_mode & 0o7777:o}): refusing it, "
            f"as they could squat service names; chmod go-w {path}, or {_FIX}"
        )
    return path


def system_dir() -> str:
    """The system directory: ``$MACHIPC_SYSTEM_DIR`` or ``/run/machipc``."""
    return os.environ.get("MACHIPC_SYSTEM_DIR") or SYSTEM_DIR


def _system() -> _Dir:
    return _Dir(system_dir(), 0o755, (0,))


def _own() -> _Dir:
    """Where this process's own services live (root: the system directory)."""
    explicit = os.environ.get("MACHIPC_RUNTIME_DIR")
    uid = os.geteuid()
    if explicit:
        return _Dir(explicit, 0o755, (uid, 0))
    if uid == 0:
        return _system()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return _Dir(os.path.join(xdg, "machipc"), 0o700, (uid,))
    return _Dir(f"/tmp/machipc-{uid}", 0o700, (uid,))


def runtime_dir(create: bool = False) -> str:
    """The directory this process's servers bind in (see the module doc).

    With ``create`` it is made (with its documented mode) if missing. Raises
    NotPermitted when it is squatted, writable by others or cannot be made.
    """
    return _ensure_dir(_own(), create)


def lookup_dirs() -> list[str]:
    """The directories a client searches for a name, in order (see the module doc)."""
    return [d.path for d in _lookup()]


def _lookup() -> list[_Dir]:
    own = _own()
    if os.environ.get("MACHIPC_RUNTIME_DIR") or own.path == system_dir():
        return [own]
    return [own, _system()]


def _check_length(path: str) -> str:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise InvalidArgument(
            f"socket path {path!r} is longer than {SUN_PATH_MAX} bytes; use a shorter name "
            "or set MACHIPC_RUNTIME_DIR to a shorter directory"
        )
    return path


def service_path(name: str, create_dir: bool = False, directory: Optional[str] = None) -> str:
    """Socket path a server binds for ``name``: in ``directory``, else :func:`runtime_dir`.

    Raises InvalidArgument for a bad name or a path over ``SUN_PATH_MAX`` bytes.
    """
    validate_name(name)
    return _check_length(os.path.join(directory or runtime_dir(create_dir), name))


def find_sockets(name: str, directory: Optional[str] = None, *, any_owner: bool = False) -> list[str]:
    """The sockets a client may try for ``name``, in lookup order (never empty).

    In ``directory`` alone when given, else in :func:`lookup_dirs`; each is a
    socket owned by root or the caller, in a directory that passed the squatting
    checks. Raises ServiceNotFound when there is none, NotPermitted when the
    only candidates were refused (the error says why and what to do), and
    InvalidArgument for a bad name. ``any_owner``: accept a socket whoever owns
    it (the caller checks the listening process itself, e.g. a client with an
    explicit ``server_policy`` in a container, where owners show as the
    overflow uid).
    """
    validate_name(name)
    dirs = [_Dir(directory, 0, (os.geteuid(), 0))] if directory else _lookup()
    found: list[str] = []
    refused: Optional[NotPermitted] = None
    for d in dirs:
        path = _check_length(os.path.join(d.path, name))
        try:
            if not directory:  # an explicit directory is the caller's choice
                _ensure_dir(d, False)
            check_socket_owner(path, None if any_owner else (0, os.geteuid()))
        except FileNotFoundError:
            continue
        except NotPermitted as exc:
            refused = refused or exc  # a squatted per-user directory must not hide system services
            continue
        found.append(path)
    if found:
        return found
    if refused is not None:
        raise refused
    looked = " or ".join(os.path.join(d.path, name) for d in dirs)
    raise ServiceNotFound(f"no service {name!r}: nothing at {looked}")


def container_advice(uid: int, pid: int = -1) -> str:
    """What to do when a server looks foreign because the client runs in another user/pid namespace."""
    if uid != OVERFLOW_UID and pid != 0:
        return ""
    return (
        f" (uid {OVERFLOW_UID} is the overflow uid and pid 0 an unseen pid: the server's ids are not mapped into "
        "this client's user or pid namespace, as inside a container; pass server_policy= to say which server to "
        "trust by what this namespace can see, e.g. Allowlist(uids=[...]) or AllowAll())"
    )


def check_socket_owner(path: str, allowed_uids: Optional[tuple[int, ...]]) -> os.stat_result:
    """lstat ``path`` and refuse it unless it is a socket owned by one of ``allowed_uids`` (None: anyone).

    Raises FileNotFoundError (from lstat) when nothing is there, NotPermitted
    when it is something else, someone else's, or cannot be looked at.
    """
    try:
        st = os.lstat(path)
    except PermissionError as exc:
        raise NotPermitted(f"cannot look up {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise NotPermitted(f"{path} exists and is not a socket: refusing to use or replace it")
    if allowed_uids is not None and st.st_uid not in allowed_uids:
        raise NotPermitted(
            f"{path} is owned by {_user_name(st.st_uid)}, expected one of {sorted(set(allowed_uids))}: "
            f"another user may be squatting this service name{container_advice(st.st_uid)}"
        )
    return st
