"""Large payloads: sealed memfds handed over with SCM_RIGHTS (Linux).

Payloads up to ``wire.INLINE_MAX`` travel inside the packet. Larger ones are
written into a memfd that the sender then seals against writing, shrinking and
growing; the packet carries only the header (flag ``PAYLOAD_FD``) and the fd.
The receiver insists on every seal, checks the size against the header, and
maps the file read-only: the bytes it hands out cannot change under it, and
no byte is copied on the receiving side.

Why it is fast: the sender fills the memfd with ``write()`` (or writes straight
into a loaned mapping, see :func:`loan`), so pages are allocated in one kernel
pass instead of one page fault each, and the receiver maps with
``MAP_POPULATE`` so its page tables are built in one call. A fresh memfd
mapped and faulted page by page runs at 1.2-1.9 GB/s here; this path runs at
memcpy-like speed (see bench/).

Both transports (the Cython one and its pure twin) call :func:`map_sealed` for
every received fd, so the checks are written once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import weakref
from typing import Optional, Union

from ._closer import close_received
from .args import int_arg
from .errors import InvalidArgument, MessageTooLarge, error_from_errno
from .wire import INLINE_MAX, Drop

__all__ = [
    "MAX_PAYLOAD", "REQUIRED_SEALS", "LoanBuffer", "Untaken", "loan", "sealed_memfd", "map_sealed", "check_backing",
    "fs_magic", "size_of", "prepare", "send",
]

#: Default largest payload a server or client accepts (both configurable with ``max_size=``).
MAX_PAYLOAD = 64 * 1024 * 1024
#: Sealed memfds exist on Linux only: CPython defines ``os.memfd_create``/``MFD_*`` only
#: ``#ifdef HAVE_MEMFD_CREATE`` (Modules/posixmodule.c) and ``fcntl.F_SEAL_*`` only
#: ``#ifdef F_ADD_SEALS`` (Modules/fcntlmodule.c). Elsewhere (macOS) the Mach transport
#: carries large payloads out of line and loaned buffers are anonymous mappings.
HAVE_SEALED_MEMFD = hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")
if HAVE_SEALED_MEMFD:
    REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    _MEMFD_FLAGS = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
_MAP_FLAGS = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
TMPFS_MAGIC = 0x01021994  # include/uapi/linux/magic.h; memfds are on the internal shmem mount
_STATFS_SIZE = 256  # >= sizeof(struct statfs) on every Linux ABI; f_type is its first field
_libc = ctypes.CDLL(None, use_errno=True)

Payload = Union[bytes, bytearray, memoryview, "LoanBuffer"]


class LoanBuffer(mmap.mmap):
    """A writable buffer the payload is built in place, then sent without a copy.

    Made by :func:`loan` (``Client.buffer(size)``, ``Message.buffer(size)``).
    On Linux it is a memfd that sending seals; on macOS an anonymous mapping the
    Mach transport sends as one copy-on-write out-of-line region. Either way it
    can be sent once, and memoryviews taken of it must be released first.
    """

    fd: int = -1  # the memfd (Linux); -1 for an anonymous mapping
    sent: bool = False

    def seal(self) -> int:
        """Unmap, seal and return the memfd (the caller sends and closes it)."""
        if self.sent:
            raise InvalidArgument("this loaned buffer was already sent")
        fd, self.fd, self.sent = self.fd, -1, True
        try:
            self.close()
        except BufferError:
            self.fd, self.sent = fd, False
            raise InvalidArgument("release every memoryview of the loaned buffer before sending it") from None
        # F_SEAL_WRITE fails while a writable shared mapping exists: the close above matters.
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
            return fd
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                os.close(fd)
                raise error_from_errno(exc.errno, "sealing a loaned buffer") from None
        # EBUSY: another process still maps it writable -- a fork()ed child inherited
        # the mapping (mm/memfd.c: memfd_wait_for_pins / mapping_writably_mapped).
        # Its bytes can still change, so they are sent as a sealed copy instead.
        try:
            return _sealed_copy(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Free the buffer without sending it (idempotent)."""
        fd, self.fd, self.sent = self.fd, -1, True
        if fd >= 0:
            os.close(fd)
        if not self.closed:
            try:
                self.close()
            except BufferError:
                pass  # unmapped when the last view goes

    def __enter__(self) -> "LoanBuffer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()


def loan(size: int, limit: int = MAX_PAYLOAD) -> LoanBuffer:
    """A ``size``-byte writable buffer backed by a fresh memfd, pages pre-faulted
    (an anonymous mapping where there are no sealed memfds: macOS)."""
    int_arg(size, "size")
    if not 0 < size <= limit:
        raise MessageTooLarge(f"a loaned buffer must hold 1 to {limit} bytes, not {size}")
    if not HAVE_SEALED_MEMFD:
        return LoanBuffer(-1, size)
    fd = os.memfd_create("machipc-loan", _MEMFD_FLAGS)
    try:
        os.ftruncate(fd, size)
        buf = LoanBuffer(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except BaseException:
        os.close(fd)
        raise
    buf.fd = fd
    return buf


def _sealed_copy(fd: int) -> int:
    """A new sealed memfd holding the bytes of ``fd`` (copied in the kernel)."""
    size = os.fstat(fd).st_size
    copy = os.memfd_create("machipc-payload", _MEMFD_FLAGS)
    try:
        done = 0
        while done < size:
            n = os.copy_file_range(fd, copy, size - done, done, done)
            if n == 0:
                raise OSError(errno.EIO, "short copy")
            done += n
        fcntl.fcntl(copy, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
    except BaseException:
        os.close(copy)
        raise
    return copy


def sealed_memfd(data: Union[bytes, bytearray, memoryview]) -> int:
    """A new memfd holding ``data``, sealed against any change; the caller closes it."""
    fd = os.memfd_create("machipc-payload", _MEMFD_FLAGS)
    try:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_sealed(fd: int, length: int, limit: int, budget=None, account=None) -> tuple[int, Optional[memoryview]]:
    """Check a received payload fd and map it read-only. Always closes ``fd`` (see _closer).

    Returns ``(Drop.OK, view)`` or ``(reason, None)``: the fd must be a regular
    memfd carrying every seal in ``REQUIRED_SEALS`` whose size equals the
    header's ``length`` (else BAD_PAYLOAD_FD), ``length`` must not exceed
    ``limit`` (OVERSIZE), the file must be on shmem (NOT_SHMEM: a hugetlbfs
    file can SIGBUS its readers) and fully allocated (SPARSE, see
    :func:`check_backing`), the mapping must fit ``budget`` (a
    :class:`machipc.budget.MappedBudget`, charged to ``account`` until the view
    is freed; OVER_BUDGET) and the kernel must map it (UNMAPPABLE on ENOMEM).
    """
    try:
        if length > limit:
            return Drop.OVERSIZE, None
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            return Drop.BAD_PAYLOAD_FD, None  # not a memfd (EINVAL) or a bad fd
        if seals & REQUIRED_SEALS != REQUIRED_SEALS:
            return Drop.BAD_PAYLOAD_FD, None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != length or length == 0:
            return Drop.BAD_PAYLOAD_FD, None
        status = check_backing(fd, st)
        if status != Drop.OK:
            return status, None
        if budget is not None and not budget.charge(account, length):
            return Drop.OVER_BUDGET, None
        try:
            mapped = mmap.mmap(fd, length, flags=_MAP_FLAGS, prot=mmap.PROT_READ)
        except OSError as exc:
            if budget is not None:
                budget.refund(account, length)
            if exc.errno in (errno.ENOMEM, errno.EAGAIN):
                return Drop.UNMAPPABLE, None
            return Drop.BAD_PAYLOAD_FD, None
        if budget is not None:
            weakref.finalize(mapped, budget.refund, account, length)
        return Drop.OK, memoryview(mapped)
    finally:
        close_received(fd)  # a peer's fd: it may not be a memfd, and then close() may block


def check_backing(fd: int, st: os.stat_result) -> int:
    """Drop.OK if a peer's memfd of ``st`` may be mapped: on shmem and without holes.

    Only shmem (``fstatfs`` magic TMPFS_MAGIC, mm/shmem.c) is accepted: a
    hugetlbfs file whose pages are gone (hole punched, pool empty) kills the
    reader with SIGBUS instead of failing (NOT_SHMEM). A file with holes
    (``st_blocks`` * 512 below its size: shmem counts allocated and swapped
    pages in i_blocks) is refused (SPARSE): touching a hole would allocate a
    page charged to *our* memory cgroup, so a peer could make us allocate
    what it never paid for. Honest senders write every byte before sending.
    """
    try:
        if fs_magic(fd) != TMPFS_MAGIC:
            return Drop.NOT_SHMEM
    except OSError:
        return Drop.NOT_SHMEM
    if st.st_blocks * 512 < st.st_size:
        return Drop.SPARSE
    return Drop.OK


def fs_magic(fd: int) -> int:
    """The ``f_type`` of the file system ``fd`` is on (``fstatfs(2)``); raises OSError."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return struct.unpack_from("l", buf)[0] & 0xFFFFFFFF


class Untaken:
    """A received large payload still where its sender put it (memfd or arena region).

    Transports hand these up instead of mapping or copying, so the server
    asks the policy first: ``take()`` maps or copies it for an allowed
    sender, ``discard()`` drops it without touching its bytes. Either closes
    the attached fd; a dropped ``Untaken`` is discarded.
    """

    __slots__ = ("conn", "flags", "length", "fd", "ref", "__weakref__")

    def __init__(self, conn, flags: int, length: int, fd: int, ref: Optional[bytes]) -> None:
        self.conn = conn
        self.flags = flags
        self.length = length  #: bytes, as the header says
        self.fd = fd  #: the attached memfd or new arena, or -1 (known arena)
        self.ref = ref  #: the 24-byte arena reference, or None for a sealed memfd

    def __len__(self) -> int:
        return self.length

    def take(self) -> tuple[int, object]:
        """``(Drop.OK, payload)`` or ``(reason, None)``; see the transport's ``Conn.take``."""
        return self.conn.take(self)

    def discard(self) -> None:
        """Close the fd unmapped; a region of an arena already known is handed back."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)  # checked sealable on receipt (shmem or hugetlbfs): cannot block
        if self.ref is not None:
            from .arena import release_ref

            release_ref(self.conn.arenas, self.ref)
            self.ref = None

    def __del__(self) -> None:
        if self.fd >= 0 or self.ref is not None:
            self.discard()


def size_of(data: Payload) -> int:
    """Payload size in bytes (a buffer's ``nbytes``).

    Raises InvalidArgument for a loan already sent and for anything that is
    not bytes-like (``str``, ``int``, a dict...): payloads are bytes, bytearray,
    memoryview, a loaned buffer or any other object with the buffer protocol.
    """
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    if isinstance(data, LoanBuffer):
        if data.sent:
            raise InvalidArgument("this loaned buffer was already sent")
        return len(data)
    if isinstance(data, memoryview):
        return data.nbytes
    try:
        return memoryview(data).nbytes
    except TypeError:
        raise InvalidArgument(
            f"a payload must be bytes-like (bytes, bytearray, memoryview), not {type(data).__name__}"
        ) from None


def prepare(data: Payload, limit: int) -> tuple[int, int]:
    """``(length, fd)`` for sending ``data``: ``fd`` is -1 when it goes inline, else a
    sealed memfd holding it, which the caller sends (``send_fd``) and closes."""
    length = size_of(data)
    if isinstance(data, LoanBuffer):
        return length, data.seal()
    if length <= INLINE_MAX:
        return length, -1
    if length > limit:
        raise MessageTooLarge(f"payload of {length} bytes is over the {limit}-byte limit")
    return length, sealed_memfd(data)


def send(conn, kind: int, request_id: int, data: Payload, timeout: Optional[float], limit: int, arenas=None) -> None:
    """Send ``data`` on a transport connection: inline when small; otherwise through
    ``arenas`` (an ``arena.ArenaSender``) when given, else as a sealed memfd."""
    if type(data) is bytes and len(data) <= INLINE_MAX:  # the common case, first
        conn.send(kind, request_id, data, timeout)
        return
    send_fd = getattr(conn, "send_fd", None)
    if send_fd is None:  # the Mach transport carries large payloads out of line itself
        loaned = isinstance(data, LoanBuffer)
        if loaned and data.sent:
            raise InvalidArgument("this loaned buffer was already sent")
        conn.send(kind, request_id, data, timeout)
        if loaned:
            data.discard()  # the kernel sent a copy-on-write snapshot: sent once, as on Linux
        return
    size = size_of(data)
    outbox = getattr(conn, "outbox", None)
    if outbox is not None and INLINE_MAX < size <= limit and timeout != 0:
        outbox.check(conn, size)  # a server's reply: refuse before writing a memfd the client would not read
    if arenas is not None and INLINE_MAX < size <= limit and not isinstance(data, LoanBuffer) and arenas.usable(size):
        arenas.send(conn, kind, request_id, data, size, timeout)
        return
    length, fd = prepare(data, limit)
    if fd < 0:
        conn.send(kind, request_id, data, timeout)
        return
    try:
        send_fd(kind, request_id, length, fd, timeout)
    finally:
        os.close(fd)
