"""Arenas: a reused shared buffer per connection for large payloads (the fast path).

A sealed memfd per message is safe but pays for fresh pages on every message.
An arena is one memfd per sending connection, allocated and pre-faulted once
and reused as a ring:

* the sender copies the payload into the ring (pages already resident) and
  sends a small packet naming the region (flag ``ARENA``; the first packet of
  an arena also carries its fd, flag ``PAYLOAD_FD``);
* the receiver checks the region, **copies it out** into private memory of its
  own, then writes the region's end position into the arena's control block so
  the sender may reuse it.

The copy-out keeps the guarantee the sealed path gives: the handler's bytes
live in memory the sender cannot touch, whatever the sender does to the arena
afterwards (it can only garble its own message, and only before the copy).
The arena is sealed against shrinking and growing and must be on shmem
(hugetlbfs is refused), so the receiver's mapping can never fault with SIGBUS.
A receiver maps an arena only for a sender its policy allowed.

Layout: bytes [0, 8) hold the release position (u64, little-endian, written by
the receiver); the ring starts at ``CONTROL``. Positions grow monotonically; a
region never wraps (the sender skips to the ring's start instead). The receiver
stores a packet's release position whatever becomes of the packet (see
:func:`release_ref`), so a sender waits only for packets not yet read, and a
region fits once the ring is empty (``release == head``) even when the skipped
tail plus the region exceed the capacity. docs/protocol.md has the state machine.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import os
import stat
import struct
import threading
import time
from typing import Optional

from ._closer import close_received
from .deadline import deadline_of, remaining
from .errors import IPCTimeoutError
from .payload import check_backing
from .wire import Drop, Flag, pack_hello

__all__ = ["Arena", "CONTROL", "REF", "ARENA_SEALS", "MAX_ARENAS", "hello", "map_arena", "locate", "release_ref", "forget"]

CONTROL = 4096
#: The packet body of an ARENA packet: arena id, reserved, offset in the ring, release position.
REF = struct.Struct("<IIQQ")
RELEASE = struct.Struct("<Q")
#: Linux only, like every memfd path (see payload.HAVE_SEALED_MEMFD): None on macOS.
ARENA_SEALS = (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) if hasattr(fcntl, "F_ADD_SEALS") else None
#: Arenas a receiver keeps per connection; more is a misbehaving peer.
MAX_ARENAS = 4
#: Smallest arena made (bytes of ring); a bigger payload gets twice its size.
MIN_CAPACITY = 8 * 1024 * 1024
#: Largest arena ring made or accepted, whatever either side's max_size: a sender and a
#: receiver with different limits must still agree on it. Bigger payloads use sealed memfds.
MAX_CAPACITY = 128 * 1024 * 1024
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_ids = itertools.count(1)


class Arena:
    """The sender's side: a ring of ``capacity`` bytes shared with one receiver."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.id = next(_ids) & 0xFFFFFFFF
        self.fd = os.memfd_create("machipc-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, CONTROL + capacity)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, ARENA_SEALS)
            self._map = mmap.mmap(self.fd, CONTROL + capacity, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self._map)
        self.announced = False  # has a release shown that the receiver mapped it?
        self.head = 0  # end position of the last region handed out
        self.lock = threading.Lock()  # one large send at a time: regions are released in order

    def released(self) -> int:
        return RELEASE.unpack_from(self._map, 0)[0]

    def fits(self, end: int) -> bool:
        """May a region ending at position ``end`` be written now? Yes when every byte
        handed out is released (the ring is empty), or when the live bytes
        ``[release, head)``, the skipped tail and the region span at most the capacity."""
        released = self.released()
        return released == self.head or end - released <= self.capacity

    def reserve(self, size: int, deadline: Optional[float]) -> tuple[int, int]:
        """``(offset, end position)`` of a free region of ``size`` bytes; waits for the receiver."""
        start = self.head
        offset = start % self.capacity
        if offset + size > self.capacity:  # no wrapping: skip to the ring's start
            start += self.capacity - offset
            offset = 0
        end = start + size
        pause = 20e-6
        while not self.fits(end):
            if deadline is not None and time.monotonic() >= deadline:
                raise IPCTimeoutError("send: the receiver did not free arena space in time")
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)
        self.head = end
        return offset, end

    def close(self) -> None:
        self.view.release()
        self._map.close()
        os.close(self.fd)


def hello(max_payload: int) -> bytes:
    """The HELLO payload a server sends first on each connection: its payload limit
    and the arena limits :func:`locate` enforces (wire.pack_hello)."""
    return pack_hello(max_payload, MAX_CAPACITY, MAX_ARENAS)


def map_arena(fd: int, budget=None, account=None) -> tuple[int, Optional[mmap.mmap]]:
    """The receiver's side: check a new arena fd and map it. Always closes ``fd``.

    Besides the seals and size, the file must be on shmem and fully allocated
    (payload.check_backing: NOT_SHMEM, SPARSE), its size must fit ``budget``
    (charged to ``account``; refunded by :func:`forget`; OVER_BUDGET) and the
    kernel must map it (UNMAPPABLE on ENOMEM).
    """
    try:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            return Drop.BAD_ARENA, None
        st = os.fstat(fd)
        if (
            seals & ARENA_SEALS != ARENA_SEALS
            or not stat.S_ISREG(st.st_mode)
            or not CONTROL < st.st_size <= CONTROL + MAX_CAPACITY
        ):
            return Drop.BAD_ARENA, None
        status = check_backing(fd, st)
        if status != Drop.OK:
            return status, None
        if budget is not None and not budget.charge(account, st.st_size):
            return Drop.OVER_BUDGET, None
        try:
            return Drop.OK, mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED)
        except OSError as exc:
            if budget is not None:
                budget.refund(account, st.st_size)
            return (Drop.UNMAPPABLE if exc.errno in (errno.ENOMEM, errno.EAGAIN) else Drop.BAD_ARENA), None
    finally:
        close_received(fd)


def locate(arenas: dict, body: bytes, length: int, fd: int, limit: int, budget=None, account=None) -> tuple[int, Optional[mmap.mmap], int, int]:
    """Resolve an ARENA packet: ``(status, mapping, start, release position)``.

    Only called once the sender was allowed. ``fd`` (or -1) is an arena
    announced by this packet; a new one is checked, mapped (charged to
    ``budget``) and remembered in ``arenas`` (id -> mapping); the fd is always closed.
    A valid arena is kept even when this packet's payload is refused, since
    the sender will name it again.
    The region ``[start, start + length)`` of the mapping is inside the ring.
    Nothing is released here: the transport calls :func:`release_ref` once it is
    done with the packet, whatever the outcome.
    """
    arena_id, reserved, offset, position = REF.unpack_from(body)
    if fd >= 0:
        if arena_id in arenas:
            close_received(fd)  # announced again (the sender had no sign we mapped it yet): keep ours
        elif len(arenas) >= MAX_ARENAS:
            close_received(fd)
            return Drop.BAD_ARENA, None, 0, 0
        else:
            status, mapping = map_arena(fd, budget, account)
            if status != Drop.OK:
                return status, None, 0, 0
            arenas[arena_id] = mapping
    mapping = arenas.get(arena_id)
    if mapping is None:
        return Drop.BAD_ARENA, None, 0, 0
    if length > limit:
        return Drop.OVERSIZE, None, 0, 0
    if reserved or offset + length > len(mapping) - CONTROL:
        return Drop.BAD_ARENA, None, 0, 0
    return Drop.OK, mapping, CONTROL + offset, position


def release_ref(arenas: dict, body) -> None:
    """Store the release position of an ARENA packet's reference ``body`` (24 bytes)
    in the arena it names, if this connection holds that arena.

    Called for every packet of this protocol version with the ARENA flag and a
    24-byte body once the receiver is done with it, whatever the outcome
    (delivered, refused, malformed): a sender never waits on a region nobody will read.
    """
    arena_id, _reserved, _offset, position = REF.unpack_from(body)
    mapping = arenas.get(arena_id)
    if mapping is not None:
        release(mapping, position)


def release(mapping: mmap.mmap, position: int) -> None:
    """Tell the sender everything up to ``position`` has been copied out."""
    RELEASE.pack_into(mapping, 0, position & 0xFFFFFFFFFFFFFFFF)


def forget(arenas: dict, budget=None, account=None) -> None:
    """The connection ended: drop its arenas and refund their bytes."""
    if budget is not None:
        for mapping in arenas.values():
            budget.refund(account, len(mapping))
    arenas.clear()


class ArenaSender:
    """A connection's sending side: its current arena, made on first use, replaced
    by a larger one when a payload outgrows it (the receiver keeps at most
    ``MAX_ARENAS``, so at most that many are ever made per connection)."""

    def __init__(self) -> None:
        self.arena: Optional[Arena] = None
        self.made = 0
        self.lock = threading.Lock()  # one large send at a time: regions are released in order

    def usable(self, size: int) -> bool:
        """False when the sealed-memfd path must carry this payload instead."""
        if size > MAX_CAPACITY:
            return False
        return self.made < MAX_ARENAS or (self.arena is not None and size <= self.arena.capacity)

    def send(self, conn, kind: int, request_id: int, data, size: int, timeout: Optional[float]) -> None:
        deadline = deadline_of(timeout)
        with self.lock:
            arena = self.arena
            if arena is None or arena.capacity < size:
                arena = Arena(min(max(MIN_CAPACITY, 2 * size), MAX_CAPACITY))
                if self.arena is not None:
                    self.arena.close()  # the receiver keeps its own mapping until the connection ends
                self.arena = arena
                self.made += 1
            offset, end = arena.reserve(size, deadline)
            conn.copy_into(arena.view, CONTROL + offset, data)  # the transport's copy
            body = REF.pack(arena.id, 0, offset, end)
            # Attach the fd until a release shows the receiver has mapped the arena: an
            # announcement it dropped (fd limit, a refused packet) must not strand the ring.
            if not arena.announced and arena.released():
                arena.announced = True
            flags = Flag.ARENA | (0 if arena.announced else Flag.PAYLOAD_FD)
            conn.send_fd(kind, request_id, size, -1 if arena.announced else arena.fd, remaining(deadline), flags, body)

    def close(self) -> None:
        with self.lock:
            if self.arena is not None:
                self.arena.close()
                self.arena = None
