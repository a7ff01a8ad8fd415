# The wire-format constants for the Cython transport. They mirror machipc/wire.py,
# which documents them; tests/test_wire.py checks that both agree.

cdef enum:
    WIRE_MAGIC = 0x696D
    WIRE_VERSION = 2
    VERSION_ERROR_VERSION = 1
    HEADER_SIZE = 24
    INLINE_MAX = 65536
    PACKET_MAX = HEADER_SIZE + INLINE_MAX

    KIND_MESSAGE = 1
    KIND_REQUEST = 2
    KIND_REPLY = 3
    KIND_ERROR = 4
    KIND_HELLO = 5
    FLAG_PAYLOAD_FD = 1
    FLAG_ARENA = 2
    KNOWN_FLAGS = 3
    ARENA_REF_SIZE = 24

    DROP_OK = 0
    DROP_CLOSED = 1
    DROP_SHORT = 2
    DROP_BAD_MAGIC = 3
    DROP_BAD_VERSION = 4
    DROP_BAD_KIND = 5
    DROP_BAD_FLAGS = 6
    DROP_BAD_LENGTH = 7
    DROP_TRUNCATED = 8
    DROP_NO_CREDENTIALS = 9
    DROP_UNEXPECTED_FDS = 10
    DROP_CTRUNC = 11
    DROP_BAD_REQUEST_ID = 12
    DROP_BAD_PAYLOAD_FD = 13
    DROP_OVERSIZE = 14
    DROP_BAD_ARENA = 15

    SO_PASSPIDFD = 76
    SO_PEERPIDFD = 77
    SCM_PIDFD = 4
    SAME_PEER = -2
