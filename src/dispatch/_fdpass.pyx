# The hot path: accept connections in batches and move file descriptors
# between processes with SCM_RIGHTS. Every syscall runs without the GIL, no
# Python object is made per connection, and errors become OSError(errno).
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free

from dispatch._libc cimport (
    EAGAIN, EINTR, ECONNABORTED, EPROTO, EPERM, ENOSYS, SIOCOUTQ,
    MSG_CMSG_CLOEXEC, MSG_CTRUNC, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_TRUNC,
    PR_SET_PDEATHSIG, SCM_RIGHTS, SOCK_CLOEXEC, SOCK_NONBLOCK, SOL_SOCKET,
    CMSG_DATA, CMSG_FIRSTHDR, CMSG_LEN, CMSG_NXTHDR, CMSG_SPACE,
    accept4, close, cmsghdr, errno, ioctl, iovec, msghdr, prctl, recvmsg, sendmsg, syscall,
)

#: The kernel refuses more descriptors than this in one SCM_RIGHTS message.
SCM_MAX_FD = 253

cdef enum:
    _SCM_MAX_FD = 253
    # CMSG_SPACE(253 * sizeof(int)) is 1032 bytes; words keep it aligned.
    _CONTROL_WORDS = 160

#: Flags a caller may pass through (re-exported for the Python side).
DONTWAIT = MSG_DONTWAIT
CTRUNC = MSG_CTRUNC

# close_range(2) is syscall 436 on every architecture (Linux 5.9+).
cdef enum:
    _SYS_CLOSE_RANGE = 436
cdef bint _have_close_range = True


cdef void _close_all(const int *fds, Py_ssize_t n) noexcept nogil:
    """Close ``fds[0:n]``: one close_range(2) per run of consecutive numbers.

    accept4 hands out the lowest free numbers, so a batch is usually one run
    and costs one system call instead of one per descriptor. Only numbers in
    ``fds`` are ever closed: a run is taken only where each next number is
    exactly one more than the last.
    """
    global _have_close_range
    cdef Py_ssize_t i = 0, j
    while i < n:
        j = i
        while j + 1 < n and fds[j + 1] == fds[j] + 1:
            j += 1
        if j > i and _have_close_range:
            if syscall(_SYS_CLOSE_RANGE, <unsigned int>fds[i], <unsigned int>fds[j], 0) == 0:
                i = j + 1
                continue
            if errno == ENOSYS:
                _have_close_range = False
        while i <= j:
            close(fds[i])
            i += 1


def unread_bytes(int sock_fd):
    """Bytes sent on ``sock_fd`` that the peer has not read yet (``SIOCOUTQ``).

    On an ``AF_UNIX`` socket these stay charged to the sender until the
    receiver reads them, so a non-zero answer on a channel means the worker has
    not taken what was passed to it: it is busy, or not reading at all.
    """
    cdef int queued = 0
    if ioctl(sock_fd, SIOCOUTQ, &queued) != 0:
        raise _oserror(errno)
    return queued


cdef inline object _oserror(int err):
    import os
    return OSError(err, os.strerror(err))


def accept_batch(int listen_fd, int[::1] out, Py_ssize_t limit=-1):
    """Accept up to ``limit`` pending connections from ``listen_fd`` into ``out``.

    Each new descriptor is non-blocking and close-on-exec. Stops at EAGAIN, at
    ``limit`` (default ``len(out)``), or at the first hard error. Returns how
    many descriptors were written to ``out[0:n]``.

    A hard error (EMFILE, ENFILE, ENOBUFS, ...) raises ``OSError`` only when it
    happens on the first accept; after that the batch so far is returned and
    the error will show again on the next call. ECONNABORTED and EINTR are
    retried, because they concern one connection, not the listener.
    """
    cdef Py_ssize_t cap = out.shape[0] if limit < 0 or limit > out.shape[0] else limit
    cdef Py_ssize_t n = 0
    cdef int fd, err = 0
    with nogil:
        while n < cap:
            fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd >= 0:
                out[n] = fd
                n += 1
                continue
            err = errno
            if err == EINTR or err == ECONNABORTED or err == EPROTO or err == EPERM:
                # EPERM: a firewall rule refused this one connection.
                err = 0
                continue
            if err == EAGAIN:
                err = 0
            break
    if err and n == 0:
        raise _oserror(err)
    return n


def send_fds(int sock_fd, const int[::1] fds, Py_ssize_t start=0, Py_ssize_t count=-1,
             const unsigned char[::1] data=None, int flags=0, bint close_sent=False):
    """Send ``fds[start:start+count]`` and the bytes ``data`` in one message.

    Returns ``True`` when the message was sent and ``False`` when the socket
    would block (EAGAIN: backpressure, nothing was sent). Any other failure
    raises ``OSError``. On SOCK_SEQPACKET and SOCK_DGRAM sockets the message is
    all or nothing. With ``close_sent`` the sender's own copies are closed after
    a successful send, which is what a dispatcher wants: the receiver now owns
    them. ``data`` defaults to one zero byte, because a message with no data
    cannot carry descriptors. Pass ``flags=DONTWAIT`` to never block.
    """
    if count < 0:
        count = fds.shape[0] - start
    if start < 0 or start + count > fds.shape[0]:
        raise ValueError("start/count out of range")
    if count > _SCM_MAX_FD:
        raise ValueError(f"at most {_SCM_MAX_FD} descriptors per message, got {count}")
    cdef unsigned char zero = 0
    cdef size_t control[_CONTROL_WORDS]
    cdef msghdr msg
    cdef iovec iov
    cdef cmsghdr *cmsg
    cdef ssize_t rc
    cdef int err = 0
    memset(&msg, 0, sizeof(msg))
    if data is None or data.shape[0] == 0:
        iov.iov_base = &zero
        iov.iov_len = 1
    else:
        iov.iov_base = <void *>&data[0]
        iov.iov_len = data.shape[0]
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    if count > 0:
        msg.msg_control = control
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * count)
        cmsg = CMSG_FIRSTHDR(&msg)
        cmsg.cmsg_level = SOL_SOCKET
        cmsg.cmsg_type = SCM_RIGHTS
        cmsg.cmsg_len = CMSG_LEN(sizeof(int) * count)
        memcpy(CMSG_DATA(cmsg), &fds[start], sizeof(int) * count)
    with nogil:
        while True:
            rc = sendmsg(sock_fd, &msg, flags | MSG_NOSIGNAL)
            if rc >= 0:
                break
            err = errno
            if err != EINTR:
                break
        if rc >= 0 and close_sent and count > 0:
            _close_all(&fds[start], count)
    if rc >= 0:
        return True
    if err == EAGAIN:
        return False
    raise _oserror(err)


def recv_fds(int sock_fd, Py_ssize_t bufsize=4096, int maxfds=_SCM_MAX_FD, int flags=0):
    """Receive one message: ``(data, fds, msg_flags)``, or ``None`` on EAGAIN.

    Descriptors arrive close-on-exec. When the kernel had to drop descriptors
    (``MSG_CTRUNC``: the control buffer or RLIMIT_NOFILE was too small) every
    descriptor that did arrive is closed and ``fds`` is empty, so a truncated
    batch never leaks; ``msg_flags & CTRUNC`` tells the caller to count it.
    At end of stream ``data`` is ``b""``.
    """
    if maxfds < 0 or maxfds > _SCM_MAX_FD:
        raise ValueError(f"maxfds must be within 0..{_SCM_MAX_FD}")
    if bufsize <= 0:
        raise ValueError("bufsize must be positive")
    cdef size_t control[_CONTROL_WORDS]
    cdef msghdr msg
    cdef iovec iov
    cdef cmsghdr *cmsg
    cdef ssize_t rc
    cdef int err = 0
    cdef int nfds = 0
    cdef int i
    cdef int *got
    cdef int received[_SCM_MAX_FD]
    buf = bytearray(bufsize)
    cdef unsigned char[::1] view = buf
    memset(&msg, 0, sizeof(msg))
    iov.iov_base = <void *>&view[0]
    iov.iov_len = bufsize
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    msg.msg_control = control
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * maxfds) if maxfds > 0 else 0
    with nogil:
        while True:
            rc = recvmsg(sock_fd, &msg, flags | MSG_CMSG_CLOEXEC)
            if rc >= 0:
                break
            err = errno
            if err != EINTR:
                break
        if rc >= 0 and msg.msg_controllen > 0:
            cmsg = CMSG_FIRSTHDR(&msg)
            while cmsg != NULL:
                if cmsg.cmsg_level == SOL_SOCKET and cmsg.cmsg_type == SCM_RIGHTS:
                    got = <int *>CMSG_DATA(cmsg)
                    for i in range(<int>((cmsg.cmsg_len - CMSG_LEN(0)) // sizeof(int))):
                        if nfds < _SCM_MAX_FD:
                            received[nfds] = got[i]
                            nfds += 1
                        else:
                            close(got[i])
                cmsg = CMSG_NXTHDR(&msg, cmsg)
        if rc >= 0 and (msg.msg_flags & MSG_CTRUNC):
            for i in range(nfds):
                close(received[i])
            nfds = 0
    if rc < 0:
        if err == EAGAIN:
            return None
        raise _oserror(err)
    return bytes(view[:rc]), [received[i] for i in range(nfds)], msg.msg_flags


def close_fds(const int[::1] fds, Py_ssize_t start=0, Py_ssize_t count=-1):
    """Close ``fds[start:start+count]`` without the GIL, ignoring errors."""
    if count < 0:
        count = fds.shape[0] - start
    if start < 0 or start + count > fds.shape[0]:
        raise ValueError("start/count out of range")
    if count == 0:
        return
    with nogil:
        _close_all(&fds[start], count)


def set_parent_death_signal(int signum):
    """Ask the kernel to send ``signum`` to this process when its parent dies."""
    if prctl(PR_SET_PDEATHSIG, <unsigned long>signum, 0, 0, 0) != 0:
        raise _oserror(errno)
