"""launchd property lists for machipc daemons (macOS).

A launchd job that lists the service name under ``MachServices`` has the name
registered by launchd before the daemon runs; the daemon's
``bootstrap_check_in`` then receives that port (``machipc.Server(name)`` does
it), and clients can look the name up even while the daemon is not running yet
(launchd starts it on demand). :func:`write_plist` writes such a plist with
``plistlib``; ``python -m machipc plist NAME --program ... [--user-agent]``
calls it.

Install (daemon, system-wide)::

    sudo cp com.example.svc.plist /Library/LaunchDaemons/
    sudo launchctl bootstrap system /Library/LaunchDaemons/com.example.svc.plist

Install (agent, per user)::

    cp com.example.svc.plist ~/Library/LaunchAgents/
    launchctl bootstrap gui/$(id -u) ~/Library/LaunchAgents/com.example.svc.plist
"""

from __future__ import annotations

import os
import plistlib
import sys
import tempfile
from typing import Optional, Sequence

from .errors import InvalidArgument, NotPermitted
from .machmsg import check_service_name

__all__ = ["plist_dict", "plist_bytes", "default_path", "write_plist"]

DAEMON_DIR = "/Library/LaunchDaemons"
AGENT_DIR = "~/Library/LaunchAgents"


def plist_dict(
    name: str,
    program: Sequence[str],
    *,
    user_agent: bool = False,
    label: Optional[str] = None,
    keep_alive: bool = True,
    run_at_load: bool = True,
    log_path: Optional[str] = None,
) -> dict:
    """The job description: Label, ProgramArguments, MachServices, KeepAlive, RunAtLoad."""
    check_service_name(name)  # the bootstrap name_t limit applies to MachServices keys too
    program = [str(p) for p in program]
    if not program or not program[0]:
        raise InvalidArgument("program must name the executable (and its arguments)")
    if not os.path.isabs(program[0]):
        raise InvalidArgument(f"launchd needs an absolute executable path, not {program[0]!r}")
    job: dict = {
        "Label": label or name,
        "ProgramArguments": program,
        "MachServices": {name: True},
        "KeepAlive": keep_alive,
        "RunAtLoad": run_at_load,
        "ProcessType": "Interactive" if user_agent else "Background",
    }
    if log_path:
        job["StandardOutPath"] = job["StandardErrorPath"] = log_path
    return job


def plist_bytes(name: str, program: Sequence[str], *, user_agent: bool = False, **kw) -> bytes:
    """The plist as XML bytes."""
    return plistlib.dumps(plist_dict(name, program, user_agent=user_agent, **kw), fmt=plistlib.FMT_XML, sort_keys=False)


def default_path(name: str, user_agent: bool) -> str:
    """Where launchd looks: ~/Library/LaunchAgents (agent) or /Library/LaunchDaemons."""
    folder = os.path.expanduser(AGENT_DIR) if user_agent else DAEMON_DIR
    return os.path.join(folder, f"{name}.plist")


def write_plist(name: str, program: list[str], user_agent: bool, path: Optional[str] = None, *, force: bool = False) -> str:
    """Write the job plist for service ``name`` (mode 0644) and return its path.

    ``program`` is the ProgramArguments list (absolute executable first);
    ``user_agent`` selects a per-user LaunchAgent instead of a system
    LaunchDaemon. ``path`` is a file, or a directory (existing, or ending in
    ``/``) to write ``NAME.plist`` into; without it the launchd location is used,
    which exists on macOS only (InvalidArgument elsewhere). An existing file is
    replaced only with ``force`` (NotPermitted otherwise). ``"-"`` is not
    special: use :func:`plist_bytes` for stdout.
    """
    data = plist_bytes(name, program, user_agent=user_agent)
    if path is None and sys.platform != "darwin":
        raise InvalidArgument("launchd plists go to macOS's launchd directories: on this system give a path (-o FILE, -o DIR/ or -o -)")
    target = path or default_path(name, user_agent)
    if target.endswith(os.sep) or os.path.isdir(target):
        target = os.path.join(target, f"{name}.plist")
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    if not force and os.path.lexists(target):
        raise NotPermitted(f"{target} exists (use --force to overwrite)")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # launchd refuses group/world-writable job files
        if force:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if the file appeared meanwhile: never overwrite silently
            except FileExistsError:
                raise NotPermitted(f"{target} exists (use --force to overwrite)") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return target
