# The fields of machipc._message.Message, for the Cython transport (machipc._unix)
# to build Messages without a Python call (the pure twin is machipc/message.py).

cdef class Message:
    cdef readonly object data
    cdef readonly object sender
    cdef readonly unsigned long long request_id
    cdef readonly object decision
    cdef public object _conn
    cdef public object _reply_timeout
    cdef public bint _answered
    cdef public object _limit

    cdef int _check_answerable(self) except -1
