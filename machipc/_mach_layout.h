/* machipc/_mach_layout.h: included by _mach.pxd (macOS only).
 *
 * 1. The layout constants the portable parser (machipc/machmsg.py) uses, each
 *    proven equal to offsetof/sizeof/#define of the real SDK headers by a
 *    _Static_assert: if the SDK disagrees, the extension does not compile and
 *    `make macos-check` fails. tests/test_machmsg.py checks that every
 *    MACHMSG_* value here equals the constant of the same name in machmsg.py.
 * 2. The bootstrap prototypes: <servers/bootstrap.h> is not in the public SDK,
 *    so they are declared here by hand (libSystem exports them; the gate's
 *    link without dynamic_lookup proves each name exists).
 */
#ifndef MACHIPC_MACH_LAYOUT_H
#define MACHIPC_MACH_LAYOUT_H

#include <stddef.h>
#include <mach/mach.h>
#include <mach/message.h>
#include <mach/notify.h>
#include <mach/port.h>
#include <bsm/audit.h>

#if !defined(__LP64__)
#error "machipc's Mach layout assumes 64-bit user space"
#endif

#define MACHMSG_MSG_HEADER_SIZE 24
#define MACHMSG_OFF_MSGH_BITS 0
#define MACHMSG_OFF_MSGH_SIZE 4
#define MACHMSG_OFF_MSGH_REMOTE_PORT 8
#define MACHMSG_OFF_MSGH_LOCAL_PORT 12
#define MACHMSG_OFF_MSGH_VOUCHER_PORT 16
#define MACHMSG_OFF_MSGH_ID 20
#define MACHMSG_MSG_BODY_SIZE 4
#define MACHMSG_OFF_DESCRIPTOR_COUNT 24
#define MACHMSG_OFF_FIRST_DESCRIPTOR 28
#define MACHMSG_OOL_DESCRIPTOR_SIZE 16
#define MACHMSG_PORT_DESCRIPTOR_SIZE 12
#define MACHMSG_OFF_OOL_ADDRESS 0
#define MACHMSG_OFF_OOL_SIZE 12
#define MACHMSG_COMPLEX_PREFIX_SIZE 44
#define MACHMSG_OFF_TRAILER_TYPE 0
#define MACHMSG_OFF_TRAILER_SIZE 4
#define MACHMSG_OFF_TRAILER_SEQNO 8
#define MACHMSG_OFF_TRAILER_SENDER 12
#define MACHMSG_OFF_TRAILER_AUDIT 20
#define MACHMSG_AUDIT_TOKEN_SIZE 32
#define MACHMSG_AUDIT_TRAILER_SIZE 52
#define MACHMSG_MAX_TRAILER_SIZE 68
#define MACHMSG_MACH_MSGH_BITS_COMPLEX 0x80000000u
#define MACHMSG_MACH_MSGH_BITS_REMOTE_MASK 0x1F
#define MACHMSG_MACH_MSGH_BITS_VOUCHER_MASK 0x1F0000
#define MACHMSG_MACH_MSG_TYPE_MOVE_SEND_ONCE 18
#define MACHMSG_MACH_MSG_TYPE_MAKE_SEND_ONCE 21
#define MACHMSG_MACH_MSG_TYPE_COPY_SEND 19
#define MACHMSG_MACH_MSG_TYPE_PORT_SEND_ONCE 18
#define MACHMSG_MACH_MSG_OOL_DESCRIPTOR 1
#define MACHMSG_MACH_MSG_OOL_VOLATILE_DESCRIPTOR 3
#define MACHMSG_MACH_MSG_VIRTUAL_COPY 1
#define MACHMSG_MACH_MSG_TRAILER_FORMAT_0 0
#define MACHMSG_MACH_RCV_TRAILER_AUDIT 3
#define MACHMSG_RCV_TRAILER_OPTIONS 0x03000000
#define MACHMSG_MACH_NOTIFY_NO_SENDERS 70
#define MACHMSG_MACH_NOTIFY_SEND_ONCE 71
#define MACHMSG_MACH_NOTIFY_DEAD_NAME 72
#define MACHMSG_MACH_PORT_QLIMIT_DEFAULT 5
#define MACHMSG_MACH_PORT_QLIMIT_MAX 1024
#define MACHMSG_BOOTSTRAP_NAME_MAX 127
#define MACHMSG_MACH_SEND_INVALID_DEST 0x10000003
#define MACHMSG_MACH_SEND_TIMED_OUT 0x10000004
#define MACHMSG_MACH_SEND_INTERRUPTED 0x10000007
#define MACHMSG_MACH_RCV_TIMED_OUT 0x10004003
#define MACHMSG_MACH_RCV_TOO_LARGE 0x10004004
#define MACHMSG_MACH_RCV_INTERRUPTED 0x10004005
#define MACHMSG_MACHIPC_MSGH_ID 0x6D697063

/* The message machipc sends when the payload goes out of line. */
#pragma pack(push, 4)
typedef struct {
    mach_msg_header_t header;
    mach_msg_body_t body;
    mach_msg_ool_descriptor_t ool;
} machipc_complex_prefix_t;
#pragma pack(pop)

#define MACHIPC_ASSERT(cond) _Static_assert(cond, #cond)

MACHIPC_ASSERT(sizeof(mach_msg_header_t) == MACHMSG_MSG_HEADER_SIZE);
MACHIPC_ASSERT(offsetof(mach_msg_header_t, msgh_bits) == MACHMSG_OFF_MSGH_BITS);
MACHIPC_ASSERT(offsetof(mach_msg_header_t, msgh_size) == MACHMSG_OFF_MSGH_SIZE);
MACHIPC_ASSERT(offsetof(mach_msg_header_t, msgh_remote_port) == MACHMSG_OFF_MSGH_REMOTE_PORT);
MACHIPC_ASSERT(offsetof(mach_msg_header_t, msgh_local_port) == MACHMSG_OFF_MSGH_LOCAL_PORT);
MACHIPC_ASSERT(offsetof(mach_msg_header_t, msgh_voucher_port) == MACHMSG_OFF_MSGH_VOUCHER_PORT);
MACHIPC_ASSERT(offsetof(mach_msg_header_t, msgh_id) == MACHMSG_OFF_MSGH_ID);
MACHIPC_ASSERT(sizeof(mach_msg_body_t) == MACHMSG_MSG_BODY_SIZE);
MACHIPC_ASSERT(offsetof(mach_msg_base_t, body) == MACHMSG_OFF_DESCRIPTOR_COUNT);
MACHIPC_ASSERT(sizeof(mach_msg_base_t) == MACHMSG_OFF_FIRST_DESCRIPTOR);
MACHIPC_ASSERT(offsetof(machipc_complex_prefix_t, ool) == MACHMSG_OFF_FIRST_DESCRIPTOR);
MACHIPC_ASSERT(sizeof(machipc_complex_prefix_t) == MACHMSG_COMPLEX_PREFIX_SIZE);
MACHIPC_ASSERT(sizeof(mach_msg_ool_descriptor_t) == MACHMSG_OOL_DESCRIPTOR_SIZE);
MACHIPC_ASSERT(sizeof(mach_msg_port_descriptor_t) == MACHMSG_PORT_DESCRIPTOR_SIZE);
MACHIPC_ASSERT(offsetof(mach_msg_ool_descriptor_t, address) == MACHMSG_OFF_OOL_ADDRESS);
MACHIPC_ASSERT(offsetof(mach_msg_ool_descriptor_t, size) == MACHMSG_OFF_OOL_SIZE);
MACHIPC_ASSERT(sizeof(mach_msg_type_descriptor_t) == MACHMSG_PORT_DESCRIPTOR_SIZE);
MACHIPC_ASSERT(sizeof(mach_msg_trailer_t) == 8);
MACHIPC_ASSERT(offsetof(mach_msg_audit_trailer_t, msgh_trailer_type) == MACHMSG_OFF_TRAILER_TYPE);
MACHIPC_ASSERT(offsetof(mach_msg_audit_trailer_t, msgh_trailer_size) == MACHMSG_OFF_TRAILER_SIZE);
MACHIPC_ASSERT(offsetof(mach_msg_audit_trailer_t, msgh_seqno) == MACHMSG_OFF_TRAILER_SEQNO);
MACHIPC_ASSERT(offsetof(mach_msg_audit_trailer_t, msgh_sender) == MACHMSG_OFF_TRAILER_SENDER);
MACHIPC_ASSERT(offsetof(mach_msg_audit_trailer_t, msgh_audit) == MACHMSG_OFF_TRAILER_AUDIT);
MACHIPC_ASSERT(sizeof(mach_msg_audit_trailer_t) == MACHMSG_AUDIT_TRAILER_SIZE);
MACHIPC_ASSERT(sizeof(audit_token_t) == MACHMSG_AUDIT_TOKEN_SIZE);
MACHIPC_ASSERT(sizeof(mach_msg_max_trailer_t) == MACHMSG_MAX_TRAILER_SIZE);
MACHIPC_ASSERT(MACH_MSGH_BITS_COMPLEX == MACHMSG_MACH_MSGH_BITS_COMPLEX);
MACHIPC_ASSERT(MACH_MSGH_BITS_REMOTE_MASK == MACHMSG_MACH_MSGH_BITS_REMOTE_MASK);
MACHIPC_ASSERT(MACH_MSGH_BITS_VOUCHER_MASK == MACHMSG_MACH_MSGH_BITS_VOUCHER_MASK);
MACHIPC_ASSERT(MACH_MSG_TYPE_MOVE_SEND_ONCE == MACHMSG_MACH_MSG_TYPE_MOVE_SEND_ONCE);
MACHIPC_ASSERT(MACH_MSG_TYPE_MAKE_SEND_ONCE == MACHMSG_MACH_MSG_TYPE_MAKE_SEND_ONCE);
MACHIPC_ASSERT(MACH_MSG_TYPE_COPY_SEND == MACHMSG_MACH_MSG_TYPE_COPY_SEND);
MACHIPC_ASSERT(MACH_MSG_TYPE_PORT_SEND_ONCE == MACHMSG_MACH_MSG_TYPE_PORT_SEND_ONCE);
MACHIPC_ASSERT(MACH_MSG_OOL_DESCRIPTOR == MACHMSG_MACH_MSG_OOL_DESCRIPTOR);
MACHIPC_ASSERT(MACH_MSG_OOL_VOLATILE_DESCRIPTOR == MACHMSG_MACH_MSG_OOL_VOLATILE_DESCRIPTOR);
MACHIPC_ASSERT(MACH_MSG_VIRTUAL_COPY == MACHMSG_MACH_MSG_VIRTUAL_COPY);
MACHIPC_ASSERT(MACH_MSG_TRAILER_FORMAT_0 == MACHMSG_MACH_MSG_TRAILER_FORMAT_0);
MACHIPC_ASSERT(MACH_RCV_TRAILER_AUDIT == MACHMSG_MACH_RCV_TRAILER_AUDIT);
MACHIPC_ASSERT((MACH_RCV_TRAILER_TYPE(MACH_MSG_TRAILER_FORMAT_0) |
                MACH_RCV_TRAILER_ELEMENTS(MACH_RCV_TRAILER_AUDIT)) == MACHMSG_RCV_TRAILER_OPTIONS);
MACHIPC_ASSERT(REQUESTED_TRAILER_SIZE(MACHMSG_RCV_TRAILER_OPTIONS) == MACHMSG_AUDIT_TRAILER_SIZE);
MACHIPC_ASSERT(MACH_NOTIFY_NO_SENDERS == MACHMSG_MACH_NOTIFY_NO_SENDERS);
MACHIPC_ASSERT(MACH_NOTIFY_SEND_ONCE == MACHMSG_MACH_NOTIFY_SEND_ONCE);
MACHIPC_ASSERT(MACH_NOTIFY_DEAD_NAME == MACHMSG_MACH_NOTIFY_DEAD_NAME);
MACHIPC_ASSERT(sizeof(mach_send_once_notification_t) == MACHMSG_MSG_HEADER_SIZE + sizeof(mach_msg_format_0_trailer_t));
MACHIPC_ASSERT(MACH_PORT_QLIMIT_DEFAULT == MACHMSG_MACH_PORT_QLIMIT_DEFAULT);
MACHIPC_ASSERT(MACH_PORT_QLIMIT_MAX == MACHMSG_MACH_PORT_QLIMIT_MAX);
MACHIPC_ASSERT(MACH_SEND_INVALID_DEST == MACHMSG_MACH_SEND_INVALID_DEST);
MACHIPC_ASSERT(MACH_SEND_TIMED_OUT == MACHMSG_MACH_SEND_TIMED_OUT);
MACHIPC_ASSERT(MACH_SEND_INTERRUPTED == MACHMSG_MACH_SEND_INTERRUPTED);
MACHIPC_ASSERT(MACH_RCV_TIMED_OUT == MACHMSG_MACH_RCV_TIMED_OUT);
MACHIPC_ASSERT(MACH_RCV_TOO_LARGE == MACHMSG_MACH_RCV_TOO_LARGE);
MACHIPC_ASSERT(MACH_RCV_INTERRUPTED == MACHMSG_MACH_RCV_INTERRUPTED);
MACHIPC_ASSERT(round_msg(25) == 28 && round_msg(28) == 28);

/* <servers/bootstrap.h> (not in the public SDK). name_t is char[128]. */
typedef char machipc_name_t[128];
extern mach_port_t bootstrap_port;
kern_return_t bootstrap_check_in(mach_port_t bp, const machipc_name_t service_name, mach_port_t *sp);
kern_return_t bootstrap_look_up(mach_port_t bp, const machipc_name_t service_name, mach_port_t *sp);
MACHIPC_ASSERT(sizeof(machipc_name_t) == MACHMSG_BOOTSTRAP_NAME_MAX + 1);

#endif
