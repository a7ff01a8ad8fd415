# cython: language_level=3, boundscheck=False, wraparound=False
"""Linux transport, Cython implementation (the twin of ``unix.py``).

Same classes, same records, same validation as ``machipc/unix.py``, whose module
docstring documents the interface. System calls run with the GIL released; one
receive buffer per server is reused for every packet.
"""

import functools
from collections import deque

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport (
    EAGAIN, ECONNABORTED, ECONNRESET, EINTR, EMFILE, EMSGSIZE, ENFILE, ENOBUFS, ENOMEM, EPERM, EPIPE, errno,
)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec, timeval
from posix.unistd cimport close, read, write

from ._message cimport Message as CMessage
from ._posix cimport *
from ._wire cimport *

cdef extern from "_stream_copy.h" nogil:
    void machipc_stream_copy(void *dst, const void *src, size_t n)

from .args import timeout_arg
from .errors import IPCTimeoutError, MessageTooLarge, PeerGone, error_from_errno
from ._closer import close_all_later, close_later, connection_owner
from .arena import forget as arena_forget, hello as arena_hello, locate as arena_locate, release_ref as arena_release_ref
from .budget import Account, ConnLimits
from .outbox import REPLY_QUEUE_BYTES, Outbox
from .wire import batch_room, unpack_hello
from .payload import MAX_PAYLOAD, Untaken, map_sealed
from .peer import OVERFLOW_GID, OVERFLOW_UID

IMPLEMENTATION = "c"
#: The Message type this transport's fast path builds (the server builds the same for the rest).
Message = CMessage

# Cached admissions (Conn.cache_admission): what a connection's packets from its
# last sender get without asking the server.
DEF ADMIT_NONE = 0
DEF ADMIT_ALLOWED = 1
DEF ADMIT_REJECTED = 2
cdef object _COUNTED = object()  # a packet the fast path rejected and counted

# Exported so tests can check they equal machipc.wire's.
CONSTANTS = {
    "MAGIC": WIRE_MAGIC, "VERSION": WIRE_VERSION, "HEADER_SIZE": HEADER_SIZE,
    "INLINE_MAX": INLINE_MAX, "KNOWN_FLAGS": KNOWN_FLAGS,
    "MESSAGE": KIND_MESSAGE, "REQUEST": KIND_REQUEST, "REPLY": KIND_REPLY, "ERROR": KIND_ERROR,
    "HELLO": KIND_HELLO, "VERSION_ERROR_VERSION": VERSION_ERROR_VERSION,
    "SHORT": DROP_SHORT, "BAD_MAGIC": DROP_BAD_MAGIC, "BAD_VERSION": DROP_BAD_VERSION,
    "BAD_KIND": DROP_BAD_KIND, "BAD_FLAGS": DROP_BAD_FLAGS, "BAD_LENGTH": DROP_BAD_LENGTH,
    "TRUNCATED": DROP_TRUNCATED, "NO_CREDENTIALS": DROP_NO_CREDENTIALS,
    "UNEXPECTED_FDS": DROP_UNEXPECTED_FDS, "CTRUNC": DROP_CTRUNC,
    "BAD_REQUEST_ID": DROP_BAD_REQUEST_ID, "CLOSED": DROP_CLOSED,
    "BAD_PAYLOAD_FD": DROP_BAD_PAYLOAD_FD, "OVERSIZE": DROP_OVERSIZE, "PAYLOAD_FD": FLAG_PAYLOAD_FD,
    "BAD_ARENA": DROP_BAD_ARENA, "ARENA": FLAG_ARENA, "ARENA_REF_SIZE": ARENA_REF_SIZE,
    "UNMAPPABLE": DROP_UNMAPPABLE, "OVER_BUDGET": DROP_OVER_BUDGET, "NOT_SHMEM": DROP_NOT_SHMEM,
    "SPARSE": DROP_SPARSE, "CONN_LIMIT": DROP_CONN_LIMIT, "CLOSE_BUDGET": DROP_CLOSE_BUDGET,
    "BATCH": FLAG_BATCH, "BAD_BATCH": DROP_BAD_BATCH, "BATCH_ITEM_SIZE": BATCH_ITEM_SIZE,
}

# Room for credentials, one pidfd and up to 253 unexpected fds (so they can be closed).
DEF CMSG_BUF = 2048
DEF MAX_RIGHTS = 256  # more fds than SCM_MAX_FD (253) fit in no control message
DEF MAX_EVENTS = 64
DEF RECV_BATCH = 16  # packets a server reads from one connection per recvmmsg
DEF CMSG_FD_SPACE = 64  # >= CMSG_SPACE(sizeof(int)) on every ABI
DEF SEND_BATCH = 64     # packets per sendmmsg call
DEF SMALL_SEND = 1024   # packets up to this size go through send(2), copied into one buffer
DEF ACCEPT_PAUSE = 0.1  # seconds the listener is left alone after accept ran out of fds

cdef unsigned long long _next_id = 0
# A packet without credentials reads pid 0 with these ids (see unix.py _parse).
cdef unsigned int _overflow_uid = OVERFLOW_UID
cdef unsigned int _overflow_gid = OVERFLOW_GID


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline double _deadline(object timeout) except? -2.0:
    """Absolute deadline; -1.0 means no limit."""
    if timeout is None:
        return -1.0
    if type(timeout) is not float or not timeout >= 0:  # the common case: one check
        timeout = timeout_arg(timeout)  # InvalidArgument for a bad one
    return _now() + <double>timeout


cdef inline int _ms_left(double deadline) noexcept nogil:
    """Milliseconds to wait (rounded up) until ``deadline``; -1 forever."""
    cdef double left
    if deadline < 0:
        return -1
    left = deadline - _now()
    if left <= 0:
        return 0
    return <int>(left * 1000.0) + 1


cdef inline uint64_t _le64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(7, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef inline uint32_t _le32(const uint8_t *p) noexcept nogil:
    return p[0] | (p[1] << 8) | (p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void _put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)
    p[2] = <uint8_t>(v >> 16)
    p[3] = <uint8_t>(v >> 24)


cdef inline void _put64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t>(v >> (8 * i))


cdef inline void _pack_header(uint8_t *h, int kind, uint64_t request_id, uint64_t length, uint32_t flags,
                              int version=WIRE_VERSION) noexcept nogil:
    h[0] = WIRE_MAGIC & 0xFF
    h[1] = WIRE_MAGIC >> 8
    h[2] = <uint8_t>version
    h[3] = <uint8_t>kind
    _put32(h + 4, flags)
    _put64(h + 8, request_id)
    _put64(h + 16, length)


cdef inline void _packet_msg(msghdr *msg, iovec *iov, char *control, const void *header, size_t hlen,
                             const void *body, size_t blen, int fd) noexcept nogil:
    """Fill ``msg`` for one packet: ``header`` + ``body`` (``iov``: 2 entries), with ``fd``
    attached as SCM_RIGHTS when >= 0 (``control``: CMSG_FD_SPACE bytes)."""
    cdef cmsghdr *c
    iov[0].iov_base = <void *>header
    iov[0].iov_len = hlen
    iov[1].iov_base = <void *>body
    iov[1].iov_len = blen
    memset(msg, 0, sizeof(msghdr))
    msg.msg_iov = iov
    msg.msg_iovlen = 2
    if fd >= 0:
        memset(control, 0, CMSG_FD_SPACE)
        msg.msg_control = control
        msg.msg_controllen = CMSG_SPACE(sizeof(int))
        c = CMSG_FIRSTHDR(msg)
        c.cmsg_level = SOL_SOCKET
        c.cmsg_type = SCM_RIGHTS
        c.cmsg_len = CMSG_LEN(sizeof(int))
        (<int *>CMSG_DATA(c))[0] = fd


cdef ssize_t _send_packet(int fd, const msghdr *msg) noexcept nogil:
    """One non-blocking sendmsg of ``msg``. A small packet with nothing attached goes as
    one copied buffer through send(2) instead: the kernel's send path reads no msghdr or
    iovec array from user memory (import_ubuf), about 150 ns less per packet here."""
    cdef char packet[SMALL_SEND]
    cdef size_t n = 0
    cdef size_t i
    if msg.msg_controllen == 0:
        for i in range(msg.msg_iovlen):
            n += msg.msg_iov[i].iov_len
        if n <= SMALL_SEND:
            n = 0
            for i in range(msg.msg_iovlen):
                memcpy(packet + n, msg.msg_iov[i].iov_base, msg.msg_iov[i].iov_len)
                n += msg.msg_iov[i].iov_len
            return send(fd, packet, n, MSG_DONTWAIT | MSG_NOSIGNAL)
    return sendmsg(fd, msg, MSG_DONTWAIT | MSG_NOSIGNAL)


cdef int _send_failed(int err, double deadline, object timeout, str what) except -1:
    """After a failed send: 0 to try again (EINTR, or a full queue with time left), else raise.

    EINTR (PEP 475): the Python signal handlers run now; an exception one
    raises propagates, otherwise the caller retries with what is left of the
    deadline.
    """
    if err == EINTR:
        PyErr_CheckSignals()
        return 0
    if err == EAGAIN:
        if _ms_left(deadline) == 0:
            raise IPCTimeoutError(f"{what}: the peer's queue stayed full for {timeout} s")
        return 0
    if err == EPIPE or err == ECONNRESET:
        raise PeerGone(f"{what}: the peer closed the connection")
    if err == EMSGSIZE:
        raise MessageTooLarge(f"{what}: too large for one packet")
    raise error_from_errno(err, what)


cdef class Received:
    """One received packet, a connection's end, or a refused connection: the fields of
    machipc.received.Received (its docstring), as an extension type."""

    cdef readonly int status
    cdef readonly object conn
    cdef readonly int kind
    cdef readonly unsigned int flags
    cdef readonly unsigned long long request_id
    cdef readonly object payload
    cdef readonly int pid
    cdef readonly unsigned int uid
    cdef readonly unsigned int gid
    cdef readonly int pidfd
    cdef readonly object peer  # always None here (Linux): the caller builds the Peer from pidfd

    def __repr__(self):
        return (f"<Received status={self.status} kind={self.kind} flags={self.flags:#x} request_id={self.request_id} "
                f"pid={self.pid} uid={self.uid} gid={self.gid} pidfd={self.pidfd}>")


cdef Received _received(int status, conn, int kind=0, unsigned int flags=0, unsigned long long request_id=0,
                        payload=b"", int pid=0, unsigned int uid=0, unsigned int gid=0, int pidfd=-1):
    cdef Received r = Received.__new__(Received)
    r.status = status
    r.conn = conn
    r.kind = kind
    r.flags = flags
    r.request_id = request_id
    r.payload = payload
    r.pid = pid
    r.uid = uid
    r.gid = gid
    r.pidfd = pidfd
    return r


cdef struct Packet:
    ssize_t size       # bytes received
    int status         # DROP_*
    int kind
    uint32_t flags
    uint64_t request_id
    int pid
    unsigned int uid
    unsigned int gid
    int pidfd
    int fd             # the one SCM_RIGHTS fd kept for a PAYLOAD_FD packet, else -1
    uint64_t length    # the header's payload length
    Py_ssize_t items   # a valid BATCH packet's item count
    int ndeferred      # received fds whose close() may block: for the closer thread
    int deferred[MAX_RIGHTS]


cdef int _check_header(const uint8_t *p, ssize_t n, bint server_side, Packet *pk) noexcept nogil:
    """Decode and validate the header (same rules as wire.check_header)."""
    cdef uint64_t length
    if n < HEADER_SIZE:
        return DROP_SHORT
    if (p[0] | (p[1] << 8)) != WIRE_MAGIC:
        return DROP_BAD_MAGIC
    pk.kind = p[3]
    pk.flags = p[4] | (p[5] << 8) | (p[6] << 16) | (<uint32_t>p[7] << 24)
    pk.request_id = _le64(p + 8)
    length = _le64(p + 16)
    if p[2] != WIRE_VERSION and (server_side or pk.kind != KIND_ERROR):
        return DROP_BAD_VERSION  # a client reads an ERROR of any version (its layout never changes)
    if server_side:
        if pk.kind != KIND_MESSAGE and pk.kind != KIND_REQUEST:
            return DROP_BAD_KIND
    elif pk.kind != KIND_REPLY and pk.kind != KIND_ERROR and pk.kind != KIND_HELLO:
        return DROP_BAD_KIND
    if pk.flags & ~(<uint32_t>KNOWN_FLAGS) or (pk.flags & FLAG_BATCH and (pk.flags != FLAG_BATCH or pk.kind != KIND_MESSAGE)):
        return DROP_BAD_FLAGS
    pk.length = length
    if pk.flags & FLAG_ARENA:
        if n != HEADER_SIZE + ARENA_REF_SIZE or length == 0:
            return DROP_BAD_LENGTH
    elif pk.flags & FLAG_PAYLOAD_FD:
        if n != HEADER_SIZE or length == 0:
            return DROP_BAD_LENGTH
    elif length != <uint64_t>(n - HEADER_SIZE):
        return DROP_BAD_LENGTH
    if (pk.request_id == 0) != (pk.kind == KIND_MESSAGE or pk.kind == KIND_HELLO):
        return DROP_BAD_REQUEST_ID
    return DROP_OK


cdef Py_ssize_t _batch_count(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """Items in a BATCH body of ``n`` bytes, 0 when it is malformed (wire.batch_count's rules:
    one or more ``u32 LE length | bytes`` back to back, nothing cut short, nothing after)."""
    cdef Py_ssize_t at = 0, count = 0
    cdef uint32_t size
    while at < n:
        if n - at < BATCH_ITEM_SIZE:
            return 0
        size = _le32(p + at)
        at += BATCH_ITEM_SIZE
        if <Py_ssize_t>size > n - at:
            return 0
        at += size
        count += 1
    return count


cdef list _split_batch(const uint8_t *p, Py_ssize_t count):
    """The ``count`` items of a body _batch_count accepted, as a list of bytes."""
    cdef list out = [None] * count
    cdef Py_ssize_t i, at = 0
    cdef uint32_t size
    for i in range(count):
        size = _le32(p + at)
        at += BATCH_ITEM_SIZE
        out[i] = PyBytes_FromStringAndSize(<const char *>p + at, size)
        at += size
    return out


def split_batch(body):
    """wire.split_batch in C: the items of a BATCH body (a list of bytes), None when malformed."""
    cdef Py_buffer view
    cdef Py_ssize_t count
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        count = _batch_count(<const uint8_t *>view.buf, view.len)
        return _split_batch(<const uint8_t *>view.buf, count) if count else None
    finally:
        PyBuffer_Release(&view)


cdef class Batch:
    """The payload a BATCH packet is handed up as: its one-way messages, one sender.

    ``len(batch)`` is the number of messages (counted when the packet was
    checked); ``items()`` splits the body into their payloads (a list of
    bytes, in order) only when called, so a sender the policy refuses costs no
    per-item work.
    """

    cdef bytes body
    cdef Py_ssize_t count

    def __len__(self):
        return self.count

    def items(self):
        return _split_batch(<const uint8_t *>(<char *>self.body), self.count)


cdef inline void _close_received(Packet *pk, int fd) noexcept nogil:
    """Close a peer's fd now if it is a shmem file (cannot block), else defer it (_closer)."""
    if fcntl(fd, F_GET_SEALS) >= 0 or pk.ndeferred >= MAX_RIGHTS:
        close(fd)
    else:
        pk.deferred[pk.ndeferred] = fd
        pk.ndeferred += 1


cdef inline void _hand_off_deferred(Packet *pk, owner):
    close_all_later([pk.deferred[i] for i in range(pk.ndeferred)], owner)
    pk.ndeferred = 0


cdef int _recv_packet(int fd, uint8_t *buf, char *cbuf, bint server_side, Packet *pk, bint wait=False) noexcept nogil:
    """One non-blocking recvmsg. Returns 1 (packet or EOF in pk), 0 (nothing queued), -1 (errno).

    ``wait``: a blocking recvmsg instead (the fd must not be O_NONBLOCK), bounded by its
    SO_RCVTIMEO: 0 when that ran out, -1 with errno EINTR on a signal (the caller runs its
    Python handler before waiting again)."""
    cdef iovec iov
    cdef msghdr msg
    cdef ssize_t n
    _packet_buffers(&msg, &iov, buf, cbuf)
    while True:
        n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC if wait else MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
        if n >= 0:
            break
        if errno == EINTR:
            if wait:
                return -1
            continue
        if errno == EAGAIN:
            return 0
        if errno == ECONNRESET or errno == EPIPE:
            # The peer left with our replies unread: the error is reported once, ahead
            # of the packets it sent before leaving. Read on; EOF comes after them.
            continue
        return -1
    _parse_packet(buf, n, &msg, server_side, pk)
    return 1


cdef inline void _packet_buffers(msghdr *msg, iovec *iov, uint8_t *buf, char *cbuf) noexcept nogil:
    """Point ``msg`` at one packet's buffers (PACKET_MAX bytes, CMSG_BUF of control data)."""
    iov.iov_base = buf
    iov.iov_len = PACKET_MAX
    msg.msg_name = NULL
    msg.msg_namelen = 0
    msg.msg_iov = iov
    msg.msg_iovlen = 1
    msg.msg_control = cbuf
    msg.msg_controllen = CMSG_BUF
    msg.msg_flags = 0


cdef int _recv_batch(int fd, mmsghdr *vec, iovec *iov, uint8_t *bufs, char *cbufs, int count, Packet *pks) noexcept nogil:
    """Server side: up to ``count`` queued packets in one non-blocking recvmmsg, parsed into
    ``pks`` (packet i in ``bufs + i * PACKET_MAX``). Returns how many (0: nothing queued; an
    EOF ends the batch as its last packet), or -1 (errno)."""
    cdef int n, i
    for i in range(count):
        _packet_buffers(&vec[i].msg_hdr, &iov[i], bufs + i * PACKET_MAX, cbufs + i * CMSG_BUF)
    while True:
        n = recvmmsg(fd, vec, count, MSG_DONTWAIT | MSG_CMSG_CLOEXEC, NULL)
        if n >= 0:
            break
        if errno == EINTR or errno == ECONNRESET or errno == EPIPE:
            continue  # (ECONNRESET: as in _recv_packet)
        return 0 if errno == EAGAIN else -1
    for i in range(n):
        _parse_packet(bufs + i * PACKET_MAX, vec[i].msg_len, &vec[i].msg_hdr, True, &pks[i])
        if pks[i].status == DROP_CLOSED:
            return i + 1  # after EOF recvmmsg fills the rest with more EOFs
    return n


cdef void _parse_packet(uint8_t *buf, ssize_t n, msghdr *msg, bint server_side, Packet *pk) noexcept nogil:
    """Check one received packet (``n`` bytes in ``buf``, its control data in ``msg``) into ``pk``:
    the status, the header's fields, the credentials and pidfd, the one fd kept; every other
    fd is closed (or deferred: _close_received)."""
    cdef cmsghdr *c
    cdef int status = DROP_OK
    cdef int hstatus
    cdef bint creds = False
    cdef int *fds
    cdef size_t nfds, i
    cdef size_t nrights = 0
    cdef ucred cred
    pk.size = n
    pk.kind = 0
    pk.flags = 0
    pk.request_id = 0
    pk.pid = 0
    pk.uid = 0
    pk.gid = 0
    pk.pidfd = -1
    pk.fd = -1
    pk.length = 0
    pk.items = 0
    pk.ndeferred = 0
    if n == 0 and msg.msg_controllen == 0:
        pk.status = DROP_CLOSED
        return
    c = CMSG_FIRSTHDR(msg)
    while c != NULL:
        if c.cmsg_level == SOL_SOCKET:
            if c.cmsg_type == SCM_CREDENTIALS and c.cmsg_len >= CMSG_LEN(sizeof(ucred)):
                memcpy_ucred(&cred, CMSG_DATA(c))
                pk.pid = cred.pid
                pk.uid = cred.uid
                pk.gid = cred.gid
                creds = True
            elif c.cmsg_type == SCM_PIDFD and c.cmsg_len >= CMSG_LEN(sizeof(int)) and pk.pidfd == -1:
                pk.pidfd = (<int *>CMSG_DATA(c))[0]
            elif c.cmsg_type == SCM_RIGHTS:
                # Keep the first fd (a PAYLOAD_FD packet's memfd), close every other one.
                fds = <int *>CMSG_DATA(c)
                nfds = (c.cmsg_len - CMSG_LEN(0)) // sizeof(int)
                for i in range(nfds):
                    if fds[i] < 0:
                        continue
                    nrights += 1
                    if pk.fd < 0:
                        pk.fd = fds[i]
                    else:
                        _close_received(pk, fds[i])
        c = CMSG_NXTHDR(msg, c)
    if pk.pidfd < -1:
        pk.pidfd = -1  # the kernel reports a failed pidfd as a negative errno
    if msg.msg_flags & MSG_CTRUNC:
        status = DROP_CTRUNC
    elif msg.msg_flags & MSG_TRUNC:
        status = DROP_TRUNCATED
    elif server_side and (not creds or (pk.pid == 0 and pk.uid == _overflow_uid and pk.gid == _overflow_gid)):
        # pid 0 with real ids: a sender in a pid namespace we cannot see (see unix.py).
        status = DROP_NO_CREDENTIALS
    hstatus = _check_header(buf, n, server_side, pk)
    pk.status = status if status != DROP_OK else hstatus
    if pk.status == DROP_OK:
        # The one fd a PAYLOAD_FD packet may carry must be sealable: a memfd, whose
        # close cannot block. Any other fd breaks the protocol.
        if nrights and not (pk.flags & FLAG_PAYLOAD_FD and nrights == 1 and fcntl(pk.fd, F_GET_SEALS) >= 0):
            pk.status = DROP_UNEXPECTED_FDS
        elif not nrights and pk.flags & FLAG_PAYLOAD_FD:
            pk.status = DROP_BAD_PAYLOAD_FD  # the flag promised an fd that did not come
        elif pk.flags & FLAG_BATCH:
            pk.items = _batch_count(buf + HEADER_SIZE, n - HEADER_SIZE)
            if pk.items == 0:
                pk.status = DROP_BAD_BATCH
    if pk.status != DROP_OK:
        if pk.fd >= 0:
            _close_received(pk, pk.fd)
            pk.fd = -1
        if pk.pidfd >= 0:
            close(pk.pidfd)
            pk.pidfd = -1


cdef bint _gone(int fd, char *cbuf) noexcept nogil:
    """The client of a just-accepted socket already closed it, leaving nothing to read
    (see unix._gone): peek for EOF, 0 bytes and no control data."""
    cdef msghdr msg
    cdef iovec iov
    cdef char byte
    cdef ssize_t n
    iov.iov_base = &byte
    iov.iov_len = 1
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    msg.msg_control = cbuf
    msg.msg_controllen = CMSG_SPACE(sizeof(ucred))
    n = recvmsg(fd, &msg, MSG_PEEK | MSG_DONTWAIT)
    return n == 0 and msg.msg_controllen == 0


cdef inline void memcpy_ucred(ucred *dst, const unsigned char *src) noexcept nogil:
    cdef const unsigned char *s = src
    cdef unsigned char *d = <unsigned char *>dst
    cdef size_t i
    for i in range(sizeof(ucred)):
        d[i] = s[i]


# -- receiver-owned copies of arena payloads ---------------------------------
# Fresh memory for every large copy would page-fault at a few GB/s; freed blocks
# are kept (a few, up to POOL_BYTES) and reused, so the copy runs at memcpy speed.

DEF POOL_SLOTS = 8
# Copies of a large payload from this size on use streaming stores (_stream_copy.h): above
# a CPU's L2 the copy does not stay in its cache anyway. Smaller ones stay cached for
# whoever reads them next on this CPU.
DEF STREAM_MIN = 4 * 1024 * 1024
DEF POOL_BYTES = 256 * 1024 * 1024
DEF MAP_POPULATE_FLAG = 0x8000  # Linux MAP_POPULATE

cdef inline void _copy(void *dst, const void *src, size_t n) noexcept nogil:
    if n >= STREAM_MIN:
        machipc_stream_copy(dst, src, n)
    else:
        memcpy(dst, src, n)


cdef char *_pool_ptr[POOL_SLOTS]
cdef size_t _pool_cap[POOL_SLOTS]
cdef size_t _pool_total = 0


cdef char *_pool_take(size_t size, size_t *capacity):
    """A block of at least ``size`` bytes (at most twice that), reused when possible."""
    global _pool_total
    cdef int i
    cdef void *p
    for i in range(POOL_SLOTS):
        if _pool_ptr[i] != NULL and size <= _pool_cap[i] <= 2 * size:
            capacity[0] = _pool_cap[i]
            _pool_total -= _pool_cap[i]
            p = _pool_ptr[i]
            _pool_ptr[i] = NULL
            return <char *>p
    capacity[0] = (size + 65535) & ~(<size_t>65535)
    p = mmap(NULL, capacity[0], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE_FLAG, -1, 0)
    if p == MAP_FAILED:
        raise MemoryError(f"cannot map {capacity[0]} bytes for a received payload")
    return <char *>p


cdef void _pool_give(char *p, size_t capacity) noexcept:
    global _pool_total
    cdef int i
    if _pool_total + capacity <= POOL_BYTES:
        for i in range(POOL_SLOTS):
            if _pool_ptr[i] == NULL:
                _pool_ptr[i] = p
                _pool_cap[i] = capacity
                _pool_total += capacity
                return
    munmap(p, capacity)


cdef class PrivateBuffer:
    """Read-only bytes copied out of a sender's arena, in memory only this process maps."""

    cdef char *data
    cdef size_t size
    cdef size_t capacity

    def __cinit__(self, size_t size):
        self.data = _pool_take(size, &self.capacity)
        self.size = size

    def __dealloc__(self):
        if self.data != NULL:
            _pool_give(self.data, self.capacity)

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("a received payload is read-only")
        PyBuffer_FillInfo(view, self, self.data, self.size, 1, flags)

    def __len__(self):
        return self.size


cdef class Conn:
    """One connected SEQPACKET socket; the fd is closed when the last reference goes."""

    cdef readonly unsigned long long id
    cdef readonly int fd
    cdef bint server_side
    cdef bint pidfs
    cdef bint has_last
    cdef int last_pid
    cdef unsigned int last_uid, last_gid
    cdef unsigned long long last_ino
    # The process that connected, pinned at accept (SO_PEERPIDFD); see _identify().
    cdef int peer_pid
    cdef int peer_pidfd
    cdef unsigned long long peer_ino
    cdef bint pidfd_per_packet  # SO_PASSPIDFD is on: packets carry their own pidfd
    cdef int rcvtimeo_ms  # client side: the SO_RCVTIMEO set on fd, in ms (0: none yet)
    # Threads using ``fd`` without the GIL; close() waits for them (see _enter/close).
    cdef int busy
    cdef bint close_pending
    cdef public unsigned long long max_payload  # largest memfd payload mapped
    cdef public dict arenas  # the peer's arenas: id -> mapping
    cdef public object peer_limits  # the server's wire.Limits from its HELLO (client side; None until read)
    cdef readonly Py_ssize_t batch_room  # largest BATCH body the server takes (wire.batch_room); 0: none
    cdef public object outbox  # server side: replies waiting for the peer (machipc.outbox)
    # Server side: the MappedBudget payloads and arenas are charged to (None: no
    # limit), this connection's Account in it, and the uid that connected (SO_PEERCRED),
    # owner of the fds it leaves to close.
    cdef public object budget
    cdef public object account
    cdef public long long peer_uid
    # Server side: the cached admission of the connection's last sender (cache_admission).
    cdef int admit_mode
    cdef object admit_peer
    cdef object admit_decision
    cdef unsigned long long admit_epoch
    cdef long long reject_budget
    cdef unsigned long long fast_rejected  # counted by the fast path, not yet taken (take_rejected)
    cdef object pending  # server side: a batch's packets not handed out yet (_next_packet); deque or None
    cdef bint drained    # server side: the last recvmmsg took fewer packets than it asked for
    cdef uint8_t *buf    # client side only; a server's connections share its buffer
    cdef char *cbuf

    def __cinit__(self, sock=None, bint server_side=False, bint pidfs=False):
        global _next_id
        _next_id += 1
        self.id = _next_id
        self.fd = -1
        self.peer_pidfd = -1
        self.server_side = server_side
        self.pidfs = pidfs
        self.max_payload = MAX_PAYLOAD
        self.arenas = {}
        self.account = Account()
        self.peer_uid = -1
        if sock is not None:
            # A client's socket blocks: a receive waits in recvmsg itself (see _recv_until).
            # Every other call passes MSG_DONTWAIT. A server's sockets never block.
            sock.setblocking(not server_side)
            self.fd = sock.detach()
        if not server_side:
            self._alloc_buffers()

    cdef _alloc_buffers(self):
        self.buf = <uint8_t *>malloc(PACKET_MAX)
        self.cbuf = <char *>malloc(CMSG_BUF)
        if self.buf == NULL or self.cbuf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.peer_pidfd >= 0:
            close(self.peer_pidfd)
        self._close_now()
        free(self.buf)
        free(self.cbuf)

    def send(self, int kind, unsigned long long request_id, payload, timeout, int version=WIRE_VERSION):
        """Send one packet, waiting up to ``timeout`` while the peer's queue is full
        (``version``: the header's, for an ERROR answering another version).

        Server side, unless ``timeout`` is 0: never waits; a packet the peer's
        socket has no room for waits in ``outbox`` (may raise UnreadReplies).
        """
        cdef Py_buffer view
        cdef uint8_t header[HEADER_SIZE]
        cdef iovec iov[2]
        cdef msghdr msg
        cdef bint queue = self.outbox is not None and timeout != 0
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            _pack_header(header, kind, request_id, view.len, 0, version)
            _packet_msg(&msg, iov, NULL, header, HEADER_SIZE, view.buf, view.len, -1)
            if not queue:
                self._sendmsg(&msg, timeout, view.len)
                return
            if not self.outbox.waiting and self._send_now(&msg, view.len):
                return  # the common case: room in the socket, nothing queued before it
        finally:
            PyBuffer_Release(&view)
        self.outbox.send(self, PyBytes_FromStringAndSize(<char *>header, HEADER_SIZE), payload)

    def send_many(self, list payloads, timeout, Py_ssize_t start=0, Py_ssize_t limit=INLINE_MAX):
        """Send one-way messages ``payloads[start:]`` in order, up to the first that is not
        ``bytes`` of at most ``limit`` bytes (``limit`` is capped at INLINE_MAX).

        Returns the index of the first message not sent: that one, or
        ``len(payloads)`` when all went. Once the server's HELLO announced
        FEATURE_BATCH, as many messages as fit go in one BATCH packet
        (docs/protocol.md §5.4), else one packet each; up to 64 packets per
        ``sendmmsg``, headers and batch bodies built in C. Waits up to
        ``timeout`` seconds (for the whole call; None: no limit) while the
        server's queue is full, then raises IPCTimeoutError saying how many
        went; ``timeout`` 0 never waits and returns at the first packet that
        found the queue full. Raises PeerGone when the connection is gone.
        """
        cdef double deadline = _deadline(timeout)
        cdef Py_ssize_t count = len(payloads)
        cdef Py_ssize_t end
        cdef object item
        cdef int fd
        if limit > INLINE_MAX:
            limit = INLINE_MAX
        if start < 0 or start > count:
            raise IndexError(f"send_many: start {start} outside the {count} payloads")
        end = start
        while end < count:
            item = payloads[end]
            if type(item) is not bytes or len(<bytes>item) > limit:
                break
            end += 1
        if end == start:
            return start
        fd = self._enter()
        try:
            # A list of its own: another thread changing ``payloads`` cannot free a
            # bytes object sendmmsg is reading without the GIL.
            return start + self._send_packets(fd, payloads[start:end], deadline, timeout)
        finally:
            self._leave()

    cdef Py_ssize_t _send_packets(self, int fd, list items, double deadline, timeout) except -1:
        """Send every one of ``items`` (bytes that fit inline), SEND_BATCH packets per
        ``sendmmsg``; returns how many went (fewer only when ``timeout`` is 0 and the
        queue is full)."""
        cdef Py_ssize_t n = len(items), done = 0, i, j, at, used, size, total
        cdef int npk, p, sent, err, rc
        cdef Py_ssize_t room = self.batch_room
        cdef bint nowait = timeout is not None and timeout == 0
        cdef Py_ssize_t first[SEND_BATCH + 1]  # packet p carries items first[p] .. first[p + 1] - 1
        cdef Py_ssize_t body[SEND_BATCH]       # bytes of packet p's body
        cdef uint8_t headers[SEND_BATCH][HEADER_SIZE]
        cdef mmsghdr vec[SEND_BATCH]
        cdef iovec iov[2 * SEND_BATCH]
        cdef pollfd pfd
        cdef uint8_t *bodies
        cdef uint8_t *out
        cdef const char *data
        pfd.fd = fd
        pfd.events = POLLOUT
        while done < n:
            # Group: as many items as fit in one BATCH body of ``room`` bytes; one alone
            # (room 0: the server takes no batches, or an item too big for one) goes plain.
            npk = 0
            i = done
            total = 0
            while i < n and npk < SEND_BATCH:
                first[npk] = i
                used = 0
                j = i
                while j < n:
                    size = BATCH_ITEM_SIZE + len(<bytes>items[j])
                    if j > i and used + size > room:
                        break
                    used += size
                    j += 1
                body[npk] = used if j - i > 1 else len(<bytes>items[i])
                if j - i > 1:
                    total += used
                npk += 1
                i = j
            first[npk] = i
            bodies = <uint8_t *>malloc(total if total else 1)
            if bodies == NULL:
                raise MemoryError()
            try:
                memset(vec, 0, sizeof(mmsghdr) * npk)
                out = bodies
                for p in range(npk):
                    i = first[p]
                    if first[p + 1] - i == 1:
                        _pack_header(headers[p], KIND_MESSAGE, 0, body[p], 0)
                        iov[2 * p + 1].iov_base = <char *>(<bytes>items[i])
                    else:
                        _pack_header(headers[p], KIND_MESSAGE, 0, body[p], FLAG_BATCH)
                        iov[2 * p + 1].iov_base = out
                        for j in range(i, first[p + 1]):
                            data = <bytes>items[j]
                            size = len(<bytes>items[j])
                            _put32(out, <uint32_t>size)
                            memcpy(out + BATCH_ITEM_SIZE, data, size)
                            out += BATCH_ITEM_SIZE + size
                    iov[2 * p].iov_base = headers[p]
                    iov[2 * p].iov_len = HEADER_SIZE
                    iov[2 * p + 1].iov_len = body[p]
                    vec[p].msg_hdr.msg_iov = &iov[2 * p]
                    vec[p].msg_hdr.msg_iovlen = 2
                with nogil:
                    sent = sendmmsg(fd, vec, <unsigned int>npk, MSG_DONTWAIT | MSG_NOSIGNAL)
                    err = errno if sent < 0 else 0
                    if err == EAGAIN and not nowait:
                        rc = _ms_left(deadline)
                        if rc != 0 and poll(&pfd, 1, rc) < 0 and errno == EINTR:
                            err = EINTR  # a signal: its Python handler runs before we wait again
            finally:
                free(bodies)
            if sent > 0:
                done = first[sent]
            elif err == EAGAIN and nowait:
                return done
            else:
                _send_failed(err, deadline, timeout, f"send_many ({done} of {n} sent)")
        return done

    def send_fd(self, int kind, unsigned long long request_id, unsigned long long length, int fd, timeout,
                unsigned int flags=FLAG_PAYLOAD_FD, bytes body=b""):
        """Send a header for an out-of-band payload of ``length`` bytes, with ``body``
        and, when ``fd`` >= 0, the fd attached (a sealed memfd, or a new arena)."""
        cdef uint8_t header[HEADER_SIZE]
        cdef iovec iov[2]
        cdef msghdr msg
        cdef char control[CMSG_FD_SPACE]
        _pack_header(header, kind, request_id, length, flags)
        if self.outbox is not None and timeout != 0:
            self.outbox.send(self, PyBytes_FromStringAndSize(<char *>header, HEADER_SIZE), body, fd, length if fd >= 0 else 0)
            return
        _packet_msg(&msg, iov, control, header, HEADER_SIZE, <char *>body, len(body), fd)
        self._sendmsg(&msg, timeout, length)

    def try_send(self, bytes header, body, int fd=-1):
        """One non-blocking send of a packet (``fd`` attached if >= 0); False when the socket is full."""
        cdef Py_buffer view
        cdef iovec iov[2]
        cdef msghdr msg
        cdef char control[CMSG_FD_SPACE]
        PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
        try:
            _packet_msg(&msg, iov, control, <char *>header, len(header), view.buf, view.len, fd)
            return self._send_now(&msg, len(header) + view.len)
        finally:
            PyBuffer_Release(&view)

    cdef bint _send_now(self, msghdr *msg, size_t size) except -1:
        """One non-blocking sendmsg: True when sent, False when the socket is full."""
        cdef ssize_t n
        cdef int err
        cdef int fd = self._enter()
        try:
            while True:
                with nogil:
                    n = _send_packet(fd, msg)
                    err = errno if n < 0 else 0
                if err == 0:
                    return True
                if err == EAGAIN:
                    return False
                _send_failed(err, -1.0, None, f"send of {size} bytes")  # EINTR: 0, try again
        finally:
            self._leave()

    cdef int _enter(self) except -1:
        """Claim ``fd`` for a system call made without the GIL; pair with _leave()."""
        if self.fd < 0 or self.close_pending:
            raise PeerGone("send: the connection is closed")
        self.busy += 1
        return self.fd

    cdef void _leave(self) noexcept:
        self.busy -= 1
        if self.busy == 0 and self.close_pending:
            self._close_now()

    cdef void _close_now(self) noexcept:
        cdef int fd = self.fd
        self.fd = -1
        self.close_pending = False
        if fd < 0:
            return
        if self.server_side:
            # Its queue may hold a peer's fds, whose release would run (and may
            # block) in the closing thread: the closer does it (machipc._closer).
            try:
                close_later(fd, connection_owner(self.peer_uid))
                return
            except BaseException:
                pass
        close(fd)

    cdef _sendmsg(self, msghdr *msg, timeout, size_t size):
        self._sendmsg_until(msg, _deadline(timeout), timeout, size)

    cdef _sendmsg_until(self, msghdr *msg, double deadline, timeout, size_t size):
        cdef int fd = self._enter()
        try:
            self._sendmsg_fd(fd, msg, deadline, timeout, size)
        finally:
            self._leave()

    cdef _sendmsg_fd(self, int fd, msghdr *msg, double deadline, timeout, size_t size):
        cdef ssize_t n
        cdef int err = 0
        cdef int rc
        cdef pollfd pfd
        pfd.fd = fd
        pfd.events = POLLOUT
        while True:
            with nogil:
                n = _send_packet(fd, msg)
                err = errno if n < 0 else 0
                if err == EAGAIN:
                    rc = _ms_left(deadline)
                    if rc != 0 and poll(&pfd, 1, rc) < 0 and errno == EINTR:
                        err = EINTR  # a signal: its Python handler runs before we wait again
            if err == 0:
                return
            _send_failed(err, deadline, timeout, f"send of {size} bytes")

    cdef Received _result(self, Packet *pk, const uint8_t *buf, bint identified=False):
        cdef object payload = b""
        cdef Batch batch
        if pk.ndeferred:
            _hand_off_deferred(pk, self.peer_uid)
        if pk.status != DROP_OK:
            pass
        elif pk.flags & (FLAG_ARENA | FLAG_PAYLOAD_FD):
            # Large: handed up untaken, so a server's policy decides before anything
            # is mapped or copied; a client takes it at once.
            payload = Untaken(self, pk.flags, pk.length, pk.fd,
                              PyBytes_FromStringAndSize(<const char *>buf + HEADER_SIZE, ARENA_REF_SIZE)
                              if pk.flags & FLAG_ARENA else None)
            pk.fd = -1
            if not self.server_side:
                status, payload = self.take(payload)
                if status != DROP_OK:
                    pk.status = status
                    payload = b""
        elif pk.flags & FLAG_BATCH:
            batch = Batch.__new__(Batch)
            batch.body = PyBytes_FromStringAndSize(<const char *>buf + HEADER_SIZE, pk.size - HEADER_SIZE)
            batch.count = pk.items
            payload = batch
        else:
            payload = PyBytes_FromStringAndSize(<const char *>buf + HEADER_SIZE, pk.size - HEADER_SIZE)
        if (pk.status != DROP_OK and pk.flags & FLAG_ARENA and pk.size == HEADER_SIZE + ARENA_REF_SIZE
                and pk.status != DROP_BAD_VERSION):
            # Whatever the outcome the sender may reuse the region; a packet handed up
            # (Untaken) is released when it is taken or discarded.
            arena_release_ref(self.arenas, PyBytes_FromStringAndSize(<const char *>buf + HEADER_SIZE, ARENA_REF_SIZE))
        cdef int alive = -1
        if pk.status == DROP_OK and self.server_side:
            if not identified:
                self._identify(pk, &alive)
        elif pk.status != DROP_OK and pk.pidfd >= 0:
            close(pk.pidfd)
            pk.pidfd = -1
        return _received(pk.status, self, pk.kind, pk.flags, pk.request_id, payload, pk.pid, pk.uid, pk.gid, pk.pidfd)

    def cache_admission(self, peer, decision, bint allowed, unsigned long long epoch, long long reject_budget=-1):
        """Server side: what later packets of ``peer``'s process on this connection get
        (see unix.Conn.cache_admission, the twin's docstring)."""
        self.admit_mode = ADMIT_NONE if peer is None else (ADMIT_ALLOWED if allowed else ADMIT_REJECTED)
        self.admit_peer = peer
        self.admit_decision = decision
        self.admit_epoch = epoch
        self.reject_budget = reject_budget

    cdef object _next_packet(self, ServerTransport st):
        """Server side: the next packet of this connection: None (nothing queued),
        _COUNTED (every packet read was rejected and counted), what its cached
        admission made of it (_admitted), or a Received for the server.

        Reads up to RECV_BATCH packets in one recvmmsg, with one liveness check of
        the connecting process for all of them (_identify); what is not handed
        out now waits in ``pending``, in order. Once one packet of a batch goes
        to the server, the rest do too: the server may change the cached
        admission when it sees that one.
        """
        cdef int n, i
        cdef int alive = -1
        cdef int unread = -1  # the cached Peer's exe and cgroup unread: checked once per batch
        cdef bint slow = False
        cdef bint counted = False
        cdef Packet *pk
        cdef uint8_t *buf
        if self.pending:
            return self.pending.popleft()
        if self.fd < 0:
            return _received(DROP_CLOSED, self)
        with nogil:
            n = _recv_batch(self.fd, st.rvec, st.riov, st.bufs, st.cbufs, RECV_BATCH, st.pks)
        self.drained = n < RECV_BATCH
        if n == 0:
            return None
        if n < 0:
            raise error_from_errno(errno, "recv")
        items = []
        for i in range(n):
            pk = &st.pks[i]
            buf = st.bufs + i * PACKET_MAX
            if pk.status == DROP_OK:
                self._identify(pk, &alive)
                if not slow and self.admit_mode != ADMIT_NONE and not pk.ndeferred:
                    got = self._admitted(st, pk, buf, &unread)
                    if got is _COUNTED:
                        counted = True
                        continue
                    if got is not None:
                        items.append(got)
                        continue
            slow = True
            items.append(self._result(pk, buf, True))
        if not items:
            return _COUNTED if counted else None
        if len(items) > 1:
            if self.pending is None:
                self.pending = deque()
            self.pending.extend(items[1:])
        return items[0]

    cdef void _discard_pending(self) noexcept:
        """Drop what a batch left unhanded (the connection is gone): close the pidfds and
        the payload fds those packets carried."""
        cdef Received got
        if not self.pending:
            return
        for item in self.pending:
            if item.__class__ is Received:
                got = <Received>item
                if got.pidfd >= 0:
                    close(got.pidfd)
                    got.pidfd = -1
                if got.payload.__class__ is Untaken:
                    try:
                        got.payload.discard()
                    except BaseException:
                        pass
        self.pending.clear()

    cdef object _admitted(self, ServerTransport st, Packet *pk, const uint8_t *buf, int *unread):
        """A valid packet's fate under the cached admission: a Message (or a BATCH packet's
        list of them), _COUNTED (rejected and counted), or None: the server must see it.
        ``unread``: -1, or whether the Peer's exe and cgroup were unread when this batch was
        checked: one look per batch, as for liveness (the server checks an exe when it reads
        the packets, never when they were sent)."""
        cdef Py_ssize_t n = pk.size - HEADER_SIZE
        if pk.pidfd != SAME_PEER or self.admit_epoch != st.epoch:
            return None
        if self.admit_mode == ADMIT_REJECTED:
            # A request is answered by the server, an arena region released there.
            if pk.kind == KIND_REQUEST or pk.flags & FLAG_ARENA or self.reject_budget == 0:
                return None
            if pk.fd >= 0:  # the one memfd a PAYLOAD_FD packet carries, never mapped: its close cannot block
                close(pk.fd)
                pk.fd = -1
            if self.reject_budget > 0:
                self.reject_budget -= 1
            if self.fast_rejected == 0:
                st.rejected_conns.append(self)
            n = pk.items if pk.flags & FLAG_BATCH else 1
            self.fast_rejected += n
            st.rejected_pending += n
            return _COUNTED
        # Large payloads are taken by the server; a read exe or cgroup is re-checked there per packet.
        if pk.flags & (FLAG_ARENA | FLAG_PAYLOAD_FD):
            return None
        if unread[0] < 0:
            peer = self.admit_peer
            unread[0] = peer._exe_id is None and peer._cgroup is None
        if not unread[0]:
            return None
        if pk.flags & FLAG_BATCH:
            if st.max_payload < INLINE_MAX:  # an item may be over max_size: the server drops those
                return None
            return [self._message(st, data, 0) for data in _split_batch(buf + HEADER_SIZE, pk.items)]
        if <unsigned long long>n > st.max_payload:
            return None
        return self._message(st, PyBytes_FromStringAndSize(<const char *>buf + HEADER_SIZE, n),
                             pk.request_id if pk.kind == KIND_REQUEST else 0)

    cdef inline CMessage _message(self, ServerTransport st, data, unsigned long long request_id):
        cdef CMessage msg = CMessage.__new__(CMessage)
        msg.data = data
        msg.sender = self.admit_peer
        msg.request_id = request_id
        msg.decision = self.admit_decision
        msg._conn = self
        msg._reply_timeout = st.reply_max_age
        msg._answered = False
        msg._limit = st.max_payload
        return msg

    def take(self, untaken):
        """Map (sealed memfd) or copy out (arena region) an untaken payload of this
        connection: ``(DROP_OK, memoryview)`` or ``(reason, None)``; closes its fd and
        releases its arena region, whatever the outcome."""
        fd, untaken.fd = untaken.fd, -1
        ref, untaken.ref = untaken.ref, None
        if ref is None:
            return map_sealed(fd, untaken.length, self.max_payload, self.budget, self.account)
        try:
            return self._copy_out(ref, untaken.length, fd)
        finally:
            arena_release_ref(self.arenas, ref)

    cdef void _identify(self, Packet *pk, int *alive) noexcept:
        """Turn the packet's identity into a pidfd for the caller (see unix.Conn._identify).

        A packet from the process that connected, while that process is still
        alive (or a zombie: its pid cannot have been reused), is pinned by the
        pidfd taken at accept; one syscall instead of a pidfd per packet. A
        packet from any other pid switches the connection to per-packet pidfds.

        ``alive``: -1 until that process was checked, then 1 or 0. A check made
        after a batch of packets was dequeued holds for every one of them (the
        process lived from connect() until after they were sent), so a batch
        shares one.
        """
        cdef struct_stat st
        cdef unsigned long long ino
        cdef bint pinned = False
        if pk.pid == 0:  # another pid namespace: no process of ours to pin
            if pk.pidfd >= 0:
                close(pk.pidfd)
                pk.pidfd = -1
            return
        if pk.pidfd >= 0:
            if not self.pidfs or fstat(pk.pidfd, &st) != 0:
                return
            ino = st.st_ino
        elif self.peer_pidfd >= 0 and pk.pid == self.peer_pid:
            if alive[0] < 0:
                alive[0] = syscall(SYS_pidfd_send_signal, self.peer_pidfd, 0, NULL, 0) == 0 or errno == EPERM
            if not alive[0]:
                self._new_last(False)  # the process that connected is gone: nothing pins this packet
                return
            pinned = True
            ino = self.peer_ino
        else:
            if not self.pidfd_per_packet and self.peer_pidfd >= 0:
                self._pidfd_per_packet()
            return
        if (self.pidfs and self.has_last and self.last_pid == pk.pid and self.last_uid == pk.uid
                and self.last_gid == pk.gid and self.last_ino == ino):
            if pk.pidfd >= 0:
                close(pk.pidfd)
            pk.pidfd = SAME_PEER
            return
        if pinned:
            pk.pidfd = fcntl(self.peer_pidfd, F_DUPFD_CLOEXEC, 0)
            if pk.pidfd < 0:
                self._new_last(False)
                return
        self._new_last(True)
        self.last_pid = pk.pid
        self.last_uid = pk.uid
        self.last_gid = pk.gid
        self.last_ino = ino

    cdef inline void _new_last(self, bint known) noexcept:
        """The last sender changes (or is no longer known): the cached admission was made
        for the one before, so it stands for nobody now; the server makes the next one."""
        self.has_last = known
        self.admit_mode = ADMIT_NONE

    def forget_sender(self):
        """Server side: the last packet's sender was refused without being judged (a uid's
        cool-down): its next packet is identified afresh, never as ``SAME_PEER``, and the
        cached admission goes (see unix.Conn.forget_sender)."""
        self._new_last(False)

    cdef void _pidfd_per_packet(self) noexcept:
        cdef int one = 1
        self.pidfd_per_packet = True
        setsockopt(self.fd, SOL_SOCKET, SO_PASSPIDFD, &one, sizeof(one))

    cdef void _pin_peer(self) noexcept:
        """At accept: pin the connecting process (SO_PEERCRED + SO_PEERPIDFD)."""
        cdef ucred cred
        cdef int pidfd = -1
        cdef socklen_t n = sizeof(cred)
        cdef socklen_t m = sizeof(pidfd)
        cdef struct_stat st
        if (getsockopt(self.fd, SOL_SOCKET, SO_PEERCRED, &cred, &n) == 0
                and getsockopt(self.fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &m) == 0 and pidfd >= 0):
            if cred.pid <= 0:  # connected from a pid namespace we cannot see: nothing to pin
                close(pidfd)
                return
            self.peer_pid = cred.pid
            self.peer_pidfd = pidfd
            if fstat(pidfd, &st) == 0:
                self.peer_ino = st.st_ino
        else:
            self._pidfd_per_packet()  # no pin (old kernel, or the peer already left)

    cdef object _copy_out(self, bytes ref, unsigned long long length, int fd):
        """An ARENA payload: checked by arena.locate, copied into receiver-owned memory."""
        cdef Py_buffer src
        cdef PrivateBuffer out
        cdef Py_ssize_t offset
        status, mapping, start, _position = arena_locate(self.arenas, ref, length, fd, self.max_payload, self.budget, self.account)
        if status != DROP_OK:
            return status, None
        try:
            out = PrivateBuffer.__new__(PrivateBuffer, length)
        except MemoryError:  # no memory for the copy now
            return DROP_UNMAPPABLE, None
        offset = start
        PyObject_GetBuffer(mapping, &src, PyBUF_SIMPLE)
        try:
            with nogil:
                _copy(out.data, <const char *>src.buf + offset, length)
        finally:
            PyBuffer_Release(&src)
        return DROP_OK, memoryview(out)  # released by take()

    def copy_into(self, dst, Py_ssize_t offset, src):
        """Copy the bytes of buffer ``src`` into writable buffer ``dst`` from byte ``offset``
        on (the sender's copy into an arena region), without the GIL; ValueError if they do
        not fit. A large copy streams past the cache: the receiver reads it on another CPU."""
        cdef Py_buffer d
        cdef Py_buffer s
        PyObject_GetBuffer(dst, &d, PyBUF_WRITABLE)
        try:
            PyObject_GetBuffer(src, &s, PyBUF_SIMPLE)
            try:
                if offset < 0 or offset + s.len > d.len:
                    raise ValueError(f"copy_into: {s.len} bytes at {offset} do not fit in {d.len}")
                with nogil:
                    _copy(<char *>d.buf + offset, s.buf, s.len)
            finally:
                PyBuffer_Release(&s)
        finally:
            PyBuffer_Release(&d)

    cdef bint _took_hello(self, Received got):
        """A HELLO (only a client accepts one): keep the server's limits, hand nothing on."""
        if got.status != DROP_OK or got.kind != KIND_HELLO:
            return False
        self.peer_limits = unpack_hello(got.payload)
        self.batch_room = batch_room(self.peer_limits)
        return True

    cdef _hello(self, unsigned long long max_payload):
        """Server side, at accept: send HELLO, the first packet on every connection. Never
        waits (a fresh socket's queue is empty); a client already gone is noticed later."""
        try:
            self.send(KIND_HELLO, 0, arena_hello(max_payload), 0)
        except (PeerGone, IPCTimeoutError):
            pass

    def call(self, unsigned long long request_id, payload, timeout):
        """Client side: send a REQUEST of inline ``payload``, then wait for the next packet.

        One call for a request's whole round trip: ``timeout`` (seconds, None:
        no limit) bounds the send and the wait together. Returns the reply's
        payload (``bytes``) when the next packet is a valid inline REPLY to
        ``request_id``, the common case; else what ``recv`` returns (None when
        the time ran out), for the caller to match: a late reply to an earlier
        request, an error, a large reply, or the connection's end.
        """
        cdef double deadline = _deadline(timeout)
        cdef Py_buffer view
        cdef uint8_t header[HEADER_SIZE]
        cdef iovec iov[2]
        cdef msghdr msg
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            if view.len > INLINE_MAX:
                raise MessageTooLarge(f"call: {view.len} bytes do not fit inline")
            _pack_header(header, KIND_REQUEST, request_id, view.len, 0)
            _packet_msg(&msg, iov, NULL, header, HEADER_SIZE, view.buf, view.len, -1)
            self._sendmsg_until(&msg, deadline, timeout, view.len)
        finally:
            PyBuffer_Release(&view)
        return self._recv_until(deadline, True, request_id)

    def recv(self, timeout):
        """Wait up to ``timeout`` for one packet (None on timeout)."""
        return self._recv_until(_deadline(timeout))

    cdef object _recv_until(self, double deadline, bint match=False, unsigned long long reply_to=0):
        """The next packet, waiting until ``deadline``. A client waits in a blocking recvmsg,
        bounded by SO_RCVTIMEO: one system call per reply, as poll + recvmsg would be two.
        A server's connection (non-blocking) waits in poll. ``match``: a valid inline REPLY
        to ``reply_to`` with nothing attached comes back as its payload alone (see call)."""
        cdef pollfd pfd
        cdef int ms, rc
        cdef Packet pk
        cdef int fd
        cdef bint blocking = not self.server_side
        if self.buf == NULL:
            self._alloc_buffers()
        if self.fd < 0 or self.close_pending:
            return _received(DROP_CLOSED, self)
        fd = self._enter()
        try:
            pfd.fd = fd
            pfd.events = POLLIN
            while True:
                ms = _ms_left(deadline)
                if blocking and ms != 0:
                    self._bound_wait(fd, ms)
                with nogil:
                    if blocking:
                        rc = _recv_packet(fd, self.buf, self.cbuf, self.server_side, &pk, ms != 0)
                    else:
                        # Wait first: a packet is almost never there yet, so this saves a recvmsg.
                        rc = poll(&pfd, 1, ms) if ms != 0 else 1
                        if rc > 0:
                            rc = _recv_packet(fd, self.buf, self.cbuf, self.server_side, &pk)
                            if rc == 0:
                                rc = -2  # spurious wake-up
                if rc == 1:
                    if (match and pk.status == DROP_OK and pk.kind == KIND_REPLY and pk.request_id == reply_to
                            and pk.flags == 0 and pk.fd < 0 and pk.pidfd < 0 and pk.ndeferred == 0):
                        return PyBytes_FromStringAndSize(<const char *>self.buf + HEADER_SIZE, pk.size - HEADER_SIZE)
                    got = self._result(&pk, self.buf)
                    if self._took_hello(got):
                        continue
                    return got
                if rc == -1:
                    if errno == EINTR:
                        PyErr_CheckSignals()
                        continue
                    raise error_from_errno(errno, "recv")
                if ms == 0 or (rc == 0 and _ms_left(deadline) == 0):
                    return None
        finally:
            self._leave()

    cdef int _bound_wait(self, int fd, int ms) except -1:
        """Bound the next blocking receive to ``ms`` ms (-1: no limit) with SO_RCVTIMEO.

        No limit is an hour, waited again: a finite timeout makes the kernel end the
        wait with EINTR on a signal even under SA_RESTART (net/core/sock.c,
        sock_intr_errno), so a Python signal handler always runs promptly. The value
        set is kept while it is at most ``ms`` and within 1/64 of it (one setsockopt
        per timeout, not per call): the wait never outlasts the deadline, and may end
        a little early (the caller then waits again for what is left). SO_RCVTIMEO
        belongs to the socket: one thread receives at a time (the Client's receive lock).
        """
        cdef timeval tv
        if ms < 0:
            ms = 3600 * 1000
        if ms - (ms >> 6) <= self.rcvtimeo_ms <= ms:
            return 0
        tv.tv_sec = ms // 1000
        tv.tv_usec = (ms % 1000) * 1000
        if setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0:
            raise error_from_errno(errno, "setsockopt SO_RCVTIMEO")
        self.rcvtimeo_ms = ms
        return 0

    def recv_nowait(self):
        """Receive one packet if one is queued (None if not)."""
        cdef Packet pk
        cdef int rc, fd
        if self.buf == NULL:
            self._alloc_buffers()
        if self.fd < 0 or self.close_pending:
            return _received(DROP_CLOSED, self)
        fd = self._enter()
        try:
            while True:
                with nogil:
                    rc = _recv_packet(fd, self.buf, self.cbuf, self.server_side, &pk)
                if rc == 0:
                    return None
                if rc < 0:
                    raise error_from_errno(errno, "recv")
                got = self._result(&pk, self.buf)
                if not self._took_hello(got):
                    return got
        finally:
            self._leave()

    def shutdown(self):
        """Tell the peer we are gone (EOF on its side); the fd stays open until released."""
        if self.fd >= 0:
            shutdown(self.fd, SHUT_RDWR)

    def close(self):
        """Close the socket; if other threads are using it, once the last one is done
        (a shutdown wakes them), so no call ever reaches a reused fd number."""
        if self.busy:
            self.close_pending = True
            if self.fd >= 0:
                shutdown(self.fd, SHUT_RDWR)
        else:
            self._close_now()


cdef class ServerTransport:
    """Accepts connections and returns the next packet from any of them."""

    #: Set for an adopted (socket-activated) listener: turn SO_PASSCRED on
    #: each accepted socket too (connections queued before the listener had them lack them).
    cdef public bint pass_on_accept
    #: Largest memfd payload accepted connections map (Server sets it from max_size).
    cdef public unsigned long long max_payload
    #: Bytes of replies a connection may leave unread, and seconds one may wait (Server sets them).
    cdef public object reply_queue_bytes
    cdef public object reply_max_age
    #: MappedBudget for accepted connections' payloads and arenas (Server sets it; None: none).
    cdef public object budget
    #: Per-uid caps checked at accept (Server sets them).
    cdef public object limits
    #: Server bumps it to void every connection's cached admission (cache_admission).
    cdef public unsigned long long epoch
    #: Packets the cached admissions rejected and counted, not yet taken (take_rejected).
    cdef readonly unsigned long long rejected_pending
    cdef list rejected_conns
    cdef object refused   # deque of connections refused at accept, reported by recv
    cdef int listen_fd
    cdef int epfd
    cdef int wakefd
    cdef bint pidfs
    cdef object listener
    cdef dict conns       # fd -> Conn
    cdef object ready     # deque of Conn with packets (probably) queued
    cdef int burst        # packets served from ready since the last epoll_wait
    cdef double accept_paused_until  # out of fds: the listener is off epoll until then (0: on)
    cdef uint8_t *bufs   # RECV_BATCH packet buffers (PACKET_MAX each), shared by all connections
    cdef char *cbufs     # their control data (CMSG_BUF each)
    cdef char *cbuf      # for _gone at accept
    cdef mmsghdr rvec[RECV_BATCH]
    cdef iovec riov[RECV_BATCH]
    cdef Packet pks[RECV_BATCH]
    cdef epoll_event events[MAX_EVENTS]

    def __cinit__(self, listener, bint pidfs):
        cdef epoll_event ev
        self.epfd = -1
        self.wakefd = -1
        self.bufs = <uint8_t *>malloc(RECV_BATCH * PACKET_MAX)
        self.cbufs = <char *>malloc(RECV_BATCH * CMSG_BUF)
        self.cbuf = <char *>malloc(CMSG_BUF)
        if self.bufs == NULL or self.cbufs == NULL or self.cbuf == NULL:
            raise MemoryError()
        listener.setblocking(False)
        self.listener = listener
        self.listen_fd = listener.fileno()
        self.max_payload = MAX_PAYLOAD
        self.reply_queue_bytes = REPLY_QUEUE_BYTES
        self.reply_max_age = None
        self.pidfs = pidfs
        self.conns = {}
        self.ready = deque()
        self.limits = ConnLimits()
        self.refused = deque()
        self.rejected_conns = []
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        self.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.epfd < 0 or self.wakefd < 0:
            raise error_from_errno(errno, "epoll/eventfd")
        ev.events = EPOLLIN
        ev.data.fd = self.listen_fd
        epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.listen_fd, &ev)
        ev.data.fd = self.wakefd
        epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.wakefd, &ev)

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        if self.wakefd >= 0:
            close(self.wakefd)
        free(self.bufs)
        free(self.cbufs)
        free(self.cbuf)

    @property
    def connections(self):
        return len(self.conns)

    def fileno(self):
        """The epoll fd: readable when ``recv(0)`` has work (for ``loop.add_reader``)."""
        return self.epfd

    def recv(self, timeout):
        """Next packet or connection event from any client (see unix.ServerTransport.recv):
        a Received, or what a connection's cached admission let through (a Message, or a
        BATCH packet's list of them).

        None when ``timeout`` passed or ``wakeup()`` was called.
        """
        return self._recv(_deadline(timeout))

    def recv_many(self, Py_ssize_t max_count, timeout):
        """What ``recv`` returns, for up to ``max_count`` packets (see unix.ServerTransport.recv_many)."""
        cdef double now
        got = self._recv(_deadline(timeout))
        if got is None:
            return []
        out = [got]
        now = _now()  # the rest: only what is already queued
        while len(out) < max_count:
            if got.__class__ is Received:
                break  # the server judges it first: it may cache an admission for what follows
            got = self._recv(now)
            if got is None:
                break
            out.append(got)
        return out

    cdef object _recv(self, double deadline):
        cdef int n, i, fd, ms
        cdef bint woken
        cdef bint counted = False  # a cached admission rejected a packet in this call
        cdef Conn conn
        cdef uint64_t junk
        if self.epfd < 0:
            return None
        while True:
            if self.refused:
                return self.refused.popleft()
            while self.ready and self.burst < 64:
                conn = self.ready[0]
                got = conn._next_packet(self)
                if got is None:
                    self.ready.popleft()
                    continue
                if conn.drained and not conn.pending:
                    # Its last read took fewer packets than it asked for: the queue was empty
                    # then, and epoll (level-triggered) reports it when more comes. One
                    # recvmmsg saved per wake-up: the one that would only find EAGAIN.
                    self.ready.popleft()
                else:
                    self.ready.rotate(-1)  # one packet per connection per turn: fairness
                self.burst += 1
                if got is _COUNTED:
                    counted = True
                    continue
                if got.__class__ is Received and (<Received>got).status == DROP_CLOSED:
                    self._drop(conn)
                return got
            # Re-poll even while connections stay ready: a flooding client must
            # not starve new connections and quieter clients.
            self.burst = 0
            PyErr_CheckSignals()  # counted rejections may keep us here: let signal handlers run
            ms = 0 if self.ready else _ms_left(deadline)
            if self.accept_paused_until != 0:
                if _now() >= self.accept_paused_until:
                    self._resume_accept()
                elif ms < 0 or ms > <int>(ACCEPT_PAUSE * 1000):
                    ms = <int>(ACCEPT_PAUSE * 1000)
            with nogil:
                n = epoll_wait(self.epfd, self.events, MAX_EVENTS, ms)
            if n < 0:
                if errno != EINTR:
                    raise error_from_errno(errno, "epoll_wait")
                PyErr_CheckSignals()
                n = 0
            woken = False
            for i in range(n):
                fd = self.events[i].data.fd
                if fd == self.wakefd:
                    read(self.wakefd, &junk, sizeof(junk))
                    woken = True
                elif fd == self.listen_fd:
                    self._accept()
                else:
                    conn = self.conns.get(fd)
                    if conn is None:
                        continue
                    if self.events[i].events & EPOLLOUT:
                        conn.outbox.flush(conn)
                    if self.events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR) and conn not in self.ready:
                        self.ready.append(conn)
            # A flood of rejected packets must not hold a caller past its deadline, nor
            # past a wakeup(): the ready connections are served on the next call.
            if woken or (ms >= 0 and _ms_left(deadline) == 0 and (counted or not self.ready)):
                return None

    cdef _accept(self):
        cdef int fd
        cdef int one = 1
        cdef Conn conn
        cdef epoll_event ev
        cdef ucred cred
        cdef socklen_t n
        while True:
            with nogil:
                fd = accept4(self.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                # EAGAIN: done; ECONNABORTED: that client gave up, try the next one;
                # out of fds or memory: leave it queued, and stop watching the listener
                # for a while (it stays readable: epoll would spin).
                if errno == EINTR or errno == ECONNABORTED:
                    continue
                if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                    self._pause_accept()
                return
            if _gone(fd, self.cbuf):
                close(fd)  # nothing queued, nothing in flight: this close cannot block
                continue
            if self.pass_on_accept:
                setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one))
            conn = Conn.__new__(Conn, None, True, self.pidfs)
            conn.fd = fd
            n = sizeof(cred)
            if getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &n) != 0:
                cred.pid = 0
                cred.uid = cred.gid = <unsigned int>-1
            conn.peer_uid = cred.uid
            status = self.limits.admit(cred.uid)
            if status != DROP_OK:
                conn.shutdown()
                self.refused.append(_received(status, None, 0, 0, 0, b"", cred.pid, cred.uid, cred.gid))
                continue  # the socket is closed when conn goes (on the closer: it may hold fds)
            conn._pin_peer()
            conn.max_payload = self.max_payload
            conn.budget = self.budget
            conn._hello(self.max_payload)
            conn.outbox = Outbox(self.reply_queue_bytes, self.reply_max_age, functools.partial(self._watch, fd))
            self.conns[fd] = conn
            ev.events = EPOLLIN
            ev.data.fd = fd
            epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev)

    def _watch(self, int fd, bint writable):
        """Watch connection ``fd`` for EPOLLOUT too (while replies wait), or not (any thread)."""
        cdef epoll_event ev
        ev.events = EPOLLIN | EPOLLOUT if writable else EPOLLIN
        ev.data.fd = fd
        if self.epfd >= 0:
            epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &ev)  # ENOENT: dropped meanwhile

    cdef _pause_accept(self):
        if self.accept_paused_until == 0:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.listen_fd, NULL)
        self.accept_paused_until = _now() + ACCEPT_PAUSE

    cdef _resume_accept(self):
        cdef epoll_event ev
        if self.accept_paused_until != 0:
            self.accept_paused_until = 0
            ev.events = EPOLLIN
            ev.data.fd = self.listen_fd
            epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.listen_fd, &ev)

    cdef _drop(self, Conn conn):
        conn._discard_pending()
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, conn.fd, NULL)
            self.limits.left(conn.peer_uid)
            arena_forget(conn.arenas, conn.budget, conn.account)
        try:
            self.ready.remove(conn)
        except ValueError:
            pass
        conn.shutdown()
        if conn.outbox is not None:
            conn.outbox.close()
        self._resume_accept()  # a connection went: its fds may soon be free

    def take_rejected(self):
        """What the cached admissions rejected since the last call: ``[(conn id, uid, count)]``
        (uid: the rejected sender's), and the counts start again from 0."""
        cdef Conn conn
        out = []
        for conn in self.rejected_conns:
            if conn.fast_rejected:
                out.append((conn.id, conn.admit_peer.uid if conn.admit_peer is not None else conn.peer_uid, conn.fast_rejected))
                conn.fast_rejected = 0
        self.rejected_conns = []
        self.rejected_pending = 0
        return out

    def waiting_conns(self):
        """Connections with replies waiting in their outbox (for a graceful stop)."""
        return [conn for conn in self.conns.values() if conn.outbox is not None and conn.outbox.waiting]

    def disconnect(self, Conn conn):
        """Stop serving ``conn`` (e.g. a hostile peer); its fd closes when released."""
        self._drop(conn)

    def wakeup(self):
        """Make a blocked ``recv`` return None soon (safe from any thread or signal handler)."""
        cdef uint64_t one = 1
        if self.wakefd >= 0:
            write(self.wakefd, &one, sizeof(one))

    def close(self):
        """Release everything; only call when no thread is inside ``recv``."""
        for conn in list(self.conns.values()):
            self._drop(conn)
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
        if self.wakefd >= 0:
            close(self.wakefd)
            self.wakefd = -1
        self.listener.close()
