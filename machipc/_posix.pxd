# C declarations for the Linux transport (sockets, ancillary data, epoll, poll).
# Only declarations live here; logic is in _unix.pyx.

cdef extern from "<sys/types.h>":
    ctypedef int pid_t
    ctypedef unsigned int uid_t
    ctypedef unsigned int gid_t
    ctypedef long ssize_t

cdef extern from "<sys/uio.h>":
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    struct ucred:
        pid_t pid
        uid_t uid
        gid_t gid

    enum:
        SOL_SOCKET
        SO_PASSCRED
        SO_PEERCRED
        SO_RCVTIMEO
        SCM_RIGHTS
        SCM_CREDENTIALS
        MSG_DONTWAIT
        MSG_PEEK
        MSG_NOSIGNAL
        MSG_TRUNC
        MSG_CTRUNC
        MSG_CMSG_CLOEXEC
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SHUT_RDWR

    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_LEN(size_t length)
    size_t CMSG_SPACE(size_t length)

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    int recvmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags, void *timeout)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int accept4(int fd, void *addr, socklen_t *addrlen, int flags)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t length)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *length)
    int shutdown(int fd, int how)

cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t:
        void *ptr
        int fd
        unsigned int u32
        unsigned long long u64

    struct epoll_event:
        unsigned int events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents

    enum:
        POLLIN
        POLLOUT

    int poll(pollfd *fds, unsigned long nfds, int timeout)

cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)

cdef extern from "<sys/syscall.h>" nogil:
    enum:
        SYS_pidfd_send_signal

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)

cdef extern from "<fcntl.h>" nogil:
    enum:
        F_DUPFD_CLOEXEC
        F_GET_SEALS
    int fcntl(int fd, int cmd, ...)
