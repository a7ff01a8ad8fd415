"""Service-manager integration: systemd socket activation, ``sd_notify``, unit files.

Socket activation (``sd_listen_fds`` semantics, no libsystemd): the manager
creates the listening socket, starts the daemon with the socket as fd 3 (and
up) and describes it in the environment:

* ``LISTEN_PID``: the pid the fds are meant for. Checked, so a child that
  inherited the environment does not take fds that are not its own.
* ``LISTEN_FDS``: how many fds, starting at 3 (``SD_LISTEN_FDS_START``).
* ``LISTEN_FDNAMES``: colon-separated names (``FileDescriptorName=``, default
  the socket unit's name; ``systemd-socket-activate --fdname``).

The environment is read once, the fds get ``FD_CLOEXEC`` and the variables are
unset so children do not inherit them; each fd can then be claimed once with
:func:`take_listener` (``machipc.Server`` does that itself, and
``Server.from_systemd`` insists on it).

``notify("READY=1")`` speaks the ``NOTIFY_SOCKET`` datagram protocol
(``Type=notify`` services); it is a no-op when the variable is unset.

:func:`unit_files` writes a ``.socket``/``.service`` pair for a machipc daemon
(``python -m machipc unit NAME --exec ...``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
from typing import Optional

from .errors import InvalidArgument, IPCError, NotPermitted
from .naming import system_dir, validate_name

__all__ = [
    "SD_LISTEN_FDS_START",
    "listen_fds",
    "take_listener",
    "check_listener",
    "notify",
    "unit_files",
    "write_units",
]

log = logging.getLogger("machipc")

SD_LISTEN_FDS_START = 3
_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

_lock = threading.Lock()
_inherited: Optional[dict[int, str]] = None  # fd -> name, fds not yet claimed
_pid: Optional[int] = None  # the pid that read the environment (fds do not survive fork for us)


def listen_fds() -> dict[int, str]:
    """The fds passed to this process by socket activation and not yet claimed (fd -> name).

    The first call reads and unsets ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``
    and sets ``FD_CLOEXEC`` on the fds; variables meant for another pid are
    ignored (and still unset). Unnamed fds are called ``"unknown"``, as systemd does.
    """
    global _inherited, _pid
    with _lock:
        if _inherited is None or _pid != os.getpid():
            _inherited, _pid = _read_environment(), os.getpid()
        return dict(_inherited)


def _read_environment() -> dict[int, str]:
    env = {key: os.environ.get(key) for key in _ENV}
    for key in _ENV:
        os.environ.pop(key, None)  # never hand them to children (they would check LISTEN_PID, but not all do)
    if env["LISTEN_FDS"] is None:
        return {}
    try:
        pid = int(env["LISTEN_PID"] or "")
        count = int(env["LISTEN_FDS"])
    except ValueError:
        log.warning("ignoring malformed socket-activation variables LISTEN_PID=%r LISTEN_FDS=%r", env["LISTEN_PID"], env["LISTEN_FDS"])
        return {}
    if pid != os.getpid():
        log.info("LISTEN_FDS is meant for pid %d, not this process (%d): ignored", pid, os.getpid())
        return {}
    if count <= 0:
        return {}
    names = (env["LISTEN_FDNAMES"] or "").split(":") if env["LISTEN_FDNAMES"] else []
    if len(names) != count:
        if names:
            log.warning("LISTEN_FDNAMES has %d names for %d fds: names ignored", len(names), count)
        names = ["unknown"] * count
    fds = {}
    for i, fd_name in enumerate(names):
        fd = SD_LISTEN_FDS_START + i
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as exc:
            log.warning("socket activation: fd %d is not open (%s): skipped", fd, exc.strerror)
            continue
        fds[fd] = fd_name or "unknown"
    log.debug("socket activation: inherited %s", ", ".join(f"fd {fd} ({n})" for fd, n in fds.items()))
    return fds


def _pick(fds: dict[int, str], name: Optional[str]) -> Optional[int]:
    """The fd named ``name`` (or ``name.socket``), else the only one when there is one."""
    if name is not None:
        for fd, fd_name in fds.items():
            if fd_name in (name, name + ".socket"):
                return fd
    if len(fds) == 1:
        return next(iter(fds))
    return None


def check_listener(sock: socket.socket) -> None:
    """Raise InvalidArgument unless ``sock`` is a listening AF_UNIX SOCK_SEQPACKET socket."""
    try:
        family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        stype = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise InvalidArgument(f"fd {sock.fileno()} is not a usable socket: {exc.strerror}") from None
    if family != socket.AF_UNIX or stype != socket.SOCK_SEQPACKET:
        raise InvalidArgument(
            f"fd {sock.fileno()} is not an AF_UNIX SOCK_SEQPACKET socket "
            f"(family {family}, type {stype}): use ListenSequentialPacket= in the .socket unit"
        )
    if not listening:
        raise InvalidArgument(f"fd {sock.fileno()} is not listening (Accept=yes is not supported: use Accept=no)")


def _listener_of(fd: int) -> socket.socket:
    """A socket object for inherited ``fd`` if it is a listening SEQPACKET socket;
    raises InvalidArgument (leaving ``fd`` open) when it is anything else."""
    try:
        sock = socket.socket(fileno=fd)  # asks the kernel for family and type: fails on a non-socket
    except OSError as exc:
        raise InvalidArgument(f"fd {fd} is not a socket ({exc.strerror}): use ListenSequentialPacket= in the .socket unit") from None
    try:
        check_listener(sock)
    except InvalidArgument:
        sock.detach()  # not ours: leave the fd as it was
        raise
    return sock


def take_listener(name: Optional[str] = None, *, required: bool = False) -> Optional[socket.socket]:
    """Claim the inherited listening socket for service ``name``.

    Picks the fd named ``name`` (or ``name.socket``) in ``LISTEN_FDNAMES``, else
    the only inherited fd. Returns None when there is none to take (raises
    IPCError instead with ``required=True``). An fd chosen by name that is not a
    listening SEQPACKET socket (not a socket at all, a TCP or stream socket,
    not listening) raises InvalidArgument; the only, unnamed fd that is not
    one is left alone (it may belong to another part of the program) unless
    ``required``. Either way such an fd stays open. Malformed variables
    (non-numeric, negative, another pid) count as no activation.
    """
    fds = listen_fds()
    fd = _pick(fds, name)
    if fd is None:
        if required:
            what = ", ".join(f"fd {f} named {n!r}" for f, n in fds.items()) or "none"
            raise IPCError(
                f"no socket-activated listener for {name!r} (LISTEN_FDS for this process: {what}); "
                "start the daemon from its .socket unit or systemd-socket-activate"
            )
        return None
    by_name = name is not None and fds[fd] in (name, name + ".socket")
    try:
        sock = _listener_of(fd)
    except InvalidArgument:
        if by_name or required:
            with _lock:
                _inherited.pop(fd, None)
            raise
        log.info("socket activation: fd %d (%s) is not a SEQPACKET listener; not taking it", fd, fds[fd])
        return None
    with _lock:
        _inherited.pop(fd, None)
    log.info("socket activation: serving %r on inherited fd %d (%s)", name, fd, fds[fd])
    return sock


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"STOPPING=1"``) to ``$NOTIFY_SOCKET``.

    Returns True if it was sent, False when there is no notify socket (not run
    by systemd with ``Type=notify``) or it cannot be reached (logged). Never raises.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        log.info("NOTIFY_SOCKET=%r is not an AF_UNIX address: not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify %r to %s failed: %s", state, address, exc)
        return False
    return True


# -- unit files ---------------------------------------------------------------


def _check_exec(exec_start: str, who: str) -> None:
    if not exec_start.strip():
        raise InvalidArgument(f"--exec must name the {who}'s command line")
    if "\n" in exec_start:
        raise InvalidArgument("--exec must be one line")


def unit_files(
    name: str,
    exec_start: str,
    *,
    path: Optional[str] = None,
    mode: int = 0o666,
    user: Optional[str] = None,
    description: Optional[str] = None,
    unit: Optional[str] = None,
) -> dict[str, str]:
    """The ``.socket`` and ``.service`` texts for service ``name`` (filename -> text).

    ``path`` defaults to the service's socket path in the system directory
    (``/run/machipc/NAME``, see :mod:`machipc.naming`; ``$MACHIPC_RUNTIME_DIR/NAME``
    when that is set), so every user's clients find it by name.
    ``PassCredentials=yes`` makes the kernel attach credentials from the very
    first packet (before the daemon can set ``SO_PASSCRED`` itself).
    """
    validate_name(name)
    _check_exec(exec_start, "daemon")
    if path is None:
        path = os.path.join(os.environ.get("MACHIPC_RUNTIME_DIR") or system_dir(), name)
    if not os.path.isabs(path):
        raise InvalidArgument(f"socket path {path!r} must be absolute")
    unit = unit or name
    description = description or f"machipc service {name}"
    socket_unit = (
        "[Unit]\n"
        f"Description={description} (socket)\n"
        "\n"
        "[Socket]\n"
        f"ListenSequentialPacket={path}\n"
        f"SocketMode={mode:04o}\n"
        "# Credentials on every packet from the start, even before the daemon runs.\n"
        "PassCredentials=yes\n"
        f"FileDescriptorName={name}\n"
        "RemoveOnStop=yes\n"
        "\n"
        "[Install]\n"
        "WantedBy=sockets.target\n"
    )
    service_unit = (
        "[Unit]\n"
        f"Description={description}\n"
        f"Requires={unit}.socket\n"
        f"After={unit}.socket\n"
        "\n"
        "[Service]\n"
        "Type=notify\n"
        "NotifyAccess=main\n"
        f"ExecStart={exec_start}\n"
        + (f"User={user}\n" if user else "")
        + "# SIGTERM: machipc stops accepting, answers the requests it has, then exits.\n"
        "KillSignal=SIGTERM\n"
        "TimeoutStopSec=30\n"
        "Restart=on-failure\n"
        "NoNewPrivileges=yes\n"
        "\n"
        "[Install]\n"
        "Also={unit}.socket\n".replace("{unit}", unit)
    )
    return {f"{unit}.socket": socket_unit, f"{unit}.service": service_unit}


def client_unit_file(
    name: str,
    client: str,
    exec_start: str,
    *,
    user: Optional[str] = None,
    unit: Optional[str] = None,
    description: Optional[str] = None,
) -> dict[str, str]:
    """The ``.service`` text for a client of service ``name`` (filename -> text).

    ``client`` is the unit's name (``backup`` or ``backup.service``): the
    name the daemon's ``SystemdUnit`` policy allows, since systemd starts
    the client in the cgroup of that unit and no other process can enter it
    (see docs/daemons.md). ``unit`` is the daemon's unit base name (default
    ``name``), whose socket the client wants and is ordered after.
    """
    from .cgroup import valid_unit_name

    validate_name(name)
    client_unit = client if client.endswith(".service") else f"{client}.service"
    if "@" in client_unit or "/" in client_unit or not valid_unit_name(client_unit):
        raise InvalidArgument(f"--client must be a plain service name like backup or backup.service, not {client!r}")
    _check_exec(exec_start, "client")
    unit = unit or name
    description = description or f"machipc client of {name}"
    text = (
        "[Unit]\n"
        f"Description={description}\n"
        f"Wants={unit}.socket\n"
        f"After={unit}.socket\n"
        "\n"
        "[Service]\n"
        f"# The daemon trusts this unit by name: SystemdUnit(\"{client_unit}\"), or in its policy file\n"
        f"#   [policy]\n#   systemd_unit = \"{client_unit}\"\n"
        "Type=simple\n"
        f"ExecStart={exec_start}\n"
        + (f"User={user}\n" if user else "")
        + "NoNewPrivileges=yes\n"
    )
    return {client_unit: text}


def write_units(directory: str, files: dict[str, str], *, force: bool = False) -> list[str]:
    """Write ``files`` (from :func:`unit_files`) into ``directory``; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    written = []
    for filename, text in files.items():
        target = os.path.join(directory, filename)
        try:
            with open(target, "w" if force else "x") as f:
                f.write(text)
        except FileExistsError:
            raise NotPermitted(f"{target} exists (use --force to overwrite)") from None
        written.append(target)
    return written

