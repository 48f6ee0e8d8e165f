# Declarations of the libc socket calls the hot path uses. Kept apart from
# the loop in _fdpass.pyx so the loop reads as plain code.

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EINTR
        ECONNABORTED
        EPROTO
        EPERM
        ENOSYS

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    long syscall(long number, ...)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clock, timespec *now)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/sockios.h>" nogil:
    enum:
        SIOCOUTQ

cdef extern from "<sys/uio.h>" nogil:
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

    struct sockaddr:
        pass

    enum:
        SOL_SOCKET
        SCM_RIGHTS
        MSG_DONTWAIT
        MSG_NOSIGNAL
        MSG_CTRUNC
        MSG_TRUNC
        MSG_CMSG_CLOEXEC
        SOCK_NONBLOCK
        SOCK_CLOEXEC

    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)

    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

cdef extern from "<sys/prctl.h>" nogil:
    enum:
        PR_SET_PDEATHSIG
    int prctl(int option, unsigned long arg2, unsigned long arg3,
              unsigned long arg4, unsigned long arg5)

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        unsigned int u32
        unsigned long long u64
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    enum:
        EPOLLIN
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
