"""``Peer``: who sent a message, as the kernel reported it.

On Linux the transport hands over the kernel's ``SCM_CREDENTIALS`` (pid, uid,
gid) and a pidfd for the sending process (``SCM_PIDFD``, or ``pidfd_open`` on
kernels without it). The pidfd pins the process: a pid can be reused once the
sender exits, a pidfd cannot. Anything read from ``/proc/<pid>`` is trusted
only when the pidfd still refers to a live process *after* the read.

uid and gid in ``SCM_CREDENTIALS`` are sound: the kernel accepts only ids the
sender holds (or, with ``CAP_SETUID``/``CAP_SETGID`` in its user namespace,
ids mapped into it). The pid is a *claim*: with ``CAP_SYS_ADMIN`` over the
user namespace owning its pid namespace, a sender may name any process visible
there (``scm_check_creds`` in net/core/scm.c), and ``SCM_PIDFD`` then pins the
named process, not the sender. Any user gets that capability with
``unshare -Urp``, but only for processes in that new namespace, which sits
below the server's. So a claimed pid is attributed (``Peer.pinned``) only when
the process lives in the server's own pid namespace (one ``NSpid`` entry in the
pidfd's fdinfo, kernel/pid.c ``pidfd_show_fdinfo``); deeper, its executable,
digest and signature are unknown, and uid/gid still decide.

On macOS the identity is the audit token (pid + pidversion); the pidversion
changes on every exec, so the token names one program run of one process.

:func:`peer_of` gives the same :class:`Peer` for any connected AF_UNIX socket
(``SO_PEERCRED`` + ``SO_PEERPIDFD`` on Linux, ``LOCAL_PEERTOKEN`` on macOS).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import sys
from typing import Optional, Sequence, Union

from . import digest
from .errors import PeerGone, error_from_errno
from .procident import UNKNOWN_GONE, ProcessIdentity

__all__ = [
    "Peer",
    "peer_of",
    "process_alive",
    "pidfs_available",
    "GUARD_PIDFS",
    "GUARD_STARTTIME",
    "GUARD_PIDVERSION",
    "GUARD_NONE",
    "UNKNOWN_GONE",
    "PID_UNKNOWN",
    "OVERFLOW_UID",
    "OVERFLOW_GID",
    "claim_problem",
]

#: The pid-reuse guard is the pidfd's inode on pidfs (unique per process).
GUARD_PIDFS = "pidfs-inode"
#: The guard is the process start time from /proc (kernels without pidfs).
GUARD_STARTTIME = "start-time"
#: macOS: the audit token's pidversion (changes on fork and on exec).
GUARD_PIDVERSION = "pidversion"
#: No guard could be had (e.g. the sender is already gone).
GUARD_NONE = "none"

#: Why a sender reported with pid 0 has no process identity.
PID_UNKNOWN = (
    "pid unknown: the sender is in a pid namespace the server cannot see (the kernel reports pid 0), "
    "so only its uid and gid are known"
)

LINUX = sys.platform.startswith("linux")
MACOS = sys.platform == "darwin"

SO_PEERPIDFD = 77  # Linux >= 6.5; not in Python 3.11's socket module
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_AUDIT_TOKEN = struct.Struct("8I")
# macOS <sys/un.h>
SOL_LOCAL = 0
LOCAL_PEERCRED = 0x001
LOCAL_PEERPID = 0x002
LOCAL_PEERTOKEN = 0x006
_XUCRED = struct.Struct("IIh2x16I")  # cr_version, cr_uid, cr_ngroups, cr_groups[16]

_pidfs: Optional[bool] = None


def _overflow_id(kind: str) -> int:
    try:
        with open(f"/proc/sys/kernel/overflow{kind}", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534  # the kernel's default (DEFAULT_OVERFLOWUID)


#: The uid and gid the kernel reports for ids not mapped into this user namespace,
#: and for a packet that carries no credentials at all (pid 0 with these ids).
OVERFLOW_UID, OVERFLOW_GID = (_overflow_id("uid"), _overflow_id("gid")) if LINUX else (65534, 65534)


def pidfs_available() -> bool:
    """True when pidfds live on pidfs, so their inode identifies one process.

    Before Linux 6.9 every pidfd shares one anonymous inode; then the process
    start time is the guard instead.
    """
    global _pidfs
    if _pidfs is None:
        try:
            a = os.pidfd_open(os.getpid())
            try:
                b = os.pidfd_open(os.getppid())
                try:
                    _pidfs = os.fstat(a).st_ino != os.fstat(b).st_ino
                finally:
                    os.close(b)
            finally:
                os.close(a)
        except (OSError, AttributeError):
            _pidfs = False
    return _pidfs


def _start_time(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/pid/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat_line[stat_line.rfind(b")") + 2 :].split()
    return int(fields[19])


def claim_problem(pidfd: int) -> Optional[str]:
    """Why the process ``pidfd`` names could have been claimed by another sender (None: it could not).

    A pid in ``SCM_CREDENTIALS`` other than the sender's own needs
    ``CAP_SYS_ADMIN`` over the user namespace owning the sender's pid
    namespace, and names a process visible there. A process in the server's
    own pid namespace is thus claimable only by a sender privileged over the
    server's namespace; one in a deeper namespace by anyone who made it
    (``unshare -Urp``). The level is read from the pidfd's fdinfo (``NSpid:``,
    relative to this process's ``/proc``, Linux >= 5.3), so it belongs to the
    pinned process whatever happens to its pid.
    """
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            info = f.read()
    except OSError as exc:
        return f"unknown: cannot read the pidfd's fdinfo ({exc.strerror})"
    levels: list[bytes] = []
    for line in info.splitlines():
        if line.startswith(b"NSpid:"):
            levels = line.split()[1:]
            break
    else:
        return None  # kernel without pid namespaces: there is only the server's
    if not levels or levels[0] == b"-1":
        return UNKNOWN_GONE
    if levels[0] == b"0":
        return PID_UNKNOWN
    if len(levels) > 1:
        return (
            f"unknown: pid {int(levels[0])} lives in a pid namespace {len(levels) - 1} level(s) below the server's "
            f"(NSpid {' '.join(x.decode() for x in levels)}), where a sender holding CAP_SYS_ADMIN over it "
            "(any user, with unshare -Urp) can name it in SCM_CREDENTIALS; the packet is not attributed to it"
        )
    try:
        own = os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        own = False
    if not own:
        return "unknown: the server's /proc belongs to another pid namespace, so pid namespaces cannot be compared"
    return None


def process_alive(pid: int, guard: Optional[int], guard_kind: str) -> bool:
    """True while the process named by ``(pid, guard)`` still exists.

    Needs no pidfd, so caches can check their entries without holding one
    descriptor per process. Unknown guards count as gone.
    """
    if guard is None:
        return False
    if guard_kind == GUARD_PIDFS:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        try:
            return os.fstat(fd).st_ino == guard
        finally:
            os.close(fd)
    if guard_kind == GUARD_STARTTIME:
        return _start_time(pid) == guard
    if guard_kind == GUARD_PIDVERSION and MACOS:
        from .policies import _macos

        return _macos.pidversion_alive(pid, guard)
    return False


class Peer(ProcessIdentity):
    """The process on the other end of a message.

    ``pid``, ``uid`` and ``gid`` come from the kernel and cannot be forged by the
    sender. ``guard`` distinguishes this process from a later one that reuses the
    pid; ``key`` = ``(pid, guard)`` identifies the process for caches.

    ``exe``, ``exe_id``, ``exe_sha256``, ``code_identifier``, ``team_id`` and
    (Linux, :mod:`machipc.procident`) ``cgroup``, ``unit`` and ``security_label`` are
    read lazily and race-free; each is None when it cannot be known for this
    very process, and :attr:`unknown_reason` then says why (the sender exited,
    its ``/proc/<pid>/exe`` is unreadable, the platform lacks it, ...).

    :attr:`pinned` says whether ``pid`` names the sending process soundly;
    when it does not (:attr:`pin_problem` says why: pid 0 from another pid
    namespace, a pid the sender could have claimed, nothing pins it), every
    attribute read from the process is None and only uid/gid can decide.
    """

    __slots__ = (
        "pid",
        "uid",
        "gid",
        "_pidfd",
        "guard",
        "guard_kind",
        "audit_token",
        "_exe",
        "_exe_id",
        "_sha256",
        "_signing",
        "unknown_reason",
        "pin_problem",
        "__weakref__",
    )

    def __init__(
        self,
        pid: int,
        uid: int,
        gid: int,
        pidfd: int = -1,
        guard: Optional[int] = None,
        guard_kind: str = GUARD_NONE,
        audit_token: Optional[tuple[int, ...]] = None,
        pin_problem: Optional[str] = None,
    ) -> None:
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self._pidfd = pidfd
        self.guard = guard
        self.guard_kind = guard_kind
        #: macOS: the 8 words of the sender's audit token (None on Linux).
        self.audit_token = audit_token
        self._exe: Optional[str] = None
        self._exe_id: Optional[tuple[int, int]] = None
        self._sha256: Optional[str] = None
        self._signing: Optional[dict] = None
        #: Why the last identity attribute asked for is None (None when all were known).
        self.unknown_reason: Optional[str] = None
        self._init_identity()
        if pin_problem is None and pid <= 0:
            pin_problem = PID_UNKNOWN
        #: Why ``pid`` does not name the sending process soundly (None when it does).
        self.pin_problem = pin_problem

    @classmethod
    def from_pidfd(cls, pid: int, uid: int, gid: int, pidfd: int, inode: int = 0, *, claimed: bool = False) -> "Peer":
        """Build a Peer around a pidfd it then owns, choosing the best guard.

        ``claimed``: the pid came from a packet's ``SCM_CREDENTIALS`` (which the
        sender may choose within its own pid namespace, see
        :func:`claim_problem`), not from ``SO_PEERCRED``/``SO_PEERPIDFD`` (set by
        the kernel at ``connect()``). A claimed process outside the server's pid
        namespace is not attributed: :attr:`pin_problem` says why.
        """
        if pid <= 0:  # another pid namespace: the pidfd names nobody the server can see
            if pidfd >= 0:
                os.close(pidfd)
            return cls(pid, uid, gid)
        problem = claim_problem(pidfd) if claimed and pidfd >= 0 else None
        if pidfd >= 0 and pidfs_available():
            if not inode:
                inode = os.fstat(pidfd).st_ino
            return cls(pid, uid, gid, pidfd, inode, GUARD_PIDFS, pin_problem=problem)
        peer = cls(pid, uid, gid, pidfd, pin_problem=problem)
        start = _start_time(pid)
        if start is not None and peer.is_alive():
            peer.guard, peer.guard_kind = start, GUARD_STARTTIME
        return peer

    @classmethod
    def from_audit_token(cls, token: Union[bytes, Sequence[int]]) -> "Peer":
        """Build a Peer from a macOS ``audit_token_t`` (32 bytes or its 8 words).

        ``val[1]`` is the euid, ``val[2]`` the egid, ``val[5]`` the pid and
        ``val[7]`` the pidversion, which is the pid-reuse (and exec) guard.
        """
        words = _AUDIT_TOKEN.unpack(bytes(token)) if isinstance(token, (bytes, bytearray, memoryview)) else tuple(token)
        if len(words) != 8:
            raise ValueError(f"an audit token has 8 words, not {len(words)}")
        return cls(words[5], words[1], words[2], -1, words[7], GUARD_PIDVERSION, tuple(words))

    @property
    def pidfd(self) -> int:
        """The pidfd pinning the sender, or -1 when there is none (owned by this Peer)."""
        return self._pidfd

    @property
    def pinned(self) -> bool:
        """True when ``pid`` names the sending process race-free and soundly (a pidfd or
        audit token pins it, and the sender could not have chosen it)."""
        return self.pin_problem is None and (self._pidfd >= 0 or self.audit_token is not None)

    @property
    def key(self) -> tuple[int, Optional[int]]:
        """``(pid, guard)``: one running process, never a later one with the same pid."""
        return (self.pid, self.guard)

    def is_alive(self) -> bool:
        """True while the pinned process has not exited (signal 0 through the pidfd)."""
        if self.audit_token is not None:
            return process_alive(self.pid, self.guard, self.guard_kind)
        if self._pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, but we may not signal it (another uid)
        return True

    # -- executable ----------------------------------------------------------

    def _unknown(self, reason: str) -> None:
        self.unknown_reason = reason
        return None

    def _read_exe_linux(self) -> Optional[tuple[str, tuple[int, int]]]:
        """(path, (dev, ino)) of the executable the pinned process runs now.

        ``/proc/<pid>/exe`` is opened with O_PATH (no read permission needed),
        its inode and the path of *that open file* are read, and only then is
        the pidfd asked whether the process is still alive: if it is, the pid
        was never reused during the reads, so the answer belongs to it.
        """
        if self.pin_problem is not None:
            return self._unknown(self.pin_problem)
        if self._pidfd < 0:
            return self._unknown("unknown: no pidfd pins the sender, so /proc cannot be read race-free")
        try:
            fd = os.open(f"/proc/{self.pid}/exe", os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            if not self.is_alive():
                return self._unknown(UNKNOWN_GONE)
            return self._unknown(f"cannot read /proc/{self.pid}/exe (kernel thread or no executable)")
        except PermissionError:
            if not self.is_alive():
                return self._unknown(UNKNOWN_GONE)
            return self._unknown(
                f"cannot read /proc/{self.pid}/exe: permission denied (non-dumpable process or another namespace)"
            )
        except OSError as exc:
            return self._unknown(f"cannot read /proc/{self.pid}/exe: {exc.strerror}")
        try:
            st = os.fstat(fd)
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            return self._unknown(f"cannot read /proc/{self.pid}/exe: {exc.strerror}")
        finally:
            os.close(fd)
        if not self.is_alive():
            return self._unknown(UNKNOWN_GONE)
        return path, (st.st_dev, st.st_ino)

    def _read_exe_macos(self) -> Optional[tuple[str, tuple[int, int]]]:
        from .policies import _macos

        if self.pin_problem is not None:
            return self._unknown(self.pin_problem)
        if self.audit_token is None:
            return self._unknown("unknown: no audit token for this sender")
        try:
            # The running image's (dev, ino) from the process's own mapping, not a stat of
            # its path (which may name another file by now): exe_sha256 and SameDirectory
            # compare files against it.
            return _macos.image_for_token(self.audit_token)
        except ProcessLookupError:
            return self._unknown(UNKNOWN_GONE)
        except OSError as exc:
            return self._unknown(f"cannot identify the sender's executable: {exc.strerror or exc}")

    def _read_exe(self) -> Optional[tuple[str, tuple[int, int]]]:
        if LINUX:
            return self._read_exe_linux()
        if MACOS:
            return self._read_exe_macos()
        return self._unknown(f"executable identity is not supported on {sys.platform}")

    def refresh_exe(self) -> Optional[tuple[int, int]]:
        """Read the executable's ``(dev, ino)`` afresh; forget what was read before if it changed.

        On Linux a process keeps its pid and pidfd across ``execve()``, so a
        Peer kept for many packets (one connection) must notice a new program.
        Returns the current ``exe_id`` (None when it cannot be known).
        """
        if self._exe_id is not None and LINUX and self._pidfd >= 0:
            # Fast path: stat the magic link (it follows to the running file),
            # then confirm the same process is alive; unchanged keeps the snapshot.
            try:
                st = os.stat(f"/proc/{self.pid}/exe")
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == self._exe_id and self.is_alive():
                return self._exe_id
        got = self._read_exe()
        if got is None:
            self._exe = self._exe_id = self._sha256 = self._signing = None
            return None
        path, ident = got
        if ident != self._exe_id:
            self._sha256 = self._signing = None
        self._exe, self._exe_id = path, ident
        return ident

    @property
    def exe_snapshot(self) -> Optional[tuple[int, int]]:
        """The ``exe_id`` read so far, without reading (None: nobody has asked yet, or unknown)."""
        return self._exe_id

    def running_exe_id(self) -> Optional[tuple[int, int]]:
        """``(dev, ino)`` of what ``/proc/<pid>/exe`` runs now: one ``stat``, None when unreadable.

        Only meaningful while the caller knows the process is the pinned one
        (the transport checked it for the packet at hand); a reused pid running
        the same file would read the same.
        """
        if not LINUX or self._pidfd < 0 or self.pin_problem is not None:
            return None
        try:
            st = os.stat(f"/proc/{self.pid}/exe")
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def successor(self) -> "Peer":
        """A fresh Peer for the same process (e.g. after ``execve()``), holding a dup of the pidfd.

        Nothing read from the process is carried over; this Peer, which
        messages already handed out may hold, keeps describing the old program.
        """
        pidfd = fcntl.fcntl(self._pidfd, fcntl.F_DUPFD_CLOEXEC, 0) if self._pidfd >= 0 else -1
        return Peer(self.pid, self.uid, self.gid, pidfd, self.guard, self.guard_kind, self.audit_token, self.pin_problem)

    @property
    def exe(self) -> Optional[str]:
        """The sender's executable path (symlinks resolved), or None when it cannot be known race-free.

        Linux: ``/proc/<pid>/exe`` read, then confirmed by the pidfd, so a reused
        pid never lends its executable. macOS: ``proc_pidpath_audittoken``.
        A path ending in `` (deleted)`` means the file was removed or replaced.
        """
        if self._exe is None:
            self.refresh_exe()
        return self._exe

    @property
    def exe_id(self) -> Optional[tuple[int, int]]:
        """``(st_dev, st_ino)`` of the executable the process runs (read with ``exe``)."""
        if self._exe_id is None:
            self.refresh_exe()
        return self._exe_id

    @property
    def exe_sha256(self) -> Optional[str]:
        """SHA-256 (hex) of the very file the process runs, or None (``exe_digest()`` with its defaults)."""
        return self.exe_digest()

    def exe_digest(self, max_bytes: int = digest.MAX_HASH_BYTES, sizes: Optional[frozenset] = None) -> Optional[str]:
        """SHA-256 (hex) of the very file the process runs, or None (``unknown_reason`` says why).

        Linux: ``/proc/<pid>/exe`` is opened for reading (the inode the process
        executes, even if its path was replaced), checked to be the same inode
        as ``exe_id``, and trusted only if the process is still alive after the
        open. Needs read permission on the file. Files over ``max_bytes``, or
        of a size not in ``sizes`` (when given), are not read (machipc.digest).
        """
        if self._sha256 is not None:
            return self._sha256
        ident = self.exe_id
        if ident is None:
            return None
        if LINUX:
            try:
                fd = os.open(f"/proc/{self.pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                if not self.is_alive():
                    return self._unknown(UNKNOWN_GONE)
                return self._unknown(f"cannot open the sender's executable for hashing: {exc.strerror}")
        else:
            try:
                fd = os.open(self._exe, os.O_RDONLY | os.O_CLOEXEC)  # type: ignore[arg-type]
            except OSError as exc:
                return self._unknown(f"cannot open the sender's executable for hashing: {exc.strerror}")
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != ident:
                return self._unknown("unknown: the sender's executable changed while it was being read")
            if not self.is_alive():
                return self._unknown(UNKNOWN_GONE)
            if not stat.S_ISREG(st.st_mode):
                return self._unknown("the sender's executable is not a regular file")
            self._sha256 = digest.sha256_of_fd(fd, st, max_bytes, sizes)
        except (digest.TooLarge, digest.SizeMismatch) as exc:
            return self._unknown(f"the sender's executable was not hashed: {exc}")
        except OSError as exc:
            return self._unknown(f"cannot hash the sender's executable: {exc.strerror or exc}")
        finally:
            os.close(fd)
        return self._sha256

    # -- code signature (macOS) ----------------------------------------------

    def _signing_info(self) -> dict:
        if self._signing is None:
            if self.pin_problem is not None:
                self._unknown(self.pin_problem)
                return {}
            if not MACOS:
                self._signing = {}
                self._unknown(f"code signatures do not exist on {sys.platform}")
            else:
                from .policies import _macos

                try:
                    self._signing = _macos.signing_info_for_token(self.audit_token)
                except ProcessLookupError:
                    self._unknown(UNKNOWN_GONE)
                    return {}
                except OSError as exc:
                    self._unknown(f"cannot read the sender's code signature: {exc}")
                    return {}
        return self._signing

    @property
    def code_identifier(self) -> Optional[str]:
        """macOS: the signing identifier of the sender's code (None if unsigned, or on Linux)."""
        return self._signing_info().get("identifier")

    @property
    def team_id(self) -> Optional[str]:
        """macOS: the Team ID the sender's code is signed with (None if none, or on Linux)."""
        return self._signing_info().get("team_id")

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """Release the pidfd and the /proc files held for this process (idempotent)."""
        self._close_identity()
        fd, self._pidfd = self._pidfd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        pid = self.pid if self.pin_problem is None else f"{self.pid} (unpinned)" if self.pid > 0 else "unknown"
        return f"Peer(pid={pid}, uid={self.uid}, gid={self.gid}, guard={self.guard_kind})"


# -- peer_of -----------------------------------------------------------------


def peer_of(sock: Union[socket.socket, int]) -> Peer:
    """The :class:`Peer` on the other end of a connected AF_UNIX socket.

    Works for any connected stream or seqpacket socket, including the one under
    an asyncio transport (``transport.get_extra_info("socket")``).

    Linux: ``SO_PEERCRED`` gives pid/uid/gid as of ``connect()``/``listen()``,
    ``SO_PEERPIDFD`` pins that process. On kernels without ``SO_PEERPIDFD``
    (``ENOPROTOOPT``, before 6.5) it falls back to ``pidfd_open(pid)`` and then
    checks the connection is still up; ``peer.guard_kind`` says which guard is
    in force. A peer that has gone (``EINVAL``/``ESRCH``) raises PeerGone: it
    never turns into "no check".

    macOS: ``LOCAL_PEERTOKEN`` (the audit token, so pid + pidversion), with
    ``LOCAL_PEERCRED`` + ``LOCAL_PEERPID`` only when the token is unavailable.

    Linux also records ``SO_PEERSEC`` as ``peer.socket_label`` (where an LSM gives one).

    A peer in a pid namespace the caller cannot see (Linux reports pid 0, e.g.
    a server on the host seen from inside a container) gives a Peer with pid
    0, the kernel's uid/gid (as mapped into the caller's user namespace) and
    ``pin_problem`` set: nothing can be read about its process.
    """
    fd = sock if isinstance(sock, int) else sock.fileno()
    s = socket.socket(fileno=fd) if isinstance(sock, int) else sock
    try:
        if LINUX:
            peer = _peer_of_linux(s)
            peer.read_socket_label(s)
            return peer
        if MACOS:
            return _peer_of_macos(s)
        raise NotImplementedError(f"peer_of is not supported on {sys.platform}")
    finally:
        if isinstance(sock, int):
            s.detach()


def _peer_of_linux(sock: socket.socket) -> Peer:
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise PeerGone("the socket is not connected: no peer to identify") from None
        raise error_from_errno(exc.errno, "getsockopt(SO_PEERCRED)") from None
    if pid <= 0:
        try:
            sock.getpeername()
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise PeerGone("the socket is not connected: no peer to identify") from None
        # Another pid namespace the caller cannot see: uid/gid are still the kernel's.
        return Peer(0, uid, gid)
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ESRCH):
            raise PeerGone(f"the peer process (pid {pid}) is gone (SO_PEERPIDFD: {os.strerror(exc.errno)})") from None
        if exc.errno != errno.ENOPROTOOPT:
            raise error_from_errno(exc.errno, "getsockopt(SO_PEERPIDFD)") from None
        return _peer_by_pidfd_open(sock, pid, uid, gid)
    return Peer.from_pidfd(pid, uid, gid, pidfd)


def _peer_by_pidfd_open(sock: socket.socket, pid: int, uid: int, gid: int) -> Peer:
    """Kernel lacks SO_PEERPIDFD: pin the pid now, then check the peer is still connected.

    The window between SO_PEERCRED and pidfd_open only matters if the peer
    exited; its end of the connection then hangs up, which is checked after
    pinning (a peer that handed its socket to a child is not caught).
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise PeerGone(f"the peer process (pid {pid}) is gone") from None
    except OSError as exc:
        raise error_from_errno(exc.errno, f"pidfd_open({pid})") from None
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP | getattr(select, "POLLRDHUP", 0x2000))
    if poller.poll(0):
        os.close(pidfd)
        raise PeerGone(f"the peer process (pid {pid}) hung up before it could be pinned")
    peer = Peer.from_pidfd(pid, uid, gid, pidfd)
    if peer.guard is None:
        peer.close()
        raise PeerGone(f"the peer process (pid {pid}) is gone")
    return peer


def _peer_of_macos(sock: socket.socket) -> Peer:
    try:
        token = sock.getsockopt(SOL_LOCAL, LOCAL_PEERTOKEN, _AUDIT_TOKEN.size)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.EINVAL, errno.ESRCH):
            raise PeerGone(f"no peer to identify (LOCAL_PEERTOKEN: {os.strerror(exc.errno)})") from None
        if exc.errno != errno.ENOPROTOOPT:
            raise error_from_errno(exc.errno, "getsockopt(LOCAL_PEERTOKEN)") from None
    else:
        peer = Peer.from_audit_token(token)
        if peer.pid <= 0:
            raise PeerGone("LOCAL_PEERTOKEN reports pid 0: no peer process")
        return peer
    # Old macOS (< 10.15): pid and credentials, with no pid-reuse guard.
    try:
        cred = _XUCRED.unpack(sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, _XUCRED.size))
        (pid,) = struct.unpack("i", sock.getsockopt(SOL_LOCAL, LOCAL_PEERPID, 4))
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.EINVAL, errno.ESRCH):
            raise PeerGone(f"no peer to identify: {os.strerror(exc.errno)}") from None
        raise error_from_errno(exc.errno, "getsockopt(LOCAL_PEERCRED)") from None
    _version, uid, ngroups = cred[:3]
    gid = cred[3] if ngroups > 0 else -1
    return Peer(pid, uid, gid, -1, None, GUARD_NONE)
