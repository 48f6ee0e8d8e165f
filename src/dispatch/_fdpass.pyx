# The hot path: accept connections in batches and move file descriptors
# between processes with SCM_RIGHTS. Every syscall runs without the GIL, no
# Python object is made per connection, and errors become OSError(errno).
from libc.string cimport memcmp, memcpy, memset
from libc.stdlib cimport malloc, free, realloc
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE

from dispatch._libc cimport (
    EAGAIN, EINTR, ECONNABORTED, EPROTO, EPERM, ENOSYS, SIOCOUTQ,
    MSG_CMSG_CLOEXEC, MSG_CTRUNC, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_TRUNC,
    PR_SET_PDEATHSIG, SCM_RIGHTS, SOCK_CLOEXEC, SOCK_NONBLOCK, SOL_SOCKET,
    CMSG_DATA, CMSG_FIRSTHDR, CMSG_LEN, CMSG_NXTHDR, CMSG_SPACE,
    accept4, clock_gettime, close, cmsghdr, errno, ioctl, iovec, msghdr, prctl, recv, recvmsg, sendmsg,
    syscall, timespec, CLOCK_MONOTONIC, EPOLLIN, epoll_event, epoll_wait,
)

#: The kernel refuses more descriptors than this in one SCM_RIGHTS message.
SCM_MAX_FD = 253

cdef enum:
    _SCM_MAX_FD = 253
    # CMSG_SPACE(253 * sizeof(int)) is 1032 bytes; words keep it aligned.
    _CONTROL_WORDS = 160
    # Events taken from one epoll_wait by Passer.run (as the reactor takes them).
    _RUN_EVENTS = 64

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
    cdef int err = 0
    if cap > 0:
        with nogil:
            n = _accept_into(listen_fd, &out[0], cap, &err)
    if err and n == 0:
        raise _oserror(err)
    return n


cdef Py_ssize_t _accept_into(int listen_fd, int *out, Py_ssize_t cap, int *error) noexcept nogil:
    """accept_batch's loop: up to ``cap`` descriptors into ``out``; a hard error in ``error``."""
    cdef Py_ssize_t n = 0
    cdef int fd, err = 0
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
    error[0] = err
    return n


def send_fds(int sock_fd, const int[::1] fds, Py_ssize_t start=0, Py_ssize_t count=-1,
             object data=None, int flags=0, bint close_sent=False):
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
    cdef iovec iov
    cdef int err = 0
    cdef const unsigned char[::1] view
    iov.iov_base = &zero
    iov.iov_len = 1
    if data is not None:
        if PyBytes_CheckExact(data):  # the hot path's cached messages: no buffer to acquire
            if PyBytes_GET_SIZE(data) > 0:
                iov.iov_base = PyBytes_AS_STRING(data)
                iov.iov_len = PyBytes_GET_SIZE(data)
        else:
            view = data
            if view.shape[0] > 0:
                iov.iov_base = <void *>&view[0]
                iov.iov_len = view.shape[0]
    cdef const int *first = &fds[start] if count > 0 else NULL
    with nogil:
        err = _send_message(sock_fd, first, count, iov.iov_base, iov.iov_len, flags, close_sent)
    if err == 0:
        return True
    if err == EAGAIN:
        return False
    raise _oserror(err)


cdef int _send_message(int sock_fd, const int *fds, Py_ssize_t count, void *data, size_t size,
                       int flags, bint close_sent) noexcept nogil:
    """One sendmsg of ``data`` with ``fds[0:count]`` attached (retried on EINTR).
    Returns 0 or the errno; with ``close_sent`` our copies are closed once sent."""
    cdef size_t control[_CONTROL_WORDS]
    cdef msghdr msg
    cdef iovec iov
    cdef cmsghdr *cmsg
    cdef ssize_t rc
    memset(&msg, 0, sizeof(msg))
    iov.iov_base = data
    iov.iov_len = size
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    if count > 0:
        msg.msg_control = control
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * count)
        cmsg = CMSG_FIRSTHDR(&msg)
        cmsg.cmsg_level = SOL_SOCKET
        cmsg.cmsg_type = SCM_RIGHTS
        cmsg.cmsg_len = CMSG_LEN(sizeof(int) * count)
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * count)
    while True:
        rc = sendmsg(sock_fd, &msg, flags | MSG_NOSIGNAL)
        if rc >= 0:
            break
        if errno != EINTR:
            return errno
    if close_sent and count > 0:
        _close_all(fds, count)
    return 0


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


def recv_message(int sock_fd):
    """One message of at most 64 bytes from a channel, without waiting: its bytes,
    ``b""`` at end of stream, or ``None`` when nothing waits (no exception for that:
    the primary asks once more than there are messages on every pass)."""
    cdef char buf[64]
    cdef ssize_t rc
    cdef int err = 0
    while True:
        rc = recv(sock_fd, buf, sizeof(buf), MSG_DONTWAIT)
        if rc >= 0:
            break
        err = errno
        if err != EINTR:
            break
    if rc >= 0:
        return buf[:rc]
    if err == EAGAIN:
        return None
    raise _oserror(err)


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


# ------------------------------------------------------------------ the dispatch loop
cdef enum:
    _ROUND_ROBIN = 0
    _LEAST_CONNECTIONS = 1
    _PASSED = 0
    _CHANNEL_FULL = 1
    _SEND_FAILED = 2
    _OUT_OF_CREDIT = 3

#: Policies the Passer runs itself (the others stay in Python).
ROUND_ROBIN = _ROUND_ROBIN
LEAST_CONNECTIONS = _LEAST_CONNECTIONS

#: What stopped ``Passer.pass_batch`` before the whole batch was passed.
PASSED = _PASSED  # nothing: all of it went
CHANNEL_FULL = _CHANNEL_FULL  # ``slot``'s channel said EAGAIN
SEND_FAILED = _SEND_FAILED  # sendmsg to ``slot`` failed with ``error``
OUT_OF_CREDIT = _OUT_OF_CREDIT  # some target has no credit left: rebuild the targets and go on


cdef class Passer:
    """The dispatcher's targets as C arrays, and the loop that splits an accepted batch
    over them and sends it: which workers are reading (``SIOCOUTQ``), each one's share
    (round-robin, or least-connections poured like water), credits, one message per
    chunk. Nothing in Python per connection or per target on this path.

    The dispatcher loads the targets after every change (``set_targets``), reports
    completions (``done``), and after each ``run`` (or a single ``accept_and_pass`` or
    ``pass_batch``, counted as a run of one pass) reads what each slot was given, passed
    over for and seen reading (``run_given``, ``run_skips``, ``run_seen``). The
    policies are ``balance.RoundRobin`` and ``balance.LeastConnections`` to the letter,
    rotation included; any other policy does not use a Passer.
    """

    cdef Py_ssize_t n, size
    cdef int *fd
    cdef long long *load  # sent - done, as the dispatcher counts them
    cdef long long *cap  # the most it may hold; 0: no limit
    cdef long long *max_batch
    cdef long long *progress  # stamp of its last Done: higher is more recent
    cdef long long *given_
    cdef char *unread_  # had unread messages when the last pass looked
    cdef char *passed_over  # ... and was not a candidate of the last pass for it
    cdef long long *sent_at  # ns: the first send since it was last seen with nothing unread; 0: none
    cdef Py_ssize_t *cand
    cdef long long *share
    cdef Py_ssize_t *order
    # What a run (``run``) did to each target over all its passes.
    cdef long long *run_given_
    cdef long long *run_skips_
    cdef char *run_cleared_  # a look saw it reading (nothing unread)
    cdef long long *run_stamp_  # ns: its first send since the last such look (or the run's start); 0: none
    cdef readonly Py_ssize_t accepted  # of the last pass of a run
    cdef readonly Py_ssize_t run_passes, run_passed, run_freed
    cdef long long *run_done_  # connections it reported done, read in the run
    cdef char *run_heard_  # sent a Done in the run (even one that credited nothing)
    cdef readonly bint heard_any  # some target did
    cdef readonly int run_error  # errno of a run's accept that took nothing: the run ended there
    cdef readonly int wait_error  # errno of a run's epoll_wait that failed (not EINTR): the run ended there
    cdef readonly long long stamp  # the progress stamp of the last Done read in a run
    cdef readonly long long all_behind  # ns: a run's last look at a watch deadline found every target behind
    cdef readonly long long watch_due  # ns: when the last run would have looked next (0: none)
    cdef readonly list strays  # (fd, message): what a run read from a channel that was not a Done
    cdef char done_prefix[8]
    cdef Py_ssize_t done_size  # 0: a run leaves the channels to the caller
    cdef readonly bint unsettled  # the run's last pass left something to its caller
    cdef list messages  # kept alive: message_data points into them
    cdef const char *message_data[_SCM_MAX_FD + 1]
    cdef size_t message_size[_SCM_MAX_FD + 1]
    cdef int[::1] accepted_  # the dispatcher's accept buffer (accept_and_pass)
    cdef readonly Py_ssize_t passed  # of the last accept_and_pass
    cdef readonly int policy
    cdef public Py_ssize_t cursor
    cdef public long long one_per_message_below
    cdef public long long fresh_ns  # unread younger than this is not yet a sign of a blocked loop
    cdef readonly int status, slot, error
    cdef readonly bint any_skipped
    cdef readonly bint looked  # the last pass read every target's unread bytes
    cdef int fail_count, fail_errno  # fault injection for tests (fail_sends)

    def __cinit__(self, int policy, list messages, int[::1] accept_buffer,
                  long long one_per_message_below=0, long long fresh_ns=0):
        if policy != _ROUND_ROBIN and policy != _LEAST_CONNECTIONS:
            raise ValueError(f"unknown policy {policy}")
        if len(messages) != _SCM_MAX_FD + 1 or not all(PyBytes_CheckExact(m) and len(m) for m in messages):
            raise ValueError(f"messages: {_SCM_MAX_FD + 1} non-empty bytes, one per descriptor count")
        if accept_buffer.shape[0] < 1:
            raise ValueError("accept_buffer: room for at least one descriptor")
        self.policy = policy
        self.messages = messages
        for i in range(_SCM_MAX_FD + 1):
            self.message_data[i] = PyBytes_AS_STRING(messages[i])
            self.message_size[i] = PyBytes_GET_SIZE(messages[i])
        self.accepted_ = accept_buffer
        self.one_per_message_below = one_per_message_below
        self.fresh_ns = fresh_ns
        self.n = self.size = 0
        self.strays = []
        self._grow(4)

    def __dealloc__(self):
        free(self.fd)
        free(self.load)
        free(self.cap)
        free(self.max_batch)
        free(self.progress)
        free(self.given_)
        free(self.unread_)
        free(self.passed_over)
        free(self.sent_at)
        free(self.cand)
        free(self.share)
        free(self.order)
        free(self.run_given_)
        free(self.run_skips_)
        free(self.run_cleared_)
        free(self.run_stamp_)
        free(self.run_done_)
        free(self.run_heard_)

    cdef void _grow(self, Py_ssize_t size) except *:
        self.fd = <int *>_resized(self.fd, size * sizeof(int))
        self.load = <long long *>_resized(self.load, size * sizeof(long long))
        self.cap = <long long *>_resized(self.cap, size * sizeof(long long))
        self.max_batch = <long long *>_resized(self.max_batch, size * sizeof(long long))
        self.progress = <long long *>_resized(self.progress, size * sizeof(long long))
        self.given_ = <long long *>_resized(self.given_, size * sizeof(long long))
        self.unread_ = <char *>_resized(self.unread_, size * sizeof(char))
        self.passed_over = <char *>_resized(self.passed_over, size * sizeof(char))
        self.sent_at = <long long *>_resized(self.sent_at, size * sizeof(long long))
        self.cand = <Py_ssize_t *>_resized(self.cand, size * sizeof(Py_ssize_t))
        self.share = <long long *>_resized(self.share, size * sizeof(long long))
        self.order = <Py_ssize_t *>_resized(self.order, size * sizeof(Py_ssize_t))
        self.run_given_ = <long long *>_resized(self.run_given_, size * sizeof(long long))
        self.run_skips_ = <long long *>_resized(self.run_skips_, size * sizeof(long long))
        self.run_cleared_ = <char *>_resized(self.run_cleared_, size * sizeof(char))
        self.run_stamp_ = <long long *>_resized(self.run_stamp_, size * sizeof(long long))
        self.run_done_ = <long long *>_resized(self.run_done_, size * sizeof(long long))
        self.run_heard_ = <char *>_resized(self.run_heard_, size * sizeof(char))
        self.size = size

    def set_targets(self, fds, loads, caps, max_batches, progress):
        """The targets, in the dispatcher's order (slot i is ``targets[i]``)."""
        cdef Py_ssize_t n = len(fds), i
        if not (len(loads) == len(caps) == len(max_batches) == len(progress) == n):
            raise ValueError("one value per target in every list")
        if n > self.size:
            self._grow(n)
        # A worker's send time follows it to its new slot (a rebuild that drops one shifts
        # the others); a new target's is unknown (0: what it holds unread counts as behind).
        cdef list sent_at = [self._sent_at_of(fd, i) for i, fd in enumerate(fds)]
        for i in range(n):
            self.sent_at[i] = sent_at[i]
            self.fd[i] = fds[i]
            self.load[i] = loads[i]
            self.cap[i] = caps[i]
            self.max_batch[i] = max(1, min(<long long>max_batches[i], _SCM_MAX_FD))
            self.progress[i] = progress[i]
            self.given_[i] = 0
            self.unread_[i] = 0
            self.passed_over[i] = 0
            self.run_given_[i] = self.run_skips_[i] = self.run_stamp_[i] = self.run_done_[i] = 0
            self.run_cleared_[i] = self.run_heard_[i] = 0
        self.n = n

    cdef long long _sent_at_of(self, int fd, Py_ssize_t near) noexcept:
        """The send time of the current target with descriptor ``fd`` (0: none), looked for
        from slot ``near`` on: it is there or one further after a usual rebuild."""
        cdef Py_ssize_t k, j
        for k in range(self.n):
            j = (near + k) % self.n
            if self.fd[j] == fd:
                return self.sent_at[j]
        return 0

    def read_done(self, bytes prefix):
        """Let ``run`` read the targets' channels itself: a message of ``prefix`` and a
        32-bit big-endian count is a Done, credited in C (``run_done``); any other message
        ends that channel's turn and goes to ``strays``."""
        if not 0 < len(prefix) <= 8:
            raise ValueError("a Done prefix of 1 to 8 bytes")
        memcpy(self.done_prefix, <const char *>prefix, len(prefix))
        self.done_size = len(prefix) + 4

    def done(self, Py_ssize_t slot, long long count, long long stamp):
        """Target ``slot`` reported ``count`` connections done (progress ``stamp``)."""
        if 0 <= slot < self.n:
            self.load[slot] -= count
            self.progress[slot] = stamp

    def given(self, Py_ssize_t slot):
        """Connections the last ``pass_batch`` sent to ``slot``."""
        return self.given_[slot] if 0 <= slot < self.n else 0

    def fail_sends(self, int count, int err):
        """Tests: the next ``count`` sends fail with ``err`` and send nothing (some errors,
        like ETOOMANYREFS, cannot be produced for real by a privileged process)."""
        self.fail_count = count
        self.fail_errno = err

    def unread(self, Py_ssize_t slot):
        """True if ``slot`` had unread messages when the last pass looked (``looked``)."""
        return bool(self.unread_[slot]) if 0 <= slot < self.n else False

    def skipped(self, Py_ssize_t slot):
        """True if the last pass passed ``slot`` over: it had left unread what was sent to
        it ``fresh_ns`` or more ago while another target was reading (``any_skipped``)."""
        return self.any_skipped and 0 <= slot < self.n and bool(self.passed_over[slot])

    def accept_and_pass(self, int listen_fd, Py_ssize_t limit, Py_ssize_t room, bint skip_busy,
                        long long reclaim_ns=0):
        """Accept up to ``limit`` connections into the accept buffer, as ``accept_batch``
        does (an error on the first accept raises ``OSError``), and pass up to ``room`` of
        them as ``pass_batch`` does. Returns how many were accepted; ``passed`` says how
        many of them went (``buffer[0:passed]``), the rest are the caller's. Counted as a
        run of one pass (``run_given``, ``run_skips``, ``run_seen``)."""
        cdef Py_ssize_t cap = self.accepted_.shape[0] if limit > self.accepted_.shape[0] else limit
        cdef Py_ssize_t n = 0
        cdef int err = 0
        cdef int *fds = &self.accepted_[0]
        cdef Py_ssize_t passed = 0
        cdef long long watch_due = 0
        self._begin_run()
        self._reset()
        if cap > 0:
            with nogil:  # accepting and passing, all in one go without the GIL
                n = _accept_into(listen_fd, fds, cap, &err)
                if n and room > 0:
                    passed = self._pass(fds, n if n <= room else room, skip_busy)
                    self._count_pass(passed, reclaim_ns, &watch_due)
        self.passed = passed
        if err and n == 0:
            raise _oserror(err)
        return n

    def run(self, int epfd, const int[::1] listen_fds, double timeout, Py_ssize_t room,
            Py_ssize_t limit, bint skip_busy, long long reclaim_ns=0, long long stamp=0,
            long long watch_due=0):
        """Wait on the epoll ``epfd`` and, for each readable listener of ``listen_fds``,
        accept and pass as ``accept_and_pass`` does, pass after pass without coming back
        to Python. Returns, as ``select.epoll.poll`` would, the ready descriptors that are
        not those listeners, as soon as there are any; or ``[]`` once ``timeout`` seconds
        passed (negative: no limit), a signal interrupted the wait, ``room`` was spent, or a
        pass ended short; if the wait itself failed, ``wait_error`` says why (the passes
        before it are counted all the same). Then ``unsettled`` says the last pass left something to the
        caller: its ``status``, and ``buffer[passed:accepted]`` not passed; ``run_error``
        that its accept failed and took nothing. What each target was given, passed over
        for and seen reading over the whole run: ``run_given``, ``run_skips``, ``run_seen``.
        With ``reclaim_ns``, the caller watches unread channels (reclaim): at ``watch_due``
        (ns, 0: none) and ``reclaim_ns`` after a target's first send since it was last seen
        reading (``run_seen``), the run ends if some target has read everything, so the
        caller can look in time; while every target is behind, nothing could be taken back
        (that is load): the run goes on and looks again ``reclaim_ns`` later
        (``all_behind``: when it last found so; ``watch_due``: when it would look next).
        With ``read_done``, a target's channel that is readable is read here too: its Done
        messages credited (``run_done``; each pass that read some stamps the target's
        progress with the next of ``stamp``, the last one in ``stamp``), anything else left
        in ``strays`` and its event returned."""
        cdef epoll_event events[_RUN_EVENTS]
        cdef Py_ssize_t cap = self.accepted_.shape[0] if limit > self.accepted_.shape[0] else limit
        cdef Py_ssize_t nl = listen_fds.shape[0], i, j, k, n, passed
        cdef const int *listeners = &listen_fds[0] if nl else NULL
        cdef int *fds = &self.accepted_[0]
        cdef int ready, wait_ms, err = 0, fd
        cdef long long now = _now_ns(), deadline = -1, wake
        cdef bint ended = False
        cdef list others = []
        cdef Py_ssize_t slot, freed
        self.strays = []
        self.stamp = stamp
        if timeout >= 0:
            deadline = now + <long long>(timeout * 1e9)
        self._begin_run()
        self._reset()
        if cap <= 0 or self.n == 0:
            room = 0  # nothing to pass to: listeners go back to the caller like the rest
        while True:
            wake = deadline
            if watch_due and (wake < 0 or watch_due < wake):
                wake = watch_due
            if wake < 0:
                wait_ms = -1
            elif wake <= now:
                wait_ms = 0
            else:  # rounded up, as select.epoll.poll does: never wake before the deadline
                wait_ms = <int>((wake - now + 999999) // 1000000)
            with nogil:
                ready = epoll_wait(epfd, events, _RUN_EVENTS, wait_ms)
                if ready < 0:
                    err = errno
            if ready < 0:
                if err != EINTR:  # EINTR: the caller's loop runs the signal handlers
                    self.wait_error = err  # raised by the caller once it has credited the run
                break
            for k in range(ready):
                fd = events[k].data.fd
                if not ended and self.done_size and events[k].events == EPOLLIN:
                    slot = self._slot_of(fd)
                    if slot >= 0:
                        freed = self.run_freed
                        if not self._read_channel(slot):
                            others.append((fd, events[k].events))
                        room += self.run_freed - freed
                        continue
                if ended or not events[k].events & EPOLLIN or not _listed(fd, listeners, nl) or room <= 0:
                    others.append((fd, events[k].events))
                    continue
                with nogil:
                    n = _accept_into(fd, fds, cap, &err)
                    passed = 0
                    if n:
                        self._reset()
                        passed = self._pass(fds, n if n <= room else room, skip_busy)
                        self._count_pass(passed, reclaim_ns, &watch_due)
                if n == 0:
                    if err:  # nothing taken: the caller backs off
                        self.run_error = err
                        ended = True
                    continue
                self.accepted = n
                self.passed = passed
                room -= passed
                if passed < n or self.status != _PASSED:
                    self.unsettled = True
                    ended = True
            if others or ended or room <= 0:
                break
            now = _now_ns()
            if watch_due and now >= watch_due:
                if not reclaim_ns or self._someone_reads():
                    break
                self.all_behind = now
                watch_due = now + reclaim_ns
            if deadline >= 0 and now >= deadline:
                break
        self.watch_due = watch_due
        return others

    cdef bint _someone_reads(self) noexcept nogil:
        """Some target has nothing unread in its channel."""
        cdef Py_ssize_t i
        cdef int queued
        for i in range(self.n):
            queued = 0
            if ioctl(self.fd[i], SIOCOUTQ, &queued) != 0 or queued <= 0:
                return True
        return False

    cdef Py_ssize_t _slot_of(self, int fd) noexcept:
        cdef Py_ssize_t i
        for i in range(self.n):
            if self.fd[i] == fd:
                return i
        return -1

    cdef bint _read_channel(self, Py_ssize_t slot) except *:
        """Read ``slot``'s channel as the primary's channel callback does: Done messages
        credited; True when it said EAGAIN with nothing else read (the caller need not see it)."""
        cdef char buf[64]
        cdef ssize_t rc
        cdef int err
        cdef long long count, got = 0
        cdef const unsigned char *body
        cdef Py_ssize_t m
        cdef bint handled = True
        for m in range(64):  # as many as the callback reads in one pass; the rest waits
            with nogil:
                rc = recv(self.fd[slot], buf, sizeof(buf), MSG_DONTWAIT)
                err = errno if rc < 0 else 0
            if rc < 0 and err == EINTR:
                continue
            if rc < 0 and err == EAGAIN:
                break
            if rc <= 0:  # end of stream or an error: the callback (and the pidfd) will tell
                handled = False
                break
            if rc == self.done_size and memcmp(buf, self.done_prefix, rc - 4) == 0:
                self.run_heard_[slot] = 1  # alive, whatever it counts
                self.heard_any = True
                body = <const unsigned char *>buf + rc - 4
                count = (<long long>body[0] << 24) | (body[1] << 16) | (body[2] << 8) | body[3]
                if count > self.load[slot]:
                    count = self.load[slot]  # never more than was sent: a lying worker skews nothing
                if count > 0:
                    self.load[slot] -= count
                    self.run_done_[slot] += count
                    got += count
                continue
            self.strays.append((self.fd[slot], buf[:rc]))
            handled = False
            break
        if got:
            self.stamp += 1
            self.progress[slot] = self.stamp
            self.run_freed += got
        return handled

    def progress_of(self, Py_ssize_t slot):
        """The progress stamp of ``slot``'s last Done (``done``, or read by ``run``)."""
        return self.progress[slot] if 0 <= slot < self.n else 0

    def run_done(self, Py_ssize_t slot):
        """Connections ``slot`` reported done in the last ``run`` (Done messages read there)."""
        return self.run_done_[slot] if 0 <= slot < self.n else 0

    def run_heard(self, Py_ssize_t slot):
        """True if the last ``run`` read a Done from ``slot``, even one that credited nothing."""
        return bool(self.run_heard_[slot]) if 0 <= slot < self.n else False

    def run_given(self, Py_ssize_t slot):
        """Connections the last ``run`` sent to ``slot``, over all its passes."""
        return self.run_given_[slot] if 0 <= slot < self.n else 0

    def run_skips(self, Py_ssize_t slot):
        """Passes of the last ``run`` that passed ``slot`` over as busy."""
        return self.run_skips_[slot] if 0 <= slot < self.n else 0

    def run_seen(self, Py_ssize_t slot):
        """What the last ``run`` knows of ``slot``'s reading: ``(seen, first_send_ns)``.
        ``seen``: some pass saw it with nothing unread; ``first_send_ns``: its first send
        after the last such look (or, if none, in the run), only with ``reclaim_ns``; 0: none."""
        if not 0 <= slot < self.n:
            return False, 0
        return bool(self.run_cleared_[slot]), self.run_stamp_[slot]

    def pass_batch(self, int[::1] buf, Py_ssize_t start, Py_ssize_t count, bint skip_busy,
                   long long reclaim_ns=0):
        """Send ``buf[start:start+count]`` to the targets; returns how many went: always
        ``buf[start:start+passed]``, sends take from the front. ``status`` says what
        stopped it short, or that a target spent its last credit. Counted as a run of one
        pass (``run_given``, ``run_skips``, ``run_seen``)."""
        if start < 0 or count < 0 or start + count > buf.shape[0]:
            raise ValueError("start/count out of range")
        self._begin_run()
        self._reset()
        if count == 0:
            return 0
        cdef int *fds = &buf[start]
        cdef Py_ssize_t passed
        cdef long long watch_due = 0
        with nogil:
            passed = self._pass(fds, count, skip_busy)
            self._count_pass(passed, reclaim_ns, &watch_due)
        return passed

    cdef void _begin_run(self) noexcept:
        """Nothing counted yet: what a run (or a single pass) reports starts here."""
        cdef Py_ssize_t i
        self.run_passes = self.run_passed = self.run_freed = self.accepted = self.passed = 0
        self.run_error = self.wait_error = 0
        self.all_behind = 0
        self.heard_any = False
        self.unsettled = False
        for i in range(self.n):
            self.run_given_[i] = self.run_skips_[i] = self.run_stamp_[i] = self.run_done_[i] = 0
            self.run_cleared_[i] = self.run_heard_[i] = 0

    cdef void _count_pass(self, Py_ssize_t passed, long long reclaim_ns, long long *watch_due) noexcept nogil:
        """Add the last pass to the run: what each target was given, passed over for and
        seen reading; with ``reclaim_ns``, when a target's watch starts (``watch_due``: the
        earliest look it asks for)."""
        cdef Py_ssize_t i
        cdef long long pass_ns = _now_ns() if reclaim_ns else 0
        self.run_passes += 1
        self.run_passed += passed
        for i in range(self.n):
            if self.any_skipped and self.passed_over[i]:
                self.run_skips_[i] += 1
            if self.looked and not self.unread_[i]:
                self.run_cleared_[i] = 1
                self.run_stamp_[i] = 0
            if self.given_[i]:
                self.run_given_[i] += self.given_[i]
                if pass_ns and not self.run_stamp_[i]:
                    self.run_stamp_[i] = pass_ns
                    if not watch_due[0] or pass_ns + reclaim_ns < watch_due[0]:
                        watch_due[0] = pass_ns + reclaim_ns

    cdef void _reset(self) noexcept nogil:
        cdef Py_ssize_t i
        self.status = _PASSED
        self.slot = -1
        self.error = 0
        self.any_skipped = False
        self.looked = False
        for i in range(self.n):
            self.given_[i] = 0
            self.unread_[i] = 0
            self.passed_over[i] = 0

    cdef Py_ssize_t _pass(self, int *fds, Py_ssize_t count, bint skip_busy) noexcept nogil:
        cdef Py_ssize_t n = self.n, m = 0, i, j, passed = 0
        cdef int queued
        cdef long long share, free_, limit, chunk, now = 0
        cdef bint credit_spent = False
        cdef int err
        cdef timespec clock
        if n == 0 or count == 0:
            return 0
        # Who is reading: a worker with unread messages while another has none is passed over.
        # When every target is behind, that is load, not one blocked loop: all stay candidates.
        # What was sent less than fresh_ns ago has not had its chance to be read (the worker
        # may just be waking up): that worker still counts as reading.
        if skip_busy and self.fresh_ns and clock_gettime(CLOCK_MONOTONIC, &clock) == 0:
            now = clock.tv_sec * 1000000000LL + clock.tv_nsec
        if skip_busy and n > 1:
            self.looked = True
            for i in range(n):
                queued = 0
                if ioctl(self.fd[i], SIOCOUTQ, &queued) != 0:
                    queued = 0  # cannot tell: a reader; a broken channel shows on send
                if queued <= 0:
                    self.sent_at[i] = 0
                else:
                    self.unread_[i] = 1
                    if not (now and self.sent_at[i] and now - self.sent_at[i] < self.fresh_ns):
                        self.passed_over[i] = 1
                        continue
                self.cand[m] = i
                m += 1
            self.any_skipped = 0 < m < n
        if not self.any_skipped:
            for i in range(n):
                self.cand[i] = i
            m = n
        if self.policy == _ROUND_ROBIN:
            self._round_robin(count, m)
        else:
            self._least_connections(count, m)
        for j in range(m):
            i = self.cand[j]
            share = self.share[j]
            if share <= 0:
                continue
            if self.cap[i]:
                free_ = self.cap[i] - self.load[i]
                if share >= free_:
                    share = free_ if free_ > 0 else 0
                    credit_spent = True
            while share > 0:
                # A worker holding little takes one per message (one per loop pass).
                if self.one_per_message_below and self.load[i] < self.one_per_message_below:
                    limit = 1
                else:
                    limit = self.max_batch[i]
                chunk = share if share <= limit else limit
                if self.fail_count > 0:
                    self.fail_count -= 1
                    err = self.fail_errno
                else:
                    err = _send_message(self.fd[i], fds + passed, chunk, <void *>self.message_data[chunk],
                                        self.message_size[chunk], MSG_DONTWAIT, True)
                if err:
                    self.status = _CHANNEL_FULL if err == EAGAIN else _SEND_FAILED
                    self.slot = <int>i
                    self.error = err
                    return passed
                self.load[i] += chunk
                self.given_[i] += chunk
                if now and (not self.sent_at[i] or not self.looked):
                    # Without a look this pass we cannot tell whether it had read the last
                    # ones: the newest send stands for them (a look sets it right again).
                    self.sent_at[i] = now
                passed += chunk
                share -= chunk
        if credit_spent:
            self.status = _OUT_OF_CREDIT  # even if all went: that target must leave the targets
        return passed

    cdef void _round_robin(self, Py_ssize_t count, Py_ssize_t m) noexcept nogil:
        cdef Py_ssize_t share = count // m, extra = count % m, first = self.cursor % m, i
        for i in range(m):
            self.share[i] = share
        for i in range(extra):
            self.share[(first + i) % m] += 1
        self.cursor = first + extra

    cdef void _least_connections(self, Py_ssize_t count, Py_ssize_t m) noexcept nogil:
        cdef Py_ssize_t first = self.cursor % m, i, j, k, filled, rank
        cdef long long remaining = count, level, room, step, each, extra
        self.cursor = first + 1
        # Order the candidates by (load, busy ones by recent progress, rotation from first).
        for i in range(m):
            self.order[i] = i
            self.share[i] = 0
        for i in range(1, m):
            k = self.order[i]
            j = i - 1
            while j >= 0 and self._before(k, self.order[j], first, m):
                self.order[j + 1] = self.order[j]
                j -= 1
            self.order[j + 1] = k
        level = self.load[self.cand[self.order[0]]]
        filled = 1
        while remaining:
            while filled < m and self.load[self.cand[self.order[filled]]] <= level:
                filled += 1
            if filled == m:
                room = remaining
            else:
                room = (self.load[self.cand[self.order[filled]]] - level) * filled
            if room >= remaining:
                each = remaining // filled
                extra = remaining % filled
                for rank in range(filled):
                    self.share[self.order[rank]] += each + (1 if rank < extra else 0)
                break
            step = self.load[self.cand[self.order[filled]]] - level
            for rank in range(filled):
                self.share[self.order[rank]] += step
            remaining -= room
            level += step

    cdef bint _before(self, Py_ssize_t a, Py_ssize_t b, Py_ssize_t first, Py_ssize_t m) noexcept nogil:
        """Candidate ``a`` goes before ``b``: fewer held; between busy equals, the one that
        finished a connection last; then the rotation."""
        cdef long long load_a = self.load[self.cand[a]], load_b = self.load[self.cand[b]]
        if load_a != load_b:
            return load_a < load_b
        if load_a and self.progress[self.cand[a]] != self.progress[self.cand[b]]:
            return self.progress[self.cand[a]] > self.progress[self.cand[b]]
        return (a - first + m) % m < (b - first + m) % m


cdef inline long long _now_ns() noexcept nogil:
    cdef timespec clock
    if clock_gettime(CLOCK_MONOTONIC, &clock) != 0:
        return 0
    return clock.tv_sec * 1000000000LL + clock.tv_nsec


cdef inline bint _listed(int fd, const int *fds, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if fds[i] == fd:
            return True
    return False


cdef void *_resized(void *pointer, size_t size) except NULL:
    cdef void *grown = realloc(pointer, size)
    if grown == NULL:
        raise MemoryError()
    return grown
