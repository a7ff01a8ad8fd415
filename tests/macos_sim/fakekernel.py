"""A fake Mach kernel + launchd standing in for ``machipc._mach`` in the simulated-macOS mode.

It has the ``_mach`` module's surface (check_in, look_up, send, Receiver,
KQueue, ...) and models, per task, what XNU and libsyscall do: an IPC space
(names -> rights with user references), a VM map (regions the kernel mapped
in), port queues with limits, send-once rights and their notifications,
port sets and kqueue knotes, and launchd's bootstrap namespace. Every rule
cites the source it follows; "xnu" is apple-oss-distributions/xnu at
xnu-11417.101.15, "launchd" the last open-source launchd
(launchd/src/launchd_core_logic.c).

Where ``_mach.pyx`` itself makes a decision (options passed to ``mach_msg``,
what to destroy after a failed send or a refused message), the fake calls the
same :mod:`machipc.machmsg` helpers the .pyx calls, so the simulated mode
tests them; the C around those calls is only checked by compiling it
(tools/macos_check.py) and by the macOS workflow.

Tests reach the model through :data:`KERNEL` (tasks, counts, hostile senders).
"""

from __future__ import annotations

import itertools
import os
import signal
import struct
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Optional

from machipc import machmsg as mm
from machipc.errors import InvalidArgument, IPCError, IPCTimeoutError, MessageTooLarge, PeerGone

IMPLEMENTATION = "mach"
OOL_THRESHOLD = 32 * 1024
RECV_INLINE_LIMIT = 256 * 1024
WAKE_MSGH_ID = 0x6D697077
TOO_LARGE = -1
WOKEN = -2

_KERNEL_AUDIT = mm.AuditToken(0, 0, 0, 0, 0, 0, 0, 0)  # KERNEL_AUDIT_TOKEN (xnu ipc_kmsg.c)


class Port:
    """ipc_port: a queue, its receiver, and what happens when it dies."""

    def __init__(self, receiver: "Task") -> None:
        self.receiver: Optional[Task] = receiver
        self.queue: deque[KMsg] = deque()
        # MACH_PORT_QLIMIT_DEFAULT (osfmk/mach/port.h); ipc_port_init
        self.qlimit = mm.MACH_PORT_QLIMIT_DEFAULT
        self.pset: Optional[PortSet] = None
        self.send_once_rights = 0
        self.pdrequest: Optional[Task] = None  # MACH_NOTIFY_PORT_DESTROYED armed by launchd
        self.knotes: list[KQueue] = []

    @property
    def alive(self) -> bool:
        return self.receiver is not None


class PortSet:
    def __init__(self) -> None:
        self.members: list[Port] = []
        self.knotes: list[KQueue] = []


class KMsg:
    """ipc_kmsg after copy-in: rights are objects, OOL data a snapshot."""

    def __init__(self, bits, dest, reply, reply_type, msgh_id, inline, descs, audit):
        self.bits, self.dest, self.reply, self.reply_type = bits, dest, reply, reply_type
        self.msgh_id, self.inline, self.descs, self.audit = msgh_id, inline, descs, audit


class Task:
    """A process: its IPC space, its VM map, its audit token."""

    _pids = itertools.count(4000)

    def __init__(self, uid: int = os.geteuid(), gid: int = os.getegid()) -> None:
        self.pid = next(self._pids)
        self.pidversion = self.pid * 7
        self.uid, self.gid = uid, gid
        self.space: dict[int, list] = {}  # name -> [object, right, urefs]
        self._names = itertools.count(0x1103, 4)
        self.vm: dict[int, bytes] = {}  # address -> bytes the kernel mapped in
        self._addresses = itertools.count(0x7000_0000, 0x10_0000)
        self.space_limit = 1 << 20

    @property
    def audit(self) -> mm.AuditToken:
        # proc_calc_audit_token (xnu bsd/kern/kern_prot.c): val[1] euid, val[2] egid, val[5] pid, val[7] pidversion
        return mm.AuditToken(self.uid, self.uid, self.gid, self.uid, self.gid, self.pid, 100001, self.pidversion)

    def insert(self, obj, right: str) -> int:
        """ipc_object_copyout: a send right reuses the port's existing name; send-once gets a new one."""
        if right == "send":
            for name, entry in self.space.items():
                if entry[0] is obj and entry[1] in ("send", "receive"):
                    entry[2] += 1
                    if entry[1] == "receive":
                        entry.append("send")
                    return name
        if len(self.space) >= self.space_limit:
            raise _KernError(mm.KERN_CODES["KERN_NO_SPACE"])
        name = next(self._names)
        self.space[name] = [obj, right, 1]
        return name

    def lookup(self, name: int, *rights: str):
        entry = self.space.get(name)
        if entry is None or (rights and entry[1] not in rights and not (entry[1] == "receive" and "send" in rights
                                                                         and "send" in entry[3:])):
            return None
        return entry

    def map(self, data: bytes) -> int:
        address = next(self._addresses)
        self.vm[address] = data
        return address

    def port_names(self) -> int:
        """What mach_port_names() would count."""
        return len(self.space)

    def mapped(self) -> int:
        """Bytes of kernel-mapped regions (what task VM size would show grow)."""
        return sum(len(d) for d in self.vm.values())


class _KernError(Exception):
    def __init__(self, kr: int) -> None:
        super().__init__(mm.kern_name(kr))
        self.kr = kr


class Kernel:
    """Every task's view, one lock, and launchd's bootstrap namespace."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.self_task = Task()
        self.current = threading.local()
        self.services: dict[str, Port] = {}  # dynamic names (launchd job_mig_check_in2)
        self.machservices: dict[str, tuple[Port, Task]] = {}  # plist MachServices: port, job's task
        self.launchd = Task(uid=0, gid=0)
        self.launchd.pid = 1
        self.blocked = 0  # threads waiting inside mach_msg (tests wait for "blocked in receive")
        #: Bootstrap requests launchd serves before it processes a dead-name notification
        #: (0: at once). launchd learns that a dynamic service's port died from an
        #: asynchronous MACH_NOTIFY_DEAD_NAME; until then the name still reads as held.
        self.launchd_lag = 0
        self._dying: dict[str, list] = {}  # name -> [requests left, task that held it]

    @property
    def task(self) -> Task:
        return getattr(self.current, "task", None) or self.self_task

    @contextmanager
    def as_task(self, task: Task):
        """Run the enclosed _mach calls as another process (this thread only)."""
        old = getattr(self.current, "task", None)
        self.current.task = task
        try:
            yield task
        finally:
            self.current.task = old

    # -- rights --------------------------------------------------------------

    def release(self, task: Task, name: int) -> None:
        """mach_port_deallocate (xnu osfmk/ipc/ipc_right.c ipc_right_dealloc): -1 uref; the last
        send-once right to go unused sends MACH_NOTIFY_SEND_ONCE (ipc_notify_send_once)."""
        entry = task.space.get(name)
        if entry is None:
            return
        obj, right = entry[0], entry[1]
        if right == "receive":
            if "send" in entry[3:]:
                entry.remove("send")
                entry[2] -= 1
            return
        entry[2] -= 1
        if entry[2] <= 0:
            del task.space[name]
        if right == "send_once":
            self._send_once_died(obj)

    def _send_once_died(self, port: Port) -> None:
        port.send_once_rights -= 1
        if port.alive:
            # ipc_notify_send_once: a kernel message, audit token KERNEL_AUDIT_TOKEN; send-once
            # messages are never blocked by the queue limit (ipc_mqueue_send).
            self._enqueue(port, KMsg(0, port, None, 0, mm.MACH_NOTIFY_SEND_ONCE, b"", [], _KERNEL_AUDIT), force=True)

    def destroy_receive(self, task: Task, name: int) -> None:
        """mach_port_mod_refs(RECEIVE, -1) -> ipc_port_destroy (xnu osfmk/ipc/ipc_port.c)."""
        entry = task.space.pop(name, None)
        if entry is None or entry[1] != "receive":
            return
        port = entry[0]
        if port.pset is not None:
            port.pset.members.remove(port)
            port.pset = None
        if port.pdrequest is not None:
            # ipc_port_destroy with a port-destroyed request armed: the receive right, and its
            # queue, go back to whoever armed it (launchd, machservice_request_notifications
            # for plist MachServices). Nothing queued is destroyed; senders see no change.
            port.receiver = port.pdrequest
            return
        port.receiver = None
        queued, port.queue = list(port.queue), deque()
        for kmsg in queued:
            self._destroy_kmsg(kmsg)
        # launchd's dead-name notification removes a dynamic name (machservice_resetport),
        # after launchd_lag more bootstrap requests.
        for name in [k for k, v in self.services.items() if v is port]:
            del self.services[name]
            if self.launchd_lag:
                self._dying[name] = [self.launchd_lag, task]
        self.cond.notify_all()

    def _destroy_kmsg(self, kmsg: KMsg) -> None:
        """ipc_kmsg_destroy: rights released (a send-once right notifies), OOL copies freed."""
        if kmsg.reply is not None and kmsg.reply_type == "send_once":
            self._send_once_died(kmsg.reply)

    # -- queues --------------------------------------------------------------

    def _enqueue(self, port: Port, kmsg: KMsg, force: bool = False) -> None:
        port.queue.append(kmsg)
        # ipc_mqueue_post -> KNOTE (xnu osfmk/ipc/ipc_mqueue.c): knotes on the port and on its set fire
        for kq in port.knotes + (port.pset.knotes if port.pset else []):
            kq.activate()
        self.cond.notify_all()

    def _wait(self, deadline: Optional[float], interruptible: bool) -> bool:
        """Block on the kernel lock; False at the deadline.

        libsyscall mach_msg (libsyscall/mach/mach_msg.c): without MACH_RCV_INTERRUPT /
        MACH_SEND_INTERRUPT it loops on *_INTERRUPTED in C, so no Python signal handler
        can run until the call returns: modelled by blocking the signals here. With the
        option, mach_msg returns *_INTERRUPTED and _mach.pyx runs the handlers
        (PyErr_CheckSignals) and waits again for the rest of the time: modelled by an
        ordinary wait, during which CPython runs the handlers (PEP 475).
        """
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if timeout == 0.0:
            return False
        self.blocked += 1
        try:
            self._block(timeout, interruptible)
        finally:
            self.blocked -= 1
        return deadline is None or time.monotonic() < deadline

    def _block(self, timeout: Optional[float], interruptible: bool) -> None:
        if interruptible or threading.current_thread() is not threading.main_thread():
            self.cond.wait(timeout)
        else:
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                self.cond.wait(timeout)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    # -- mach_msg send ---------------------------------------------------------

    def msg_send(self, task: Task, bits: int, dest_name: int, reply_name: int, msgh_id: int, inline: bytes,
                 descs: list, options: int, timeout_ms: Optional[int]) -> tuple[int, Optional[dict]]:
        """mach_msg(MACH_SEND_MSG). Returns (kr, header_after) where ``header_after`` is what
        the kernel wrote back into the sender's header (pseudo-receive), else None."""
        dest_type = bits & mm.MACH_MSGH_BITS_REMOTE_MASK
        reply_type = (bits & mm.MACH_MSGH_BITS_LOCAL_MASK) >> 8
        # ipc_kmsg_copyin_header (xnu osfmk/ipc/ipc_kmsg.c): a dead or unknown destination
        # fails before anything is copied in; the header is left as the sender wrote it.
        rights = ("send_once",) if dest_type == mm.MACH_MSG_TYPE_MOVE_SEND_ONCE else ("send",)
        entry = task.lookup(dest_name, *rights)
        if entry is None or not entry[0].alive:
            return mm.MACH_SEND_INVALID_DEST, None
        port: Port = entry[0]
        reply = None
        if reply_name:
            rentry = task.lookup(reply_name, "receive")
            if rentry is None or reply_type != mm.MACH_MSG_TYPE_MAKE_SEND_ONCE:
                return mm.KERN_CODES["MACH_SEND_INVALID_REPLY"], None
            reply = rentry[0]
            reply.send_once_rights += 1
        if dest_type == mm.MACH_MSG_TYPE_MOVE_SEND_ONCE:
            del task.space[dest_name]  # the send-once right is consumed by copy-in
            port.send_once_rights -= 1
        # ipc_kmsg_copyin_ool_descriptor: data is snapshotted; deallocate=TRUE unmaps the sender's copy
        kdescs = []
        for d in descs:
            data = d["data"] if "data" in d else task.vm[d["address"]][: d["size"]]
            if d.get("deallocate") and d.get("address") in task.vm:
                del task.vm[d["address"]]
            kdescs.append({"type": d["type"], "copy": d["copy"], "data": bytes(data)})
        kmsg = KMsg(bits, port, reply, "send_once" if reply else None, msgh_id, bytes(inline), kdescs, task.audit)
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        interruptible = bool(options & mm.MACH_SEND_INTERRUPT)
        # ipc_mqueue_send (xnu osfmk/ipc/ipc_mqueue.c): a full queue blocks the sender, except
        # for messages sent to a send-once right, which never wait for queue space.
        while port.alive and len(port.queue) >= port.qlimit and dest_type != mm.MACH_MSG_TYPE_MOVE_SEND_ONCE:
            if not self._wait(deadline, interruptible):
                return self._pseudo_receive(task, kmsg, dest_type, mm.MACH_SEND_TIMED_OUT)
        if not port.alive:
            return self._pseudo_receive(task, kmsg, dest_type, mm.MACH_SEND_INVALID_DEST)
        self._enqueue(port, kmsg)
        return mm.MACH_MSG_SUCCESS, None

    def _pseudo_receive(self, task: Task, kmsg: KMsg, dest_type: int, kr: int) -> tuple[int, dict]:
        """mach_msg_receive_pseudo / ipc_kmsg_copyout_pseudo (xnu osfmk/ipc/mach_msg.c,
        ipc_kmsg.c): a send that fails after copy-in gives its rights back to the sender,
        *unswapped*: the destination right in msgh_remote_port, the reply right (now a
        send-once right) in msgh_local_port, OOL regions mapped in with deallocate set
        for virtual copies. If the space is full the rights are destroyed instead and
        MACH_MSG_IPC_SPACE is or-ed into the return code."""
        after = {"remote": 0, "local": 0, "remote_type": 0, "local_type": 0, "descs": []}
        try:
            if dest_type != mm.MACH_MSG_TYPE_MOVE_SEND_ONCE:
                after["remote"] = task.insert(kmsg.dest, "send")
                after["remote_type"] = mm.MACH_MSG_TYPE_MOVE_SEND
            if kmsg.reply is not None:
                after["local"] = task.insert(kmsg.reply, "send_once")
                after["local_type"] = mm.MACH_MSG_TYPE_PORT_SEND_ONCE
        except _KernError:
            if kmsg.reply is not None and not after["local"]:
                self._send_once_died(kmsg.reply)
            kr |= mm.MACH_MSG_IPC_SPACE
        for d in kmsg.descs:
            after["descs"].append({"type": d["type"], "copy": d["copy"], "address": task.map(d["data"]),
                                   "size": len(d["data"]), "deallocate": d["copy"] == mm.MACH_MSG_VIRTUAL_COPY})
        return kr, after

    # -- mach_msg receive -------------------------------------------------------

    def msg_receive(self, task: Task, name: int, options: int, capacity: int, timeout_ms: Optional[int]):
        """mach_msg(MACH_RCV_MSG): (kr, buffer bytes or None, size needed on TOO_LARGE)."""
        entry = task.lookup(name, "receive", "port_set")
        if entry is None:
            return mm.KERN_CODES["MACH_RCV_INVALID_NAME"], None, 0
        obj = entry[0]
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        interruptible = bool(options & mm.MACH_RCV_INTERRUPT)
        while True:
            if task.space.get(name) is not entry:
                return mm.MACH_RCV_PORT_DIED, None, 0
            members = obj.members if isinstance(obj, PortSet) else [obj]
            port = next((p for p in members if p.queue), None)
            if port is not None:
                break
            if not self._wait(deadline, interruptible):
                return mm.MACH_RCV_TIMED_OUT, None, 0
        kmsg = port.queue[0]
        size = self._msgh_size(kmsg)
        needed = size + mm.AUDIT_TRAILER_SIZE
        if needed > capacity:
            if options & mm.MACH_RCV_LARGE:
                # ipc_mqueue_receive_results: with MACH_RCV_LARGE the message stays queued and
                # msgh_size reports its size without the trailer (mach_msg_receive_too_large).
                return mm.MACH_RCV_TOO_LARGE, None, size
            # mach_msg_receive_error -> ipc_kmsg_copyout_dest_to_user: dequeued and destroyed
            port.queue.popleft()
            self._destroy_kmsg(kmsg)
            self.cond.notify_all()
            return mm.MACH_RCV_TOO_LARGE, None, size
        port.queue.popleft()
        self.cond.notify_all()  # ipc_mqueue_release_msgcount: a blocked sender may go on
        return mm.MACH_MSG_SUCCESS, self._copyout(task, port, kmsg, size), size

    @staticmethod
    def _msgh_size(kmsg: KMsg) -> int:
        if kmsg.msgh_id == mm.MACH_NOTIFY_SEND_ONCE and not kmsg.inline:
            return mm.MSG_HEADER_SIZE  # mach_send_once_notification_t is a bare header
        desc = mm.MSG_BODY_SIZE + mm.OOL_DESCRIPTOR_SIZE * len(kmsg.descs) if kmsg.bits & mm.MACH_MSGH_BITS_COMPLEX else 0
        return mm.round_msg(mm.MSG_HEADER_SIZE + desc + len(kmsg.inline))

    def _copyout(self, task: Task, port: Port, kmsg: KMsg, size: int) -> bytes:
        """ipc_kmsg_copyout (xnu osfmk/ipc/ipc_kmsg.c): the reply right gets a name in the
        receiver's space (header swapped: it arrives in msgh_remote_port), OOL and volatile
        regions are mapped in; a descriptor's deallocate flag is set only for
        MACH_MSG_VIRTUAL_COPY (``deallocate = (kdesc->copy == MACH_MSG_VIRTUAL_COPY)``,
        ipc_kmsg_copyout_ool_descriptor), and ``copy`` is the sender's."""
        reply = task.insert(kmsg.reply, "send_once") if kmsg.reply is not None else 0
        local = next((n for n, e in task.space.items() if e[0] is port and e[1] == "receive"), 0)
        bits = mm.MACH_MSGH_BITS(mm.MACH_MSG_TYPE_PORT_SEND_ONCE if reply else 0,
                                 mm.MACH_MSG_TYPE_PORT_SEND_ONCE if kmsg.dest.receiver is None or kmsg.msgh_id ==
                                 mm.MACH_NOTIFY_SEND_ONCE else mm.MACH_MSG_TYPE_MOVE_SEND)
        body = b""
        if kmsg.bits & mm.MACH_MSGH_BITS_COMPLEX:
            bits |= mm.MACH_MSGH_BITS_COMPLEX
            body = struct.pack("<I", len(kmsg.descs))
            for d in kmsg.descs:
                address = task.map(d["data"])
                body += mm.OOL_DESCRIPTOR.pack(address, d["copy"] == mm.MACH_MSG_VIRTUAL_COPY, d["copy"], 0,
                                               d["type"], len(d["data"]))
        msg = mm.MSG_HEADER.pack(bits, size, reply, local, 0, kmsg.msgh_id) + body + kmsg.inline
        msg += bytes(size - len(msg))
        return msg + mm._trailer(kmsg.audit)

    # -- libsyscall mach_msg_destroy ------------------------------------------------

    def msg_destroy(self, task: Task, buf) -> None:
        """mach_msg_destroy (libsyscall/mach/mach_msg.c): releases msgh_remote_port by its
        bits, never msgh_local_port; frees OOL memory only ``if (dsc->deallocate)`` and skips
        MACH_MSG_OOL_VOLATILE_DESCRIPTOR ("Just skip it")."""
        view = memoryview(buf).cast("B")
        bits, size, remote, _local, _voucher, _id = mm.MSG_HEADER.unpack_from(view, 0)
        if remote and (bits & mm.MACH_MSGH_BITS_REMOTE_MASK) in (mm.MACH_MSG_TYPE_MOVE_SEND,
                                                                   mm.MACH_MSG_TYPE_MOVE_SEND_ONCE):
            self.release(task, remote)
        if not bits & mm.MACH_MSGH_BITS_COMPLEX:
            return
        count = struct.unpack_from("<I", view, mm.OFF_DESCRIPTOR_COUNT)[0]
        off = mm.OFF_FIRST_DESCRIPTOR
        for _ in range(count):
            if off + mm.OOL_DESCRIPTOR_SIZE > size:
                break
            address, dealloc, _copy, _pad, dtype, dsize = mm.OOL_DESCRIPTOR.unpack_from(view, off)
            if dtype == mm.MACH_MSG_OOL_DESCRIPTOR and dealloc and dsize:
                self.vm_deallocate(task, address, dsize)
            off += mm.OOL_DESCRIPTOR_SIZE

    @staticmethod
    def vm_deallocate(task: Task, address: int, size: int) -> None:
        if size and address in task.vm:
            del task.vm[address]

    # -- launchd bootstrap ---------------------------------------------------------

    def check_in(self, task: Task, name: str) -> int:
        """bootstrap_check_in: launchd job_mig_check_in2 (launchd_core_logic.c).

        * a plist MachServices name: its job gets the receive right launchd holds
          (launchd arms MACH_NOTIFY_PORT_DESTROYED, machservice_request_notifications);
          anyone else gets BOOTSTRAP_NOT_PRIVILEGED;
        * a dynamic name nobody holds: a new service, receive right to the caller;
        * a dynamic name held by the caller: BOOTSTRAP_SERVICE_ACTIVE;
        * a dynamic name held by another process: BOOTSTRAP_NOT_PRIVILEGED
          ("tried to hijack the service").
        """
        if name in self.machservices:
            port, job = self.machservices[name]
            if task is not job:
                return self._bootstrap_fail(mm.BOOTSTRAP_NOT_PRIVILEGED)
            if port.receiver is not self.launchd:
                return self._bootstrap_fail(mm.BOOTSTRAP_SERVICE_ACTIVE)
            port.receiver = task
            return task.insert(port, "receive")
        dying = self._dying.get(name)
        if dying is not None:
            dying[0] -= 1
            if dying[0] <= 0:
                del self._dying[name]
            return self._bootstrap_fail(mm.BOOTSTRAP_SERVICE_ACTIVE if dying[1] is task else
                                        mm.BOOTSTRAP_NOT_PRIVILEGED)
        port = self.services.get(name)
        if port is not None and port.alive:
            return self._bootstrap_fail(mm.BOOTSTRAP_SERVICE_ACTIVE if port.receiver is task else
                                        mm.BOOTSTRAP_NOT_PRIVILEGED)
        port = Port(task)
        self.services[name] = port
        return task.insert(port, "receive")

    @staticmethod
    def _bootstrap_fail(kr: int) -> int:
        raise _KernError(kr)

    def look_up(self, task: Task, name: str) -> int:
        """bootstrap_look_up: launchd job_mig_look_up2: a send right, or BOOTSTRAP_UNKNOWN_SERVICE."""
        port = self.machservices[name][0] if name in self.machservices else self.services.get(name)
        if port is None or not port.alive:
            raise _KernError(mm.BOOTSTRAP_UNKNOWN_SERVICE)
        return task.insert(port, "send")

    def declare_machservice(self, name: str, job: Task) -> None:
        """A launchd plist with ``MachServices = {name = true;}`` loaded for ``job``."""
        port = Port(self.launchd)
        port.pdrequest = self.launchd
        self.machservices[name] = (port, job)


KERNEL = Kernel()


def _task() -> Task:
    return KERNEL.task


def _timeout_ms(timeout) -> Optional[int]:
    return None if timeout is None else mm.timeout_ms(timeout)


# -- the _mach surface ---------------------------------------------------------------------

_generation = 0


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def generation() -> int:
    return _generation


def _check_fork(gen: int) -> None:
    if gen != _generation:
        raise IPCError("this Mach port was created before fork(): create a new machipc Server/Client in the child")


def check_in(name: str) -> int:
    mm.check_service_name(name)
    with KERNEL.cond:
        try:
            return KERNEL.check_in(_task(), name)
        except _KernError as exc:
            raise mm.bootstrap_error(exc.kr, "bootstrap_check_in", name) from None


def look_up(name: str) -> int:
    mm.check_service_name(name)
    with KERNEL.cond:
        try:
            return KERNEL.look_up(_task(), name)
        except _KernError as exc:
            raise mm.bootstrap_error(exc.kr, "bootstrap_look_up", name) from None


def set_queue_limit(port: int, limit: int) -> None:
    """mach_port_set_attributes(MACH_PORT_LIMITS_INFO): needs the receive right (xnu mach_port.c)."""
    if not 1 <= limit <= mm.MACH_PORT_QLIMIT_MAX:
        raise InvalidArgument(f"queue_limit must be between 1 and {mm.MACH_PORT_QLIMIT_MAX}, not {limit}")
    with KERNEL.cond:
        entry = _task().lookup(port, "receive")
        if entry is None:
            raise mm.kern_error(mm.KERN_CODES["KERN_INVALID_RIGHT"], "mach_port_set_attributes")
        entry[0].qlimit = limit


def allocate_receive() -> int:
    with KERNEL.cond:
        task = _task()
        return task.insert(Port(task), "receive")


def allocate_port_set() -> int:
    with KERNEL.cond:
        return _task().insert(PortSet(), "port_set")


def move_member(port: int, port_set: int) -> None:
    with KERNEL.cond:
        task = _task()
        p, s = task.lookup(port, "receive"), task.lookup(port_set, "port_set")
        if p is None or s is None:
            raise mm.kern_error(mm.KERN_CODES["KERN_INVALID_RIGHT"], "mach_port_move_member")
        p[0].pset = s[0]
        s[0].members.append(p[0])


def make_send(port: int) -> None:
    with KERNEL.cond:
        entry = _task().lookup(port, "receive")
        entry.append("send")
        entry[2] += 1


def destroy_receive(port: int) -> None:
    with KERNEL.cond:
        KERNEL.destroy_receive(_task(), port)


def destroy_port_set(port_set: int) -> None:
    with KERNEL.cond:
        entry = _task().space.pop(port_set, None)
        if entry is not None:
            for p in entry[0].members:
                p.pset = None


def deallocate(port: int) -> None:
    if port:
        with KERNEL.cond:
            KERNEL.release(_task(), port)


def send(dest, dest_disposition, reply, reply_disposition, header, payload, timeout, ool_threshold=OOL_THRESHOLD,
         gen=0):
    """_mach.send over the model: same layout choice, same options and the same
    after-failure cleanup (machmsg.send_cleanup) as the .pyx."""
    _check_fork(gen)
    if len(header) != 24:
        raise InvalidArgument("the machipc header must be 24 bytes")
    data = bytes(memoryview(payload).cast("B")) if len(payload) else b""
    bits = mm.MACH_MSGH_BITS(dest_disposition, reply_disposition if reply else 0)
    descs = []
    inline = bytes(header)
    if len(data) > ool_threshold:
        bits |= mm.MACH_MSGH_BITS_COMPLEX
        descs.append({"type": mm.MACH_MSG_OOL_DESCRIPTOR, "copy": mm.MACH_MSG_VIRTUAL_COPY, "data": data})
    else:
        inline += data
    with KERNEL.cond:
        task = _task()
        kr, after = KERNEL.msg_send(task, bits, dest, reply, mm.MACHIPC_MSGH_ID, inline, descs, mm.SEND_OPTIONS,
                                    _timeout_ms(timeout))
        if kr != mm.MACH_MSG_SUCCESS:
            _cleanup_failed_send(task, kr, after, bits, dest, reply)
    if kr != mm.MACH_MSG_SUCCESS:
        raise mm.send_error(kr, timeout)


def _cleanup_failed_send(task: Task, kr: int, after: Optional[dict], bits: int, dest: int, reply: int) -> None:
    """What _mach.pyx does after a failed send: mach_msg_destroy the header the kernel
    left, then release the local right machmsg.send_cleanup names."""
    if not mm.send_needs_destroy(kr):
        return
    if after is None:  # failed before copy-in: the header is as written
        hdr = mm.MSG_HEADER.pack(bits & ~mm.MACH_MSGH_BITS_COMPLEX, mm.MSG_HEADER_SIZE, dest, reply, 0, 0)
    else:
        hdr = mm.MSG_HEADER.pack(mm.MACH_MSGH_BITS(after["remote_type"], after["local_type"]), mm.MSG_HEADER_SIZE,
                                 after["remote"], after["local"], 0, 0)
        for d in after["descs"]:  # the pseudo-received VIRTUAL_COPY regions: deallocate is set
            if d["deallocate"]:
                KERNEL.vm_deallocate(task, d["address"], d["size"])
    KERNEL.msg_destroy(task, hdr)
    local = mm.local_right_to_release(hdr)
    if local:
        KERNEL.release(task, local)


def send_wake(port: int) -> None:
    with KERNEL.cond:
        KERNEL.msg_send(_task(), mm.MACH_MSGH_BITS(mm.MACH_MSG_TYPE_COPY_SEND, 0), port, 0, WAKE_MSGH_ID, b"", [],
                        mm.SEND_OPTIONS, 0)


class Receiver:
    """_mach.Receiver over the model: same options, same validation and the same
    cleanup of refused messages (machmsg.take_regions, then mach_msg_destroy)."""

    def __init__(self, wake_port: int = 0, capacity: int = 0, limit: int = 0) -> None:
        self.wake_port = wake_port
        self.capacity = mm.round_msg(capacity or mm.COMPLEX_PREFIX_SIZE + 24 + OOL_THRESHOLD + mm.MAX_TRAILER_SIZE)
        self.limit = max(limit, RECV_INLINE_LIMIT + mm.MAX_TRAILER_SIZE + 4096)
        self.gen = _generation
        self.busy = False

    def recv(self, port: int, timeout, allow_notification: bool = False):
        _check_fork(self.gen)
        if self.busy:
            raise IPCError("Receiver.recv is not re-entrant: one receiving thread at a time")
        self.busy = True
        try:
            return self._recv(port, timeout, allow_notification)
        finally:
            self.busy = False

    def _recv(self, port, timeout, allow_notification):
        task = _task()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            tmo = None if deadline is None else mm.timeout_ms(deadline - time.monotonic())
            with KERNEL.cond:
                kr, buf, size = KERNEL.msg_receive(task, port, mm.RECV_OPTIONS, self.capacity, tmo)
            if kr == mm.MACH_MSG_SUCCESS:
                break
            if kr == mm.MACH_RCV_TIMED_OUT:
                return None
            if kr == mm.MACH_RCV_TOO_LARGE:
                needed = mm.round_msg(size) + mm.MAX_TRAILER_SIZE
                if self.capacity < needed <= self.limit:
                    self.capacity = needed
                    continue
                with KERNEL.cond:
                    kr, buf, size = KERNEL.msg_receive(task, port, mm.RECV_OPTIONS & ~mm.MACH_RCV_LARGE,
                                                       self.capacity, 0)
                if kr == mm.MACH_MSG_SUCCESS:
                    break
                return (TOO_LARGE, None, b"", None, 0)
            raise mm.kern_error(kr, "mach_msg(receive)")
        local = mm.MSG_HEADER.unpack_from(buf, 0)[3]
        if self.wake_port and local == self.wake_port:
            with KERNEL.cond:
                KERNEL.msg_destroy(task, buf)
            return (WOKEN, None, b"", None, 0)
        buf = bytearray(buf)
        try:
            reason, parsed = mm.parse(buf, allow_notification=allow_notification)
            if reason != mm.Reject.OK:
                self._refuse(task, buf)
                return (reason, parsed, b"", None, 0)
            inline = bytes(parsed.inline(buf))
            region = FakeRegion(task, parsed.ool_address, parsed.ool_size) if parsed.ool_address else None
        except BaseException:
            self._refuse(task, buf)  # what the .pyx does between receive and hand-off
            raise
        return (reason, parsed, inline, region, parsed.remote_port)

    @staticmethod
    def _refuse(task: Task, buf: bytearray) -> None:
        with KERNEL.cond:
            for address, size in mm.take_regions(buf):
                KERNEL.vm_deallocate(task, address, size)
            KERNEL.msg_destroy(task, buf)


class FakeRegion(bytes):
    """_mach.VMRegion: a read-only view of a region the kernel mapped into the task,
    unmapped when it and every memoryview of it are gone (or on ``release``)."""

    def __new__(cls, task: Task, address: int, size: int) -> "FakeRegion":
        self = super().__new__(cls, task.vm[address][:size])
        self.task, self.address, self.size = task, address, size
        return self

    def release(self) -> None:
        with KERNEL.cond:
            KERNEL.vm_deallocate(self.task, self.address, self.size)
        self.address = 0

    def __del__(self) -> None:
        if self.address:
            self.release()


class KQueue:
    """_mach.KQueue over the model: EVFILT_MACHPORT on a port set, as a real fd.

    The fd is a pipe holding one byte while the knote is queued on the kqueue
    (filt_kqueue / kqueue_select, xnu bsd/kern/kern_event.c: a kqueue fd is
    readable while ``kq_count > 0``). A message arriving queues the knote;
    receiving the message does *not* dequeue it: only processing the kqueue with
    kevent() does (``drain``), where filt_machportprocess (xnu osfmk/ipc/ipc_pset.c)
    re-checks the port and drops the knote once it is empty.
    """

    def __init__(self, port: int) -> None:
        with KERNEL.cond:
            entry = _task().lookup(port, "receive", "port_set")
            if entry is None:
                raise OSError(22, "Invalid argument", "kevent64(EVFILT_MACHPORT)")
            self._obj = entry[0]
            self._r, self._w = os.pipe()
            self._active = False
            self._gen = _generation
            self._obj.knotes.append(self)
            # filt_machportattach: a port (set) with messages already queued fires at once
            members = self._obj.members if isinstance(self._obj, PortSet) else [self._obj]
            if any(p.queue for p in members):
                self.activate()

    def activate(self) -> None:
        if not self._active and self._w >= 0:
            self._active = True
            os.write(self._w, b"!")

    def fileno(self) -> int:
        return self._r

    def drain(self) -> None:
        """kevent64(kq, NULL, 0, evs, 8, 0, &zero): process the queued knote."""
        with KERNEL.cond:
            members = self._obj.members if isinstance(self._obj, PortSet) else [self._obj]
            if self._active and not any(p.queue for p in members):
                self._active = False
                os.read(self._r, 1)

    def close(self) -> None:
        with KERNEL.cond:
            if self in self._obj.knotes:
                self._obj.knotes.remove(self)
        if self._r >= 0 and self._gen == _generation:
            os.close(self._r)
            os.close(self._w)
        self._r = self._w = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
