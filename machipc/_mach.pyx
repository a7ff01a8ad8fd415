# cython: language_level=3
"""Mach-message primitives for the macOS transport (built on macOS only).

``machipc/mach.py`` builds the ServerTransport / Conn objects on top of these.
Every blocking call takes a timeout (seconds, None = forever) and runs with the
GIL released. Received messages are validated by ``machipc.machmsg.parse``
(the same code the Linux test suite fuzzes) before anything in them is used;
a refused message is ``mach_msg_destroy``-ed so no right or region leaks.
"""

import os
from time import monotonic

from cpython.buffer cimport PyBuffer_FillInfo, PyBUF_WRITABLE
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport errno
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from . import machmsg as _mm
from .errors import InvalidArgument, IPCError, MessageTooLarge, PeerGone

IMPLEMENTATION = "mach"

#: Payloads above this many bytes go out of line (MACH_MSG_VIRTUAL_COPY); see docs/macos.md.
OOL_THRESHOLD = 32 * 1024
#: Receive buffers grow (MACH_RCV_LARGE) up to this; larger inline messages are destroyed.
RECV_INLINE_LIMIT = 256 * 1024
#: msgh_id of the empty message ``wakeup()`` sends to its own port.
WAKE_MSGH_ID = 0x6D697077  # "mipw"
TOO_LARGE = -1  # Receiver.recv: an inline message over RECV_INLINE_LIMIT was destroyed
WOKEN = -2  # Receiver.recv: the wake port got a message

# Options shared with the simulated-macOS tests (machmsg.RECV_OPTIONS / SEND_OPTIONS;
# _mach_layout.h asserts the values): MACH_RCV_INTERRUPT / MACH_SEND_INTERRUPT make
# mach_msg return *_INTERRUPTED instead of restarting inside libsyscall
# (libsyscall/mach/mach_msg.c), so Python signal handlers run (PEP 475).
cdef mach_msg_option_t RECV_OPTIONS = _mm.RECV_OPTIONS
cdef mach_msg_option_t SEND_OPTIONS = _mm.SEND_OPTIONS
cdef size_t WIRE_HEADER_SIZE = 24


# -- fork detection ------------------------------------------------------------

cdef unsigned long _generation = 0


def _after_fork_in_child():
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def generation():
    """Bumped in every forked child: ports made before fork() are not valid there."""
    return _generation


cdef inline void _check_fork(unsigned long gen) except *:
    if gen != _generation:
        raise IPCError(
            "this Mach port was created before fork(): Mach ports do not survive fork(), "
            "so create a new machipc Server/Client in the child process"
        )


# -- time ------------------------------------------------------------------------

cdef mach_msg_timeout_t _ms(double seconds):
    """Seconds to a mach_msg timeout in ms (rounded up so 0 < t < 1 ms still waits)."""
    if seconds <= 0:
        return 0
    cdef double ms = seconds * 1000.0
    if ms >= 4294967294.0:
        return 4294967294u
    cdef mach_msg_timeout_t t = <mach_msg_timeout_t>ms
    if t < ms:
        t += 1
    return t


# -- ports -----------------------------------------------------------------------

cdef inline void _kr_check(kern_return_t kr, str what) except *:
    if kr != KERN_SUCCESS:
        raise _mm.kern_error(kr, what)


def check_in(str name):
    """``bootstrap_check_in``: the receive right for ``name`` (launchd MachServices or a new name)."""
    cdef bytes raw = _mm.check_service_name(name)
    cdef const char *c_name = raw
    cdef mach_port_t port = MACH_PORT_NULL
    cdef kern_return_t kr
    with nogil:
        kr = bootstrap_check_in(bootstrap_port, c_name, &port)
    if kr != KERN_SUCCESS:
        raise _mm.bootstrap_error(kr, "bootstrap_check_in", name)
    return port


def look_up(str name):
    """``bootstrap_look_up``: a send right to the server of ``name``."""
    cdef bytes raw = _mm.check_service_name(name)
    cdef const char *c_name = raw
    cdef mach_port_t port = MACH_PORT_NULL
    cdef kern_return_t kr
    with nogil:
        kr = bootstrap_look_up(bootstrap_port, c_name, &port)
    if kr != KERN_SUCCESS:
        raise _mm.bootstrap_error(kr, "bootstrap_look_up", name)
    if port == MACH_PORT_DEAD or port == MACH_PORT_NULL:
        raise PeerGone(f"bootstrap_look_up({name!r}) returned a dead port: the server has exited")
    return port


def set_queue_limit(mach_port_t port, unsigned int limit):
    """Raise the port's queue limit (default 5) with MACH_PORT_LIMITS_INFO."""
    if limit < 1 or limit > MACH_PORT_QLIMIT_MAX:
        raise InvalidArgument(f"queue_limit must be between 1 and {MACH_PORT_QLIMIT_MAX}, not {limit}")
    cdef mach_port_limits_t limits
    limits.mpl_qlimit = limit
    _kr_check(mach_port_set_attributes(mach_task_self(), port, MACH_PORT_LIMITS_INFO,
                                       <mach_port_info_t>&limits, MACH_PORT_LIMITS_INFO_COUNT),
              "mach_port_set_attributes(MACH_PORT_LIMITS_INFO)")


def allocate_receive():
    cdef mach_port_name_t name = MACH_PORT_NULL
    _kr_check(mach_port_allocate(mach_task_self(), MACH_PORT_RIGHT_RECEIVE, &name), "mach_port_allocate(RECEIVE)")
    return name


def allocate_port_set():
    cdef mach_port_name_t name = MACH_PORT_NULL
    _kr_check(mach_port_allocate(mach_task_self(), MACH_PORT_RIGHT_PORT_SET, &name), "mach_port_allocate(PORT_SET)")
    return name


def move_member(mach_port_name_t port, mach_port_name_t port_set):
    _kr_check(mach_port_move_member(mach_task_self(), port, port_set), "mach_port_move_member")


def make_send(mach_port_name_t port):
    """Give ourselves a send right to our own receive right (the wake port)."""
    _kr_check(mach_port_insert_right(mach_task_self(), port, port, MACH_MSG_TYPE_MAKE_SEND),
              "mach_port_insert_right(MAKE_SEND)")


def destroy_receive(mach_port_name_t port):
    """Drop a receive right: queued messages are destroyed, senders see a dead name."""
    mach_port_mod_refs(mach_task_self(), port, MACH_PORT_RIGHT_RECEIVE, -1)


def destroy_port_set(mach_port_name_t port_set):
    mach_port_mod_refs(mach_task_self(), port_set, MACH_PORT_RIGHT_PORT_SET, -1)


def deallocate(mach_port_name_t port):
    """Release a send or send-once right (a dropped send-once right notifies its receiver)."""
    if port != MACH_PORT_NULL:
        mach_port_deallocate(mach_task_self(), port)


# -- sending ---------------------------------------------------------------------

def send(mach_port_t dest, mach_msg_type_name_t dest_disposition, mach_port_t reply,
         mach_msg_type_name_t reply_disposition, const unsigned char[::1] header, payload,
         timeout, size_t ool_threshold=OOL_THRESHOLD, unsigned long gen=0):
    """Send one machipc message: wire ``header`` + ``payload``.

    Up to ``ool_threshold`` bytes travel inline; above, the payload is one
    MACH_MSG_VIRTUAL_COPY out-of-line descriptor. A send that fails after
    copy-in comes back pseudo-received (xnu osfmk/ipc/mach_msg.c): it is
    ``mach_msg_destroy``-ed and the reply right the kernel left in
    ``msgh_local_port`` (which mach_msg_destroy ignores) is released, so no right
    or memory leaks. Raises IPCTimeoutError, PeerGone, machmsg.SendInterrupted
    (a signal came and its handlers ran; nothing was sent) or IPCError.
    """
    _check_fork(gen)
    if header.shape[0] != WIRE_HEADER_SIZE:
        raise InvalidArgument("the machipc header must be 24 bytes")
    cdef const unsigned char[::1] body = payload if len(payload) else b"\0"
    cdef size_t plen = len(payload)
    cdef bint ool = plen > ool_threshold
    if plen > 0xFFFFFFFF - 4096:
        raise MessageTooLarge(f"payload of {plen} bytes is over what one Mach message can carry")
    cdef size_t size
    if ool:
        size = MACHMSG_COMPLEX_PREFIX_SIZE + WIRE_HEADER_SIZE
    else:
        size = round_msg(<mach_msg_size_t>(MACHMSG_MSG_HEADER_SIZE + WIRE_HEADER_SIZE + plen))
    cdef unsigned char *buf = <unsigned char *>malloc(size)
    if buf == NULL:
        raise MemoryError()
    cdef mach_msg_header_t *hdr = <mach_msg_header_t *>buf
    cdef machipc_complex_prefix_t *cx = <machipc_complex_prefix_t *>buf
    cdef mach_msg_option_t options = SEND_OPTIONS
    cdef mach_msg_timeout_t tmo = MACH_MSG_TIMEOUT_NONE
    cdef mach_msg_return_t kr
    cdef mach_port_t local = MACH_PORT_NULL
    memset(buf, 0, size)
    hdr.msgh_bits = MACH_MSGH_BITS(dest_disposition, reply_disposition if reply != MACH_PORT_NULL else 0)
    hdr.msgh_size = <mach_msg_size_t>size
    hdr.msgh_remote_port = dest
    hdr.msgh_local_port = reply
    hdr.msgh_voucher_port = MACH_PORT_NULL
    hdr.msgh_id = MACHMSG_MACHIPC_MSGH_ID
    if ool:
        hdr.msgh_bits |= MACH_MSGH_BITS_COMPLEX
        cx.body.msgh_descriptor_count = 1
        cx.ool.address = <void *>&body[0]
        cx.ool.size = <mach_msg_size_t>plen
        cx.ool.deallocate = 0
        cx.ool.copy = MACH_MSG_VIRTUAL_COPY
        cx.ool.type = MACH_MSG_OOL_DESCRIPTOR
        memcpy(buf + MACHMSG_COMPLEX_PREFIX_SIZE, &header[0], WIRE_HEADER_SIZE)
    else:
        memcpy(buf + MACHMSG_MSG_HEADER_SIZE, &header[0], WIRE_HEADER_SIZE)
        if plen:
            memcpy(buf + MACHMSG_MSG_HEADER_SIZE + WIRE_HEADER_SIZE, &body[0], plen)
    if timeout is not None:
        options |= MACH_SEND_TIMEOUT
        tmo = _ms(timeout)
    try:
        with nogil:
            kr = mach_msg(hdr, options, <mach_msg_size_t>size, 0, MACH_PORT_NULL, tmo, MACH_PORT_NULL)
        if kr != MACH_MSG_SUCCESS and _mm.send_needs_destroy(kr):  # kr masked with MACH_MSG_MASK
            local = _mm.local_right_to_release(<bytes>buf[:MACHMSG_MSG_HEADER_SIZE])
            mach_msg_destroy(hdr)  # the destination right and the OOL copy (deallocate is set)
            if local != MACH_PORT_NULL:
                mach_port_deallocate(mach_task_self(), local)  # the pseudo-received reply right
    finally:
        free(buf)
    if kr == MACH_MSG_SUCCESS:
        return
    if (kr & ~MACHMSG_MACH_MSG_MASK) == MACH_SEND_INTERRUPTED:
        PyErr_CheckSignals()  # run the handlers now; one that raises ends the send
    raise _mm.send_error(kr, timeout)


def send_wake(mach_port_t port):
    """Post an empty message to our own wake port; never blocks (a full queue is already awake)."""
    cdef mach_msg_header_t hdr
    hdr.msgh_bits = MACH_MSGH_BITS(MACH_MSG_TYPE_COPY_SEND, 0)
    hdr.msgh_size = sizeof(mach_msg_header_t)
    hdr.msgh_remote_port = port
    hdr.msgh_local_port = MACH_PORT_NULL
    hdr.msgh_voucher_port = MACH_PORT_NULL
    hdr.msgh_id = WAKE_MSGH_ID
    with nogil:
        mach_msg(&hdr, MACH_SEND_MSG | MACH_SEND_TIMEOUT, sizeof(mach_msg_header_t), 0, MACH_PORT_NULL, 0,
                 MACH_PORT_NULL)


# -- receiving -------------------------------------------------------------------

cdef class VMRegion:
    """Read-only view of an out-of-line region the kernel mapped for us.

    ``memoryview(region)`` is zero-copy; the pages are ``vm_deallocate``-d
    when the region and every view of it are released.
    """

    cdef vm_address_t address
    cdef vm_size_t size
    cdef int exports

    def __cinit__(self):
        self.address = 0
        self.size = 0
        self.exports = 0

    def __len__(self):
        return self.size

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("out-of-line message data is read-only")
        if self.address == 0 and self.size:
            raise BufferError("region already released")
        PyBuffer_FillInfo(view, self, <void *>self.address, self.size, 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1

    def release(self):
        """Unmap now (fails while a memoryview of it is alive)."""
        if self.exports:
            raise BufferError("a memoryview of this region is still in use")
        self._free()

    cdef void _free(self):
        if self.address:
            vm_deallocate(mach_task_self(), self.address, self.size)
            self.address = 0

    def __dealloc__(self):
        self._free()


cdef VMRegion _region(vm_address_t address, vm_size_t size):
    cdef VMRegion r = VMRegion.__new__(VMRegion)
    r.address = address
    r.size = size
    return r


cdef class Receiver:
    """Receives from one port or port set into a buffer that grows on MACH_RCV_TOO_LARGE."""

    cdef unsigned char *buf
    cdef mach_msg_size_t capacity
    cdef mach_msg_size_t limit
    cdef mach_port_t wake_port
    cdef bint busy
    cdef unsigned long gen

    def __cinit__(self, mach_port_t wake_port=MACH_PORT_NULL, size_t capacity=0, size_t limit=0):
        if capacity == 0:
            capacity = MACHMSG_COMPLEX_PREFIX_SIZE + WIRE_HEADER_SIZE + OOL_THRESHOLD + MACHMSG_MAX_TRAILER_SIZE
        if limit < capacity:
            limit = RECV_INLINE_LIMIT + MACHMSG_MAX_TRAILER_SIZE + 4096
        self.capacity = round_msg(<mach_msg_size_t>capacity)
        self.limit = <mach_msg_size_t>limit
        self.buf = <unsigned char *>malloc(self.capacity)
        if self.buf == NULL:
            raise MemoryError()
        self.wake_port = wake_port
        self.busy = False
        self.gen = _generation

    def __dealloc__(self):
        free(self.buf)

    cdef int _grow(self, mach_msg_size_t needed) except -1:
        cdef unsigned char *nb = <unsigned char *>malloc(needed)
        if nb == NULL:
            raise MemoryError()
        free(self.buf)
        self.buf = nb
        self.capacity = needed
        return 0

    def recv(self, mach_port_t port, timeout, bint allow_notification=False):
        """Receive and validate one message.

        Returns None on timeout, ``(WOKEN, ...)`` after ``send_wake``,
        ``(TOO_LARGE, ...)`` for a destroyed oversize message, else
        ``(reason, parsed, inline_bytes, region, reply_port)``. On OK the caller
        owns ``region`` (OOL data, or None) and ``reply_port`` (a send-once
        right, 0 if none); on a rejection both were already destroyed.
        """
        _check_fork(self.gen)
        if self.busy:
            raise IPCError("Receiver.recv is not re-entrant: one receiving thread at a time")
        self.busy = True
        try:
            return self._recv(port, timeout, allow_notification)
        finally:
            self.busy = False

    cdef object _recv(self, mach_port_t port, timeout, bint allow_notification):
        cdef mach_msg_option_t options = RECV_OPTIONS
        cdef mach_msg_timeout_t tmo = MACH_MSG_TIMEOUT_NONE
        cdef mach_msg_return_t kr
        cdef mach_msg_header_t *hdr
        cdef mach_msg_size_t needed
        cdef double deadline = 0.0
        if timeout is not None:
            options |= MACH_RCV_TIMEOUT
            deadline = monotonic() + timeout
        while True:
            if timeout is not None:
                tmo = _ms(deadline - monotonic())
            hdr = <mach_msg_header_t *>self.buf
            with nogil:
                kr = mach_msg(hdr, options, 0, self.capacity, port, tmo, MACH_PORT_NULL)
            if kr == MACH_MSG_SUCCESS:
                break
            if kr == MACH_RCV_TIMED_OUT:
                return None
            if kr == MACH_RCV_INTERRUPTED:
                # MACH_RCV_INTERRUPT: a signal came. Run the Python handlers (a raising one
                # ends the receive; Server.stop() from one queues a wakeup), then wait again
                # for the time left (recomputed at the top of the loop).
                PyErr_CheckSignals()
                continue
            if kr == MACH_RCV_TOO_LARGE:
                # MACH_RCV_LARGE: the message is still queued; msgh_size says how big.
                needed = round_msg(hdr.msgh_size) + MACHMSG_MAX_TRAILER_SIZE
                if needed <= self.limit and needed > self.capacity:
                    self._grow(needed)
                    continue
                # Over our limit: receive it without MACH_RCV_LARGE so the kernel destroys it.
                with nogil:
                    kr = mach_msg(hdr, (options & ~MACH_RCV_LARGE) | MACH_RCV_TIMEOUT, 0, self.capacity, port, 0,
                                  MACH_PORT_NULL)
                if kr == MACH_MSG_SUCCESS:
                    break  # a different, smaller message was at the head after all
                return (TOO_LARGE, None, b"", None, 0)
            raise _mm.kern_error(kr, "mach_msg(receive)")
        if self.wake_port != MACH_PORT_NULL and hdr.msgh_local_port == self.wake_port:
            self._refuse(None)
            return (WOKEN, None, b"", None, 0)
        view = memoryview(<unsigned char[:self.capacity]>self.buf)
        try:
            reason, parsed = _mm.parse(view, allow_notification=allow_notification)
            if reason != _mm.Reject.OK:
                self._refuse(view)
                return (reason, parsed, b"", None, 0)
            inline = bytes(view[parsed.inline_offset:parsed.inline_offset + parsed.inline_size])
            region = None
            if parsed.ool_address:
                region = _region(<vm_address_t>parsed.ool_address, <vm_size_t>parsed.ool_size)
        except BaseException:
            self._refuse(view)  # MemoryError, KeyboardInterrupt...: the message is ours to destroy
            raise
        return (reason, parsed, inline, region, parsed.remote_port)

    cdef _refuse(self, view):
        """Destroy the received message in the buffer: every right and every region.

        machmsg.take_regions hands back each OOL and volatile region (and zeroes them
        in the buffer) because the kernel sets a received descriptor's ``deallocate``
        only for MACH_MSG_VIRTUAL_COPY (ipc_kmsg_copyout_ool_descriptor, xnu
        osfmk/ipc/ipc_kmsg.c) and mach_msg_destroy frees only ``if (dsc->deallocate)``
        and skips volatile ones (libsyscall/mach/mach_msg.c).
        """
        if view is None:
            view = memoryview(<unsigned char[:self.capacity]>self.buf)
        for address, size in _mm.take_regions(view):
            vm_deallocate(mach_task_self(), <vm_address_t>address, <vm_size_t>size)
        mach_msg_destroy(<mach_msg_header_t *>self.buf)  # reply right, voucher, ports


# -- asyncio ---------------------------------------------------------------------

cdef class KQueue:
    """A kqueue fd that turns readable while ``port`` (a port or port set) has a message.

    ``loop.add_reader(kq.fileno(), ...)`` then receive with timeout 0.
    EVFILT_MACHPORT is not in Python's ``select`` module.
    """

    cdef int fd
    cdef unsigned long gen

    def __cinit__(self, mach_port_t port):
        self.gen = _generation
        self.fd = kqueue()
        if self.fd < 0:
            raise OSError(errno, os.strerror(errno), "kqueue")
        os.set_inheritable(self.fd, False)
        cdef kevent64_s ev
        memset(&ev, 0, sizeof(ev))
        ev.ident = port
        ev.filter = EVFILT_MACHPORT
        ev.flags = EV_ADD | EV_ENABLE
        if kevent64(self.fd, &ev, 1, NULL, 0, 0, NULL) < 0:
            err = errno
            os.close(self.fd)
            self.fd = -1
            raise OSError(err, os.strerror(err), "kevent64(EVFILT_MACHPORT)")

    def fileno(self):
        return self.fd

    def drain(self):
        """Process the kqueue (kevent64 with a zero timeout): the EVFILT_MACHPORT knote is
        re-checked (filt_machportprocess) and leaves the queue once the port set is empty,
        so the fd stops being readable; it stays while messages wait (level-triggered)."""
        cdef kevent64_s evs[8]
        cdef timespec zero
        zero.tv_sec = 0
        zero.tv_nsec = 0
        if self.fd >= 0 and self.gen == _generation:
            kevent64(self.fd, NULL, 0, evs, 8, 0, &zero)

    def close(self):
        """Close the kqueue, unless this is a fork() child: kqueues are not inherited
        (xnu bsd/kern/kern_event.c: fork leaves kqueue fds closed in the child), so the
        number may name an unrelated fd there."""
        if self.fd >= 0 and self.gen == _generation:
            os.close(self.fd)
        self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0 and self.gen == _generation:
            os.close(self.fd)
