# C declarations for machipc/_mach.pyx (macOS only). Logic lives in the .pyx.
#
# "_mach_layout.h" includes <mach/mach.h>, <mach/message.h>, <mach/notify.h>,
# <bsm/audit.h>, proves machmsg.py's layout constants with _Static_assert, and
# declares the bootstrap prototypes (<servers/bootstrap.h> is not in zig's SDK copy).

from libc.stdint cimport int16_t, int64_t, uint16_t, uint32_t, uint64_t, uintptr_t
from posix.time cimport timespec


cdef extern from "_mach_layout.h" nogil:
    ctypedef unsigned int natural_t
    ctypedef int kern_return_t
    ctypedef kern_return_t mach_msg_return_t
    ctypedef natural_t mach_port_t
    ctypedef natural_t mach_port_name_t
    ctypedef mach_port_t ipc_space_t
    ctypedef mach_port_t vm_map_t
    ctypedef unsigned int mach_msg_bits_t
    ctypedef natural_t mach_msg_size_t
    ctypedef int mach_msg_id_t
    ctypedef int mach_msg_option_t
    ctypedef natural_t mach_msg_timeout_t
    ctypedef unsigned int mach_msg_type_name_t
    ctypedef natural_t mach_msg_type_number_t
    ctypedef natural_t mach_port_right_t
    ctypedef int mach_port_delta_t
    ctypedef int mach_port_flavor_t
    ctypedef int *mach_port_info_t
    ctypedef natural_t mach_port_msgcount_t
    ctypedef uintptr_t vm_address_t
    ctypedef uintptr_t vm_size_t

    ctypedef struct mach_msg_header_t:
        mach_msg_bits_t msgh_bits
        mach_msg_size_t msgh_size
        mach_port_t msgh_remote_port
        mach_port_t msgh_local_port
        mach_port_name_t msgh_voucher_port
        mach_msg_id_t msgh_id

    ctypedef struct mach_msg_body_t:
        mach_msg_size_t msgh_descriptor_count

    ctypedef struct mach_msg_ool_descriptor_t:
        void *address
        unsigned int deallocate
        unsigned int copy
        unsigned int type
        mach_msg_size_t size

    ctypedef struct machipc_complex_prefix_t:
        mach_msg_header_t header
        mach_msg_body_t body
        mach_msg_ool_descriptor_t ool

    ctypedef struct audit_token_t:
        unsigned int val[8]

    ctypedef struct mach_port_limits_t:
        mach_port_msgcount_t mpl_qlimit

    enum:
        KERN_SUCCESS
        MACH_MSG_SUCCESS
        MACH_PORT_NULL
        MACH_PORT_DEAD
        MACH_SEND_MSG
        MACH_RCV_MSG
        MACH_RCV_LARGE
        MACH_SEND_TIMEOUT
        MACH_RCV_TIMEOUT
        MACH_MSG_TIMEOUT_NONE
        MACH_MSGH_BITS_COMPLEX
        MACH_MSG_TYPE_COPY_SEND
        MACH_MSG_TYPE_MAKE_SEND
        MACH_MSG_TYPE_MAKE_SEND_ONCE
        MACH_MSG_TYPE_MOVE_SEND_ONCE
        MACH_MSG_OOL_DESCRIPTOR
        MACH_MSG_VIRTUAL_COPY
        MACH_MSG_TRAILER_FORMAT_0
        MACH_RCV_TRAILER_AUDIT
        MACH_SEND_INVALID_DEST
        MACH_SEND_TIMED_OUT
        MACH_SEND_INTERRUPTED
        MACH_RCV_TIMED_OUT
        MACH_RCV_TOO_LARGE
        MACH_RCV_INTERRUPTED
        MACH_PORT_RIGHT_SEND
        MACH_PORT_RIGHT_RECEIVE
        MACH_PORT_RIGHT_PORT_SET
        MACH_PORT_LIMITS_INFO
        MACH_PORT_LIMITS_INFO_COUNT
        MACH_PORT_QLIMIT_MAX
        MACHMSG_MAX_TRAILER_SIZE
        MACHMSG_COMPLEX_PREFIX_SIZE
        MACHMSG_MSG_HEADER_SIZE
        MACHMSG_MACHIPC_MSGH_ID
        MACHMSG_BOOTSTRAP_NAME_MAX
        MACHMSG_MACH_MSG_MASK

    mach_msg_bits_t MACH_MSGH_BITS(mach_msg_type_name_t remote, mach_msg_type_name_t local)
    mach_msg_option_t MACH_RCV_TRAILER_TYPE(int x)
    mach_msg_option_t MACH_RCV_TRAILER_ELEMENTS(int x)
    mach_msg_size_t round_msg(mach_msg_size_t x)

    mach_port_t mach_task_self()
    mach_msg_return_t mach_msg(mach_msg_header_t *msg, mach_msg_option_t option,
                               mach_msg_size_t send_size, mach_msg_size_t rcv_size,
                               mach_port_name_t rcv_name, mach_msg_timeout_t timeout,
                               mach_port_name_t notify)
    void mach_msg_destroy(mach_msg_header_t *msg)
    kern_return_t mach_port_allocate(ipc_space_t task, mach_port_right_t right, mach_port_name_t *name)
    kern_return_t mach_port_deallocate(ipc_space_t task, mach_port_name_t name)
    kern_return_t mach_port_mod_refs(ipc_space_t task, mach_port_name_t name, mach_port_right_t right,
                                     mach_port_delta_t delta)
    kern_return_t mach_port_move_member(ipc_space_t task, mach_port_name_t member, mach_port_name_t after)
    kern_return_t mach_port_insert_right(ipc_space_t task, mach_port_name_t name, mach_port_t poly,
                                         mach_msg_type_name_t polyPoly)
    kern_return_t mach_port_set_attributes(ipc_space_t task, mach_port_name_t name, mach_port_flavor_t flavor,
                                           mach_port_info_t port_info, mach_msg_type_number_t port_infoCnt)
    kern_return_t vm_deallocate(vm_map_t target_task, vm_address_t address, vm_size_t size)

    # declared by hand in _mach_layout.h
    mach_port_t bootstrap_port
    kern_return_t bootstrap_check_in(mach_port_t bp, const char *service_name, mach_port_t *sp)
    kern_return_t bootstrap_look_up(mach_port_t bp, const char *service_name, mach_port_t *sp)


cdef extern from "<sys/event.h>" nogil:
    struct kevent64_s:
        uint64_t ident
        int16_t filter
        uint16_t flags
        uint32_t fflags
        int64_t data
        uint64_t udata
        uint64_t ext[2]

    enum:
        EVFILT_MACHPORT
        EV_ADD
        EV_ENABLE

    int kqueue()
    int kevent64(int kq, const kevent64_s *changelist, int nchanges, kevent64_s *eventlist, int nevents,
                 unsigned int flags, const timespec *timeout)
