"""FLOORS: the least a primary can do per connection.

Plain Python around dispatch's Cython calls, in one epoll loop on a
non-blocking listener. Each time it is readable, ``dispatch._fdpass.accept_batch``
takes every pending connection (up to 256), and then:

- ``close`` mode (default): ``dispatch._fdpass.close_fds`` closes them here.
  The TCP teardown (a reset: the request was never read) then happens in this
  process, which a real primary leaves to its workers.
- ``pass`` mode: ``dispatch._fdpass.send_fds(..., close_sent=True)`` passes the
  batch (253 per message at most) over an AF_UNIX SOCK_SEQPACKET socketpair to
  a forked sink process that receives and closes them: accept4 + sendmsg +
  dropping our reference, exactly the primary's syscalls, with no balancing
  policy, no bookkeeping and a single receiver.

No request is read and no byte is written, so clients see their connection
reset or closed; that is expected. Because clients cannot count what never
answered, this process counts: it prints ``ready PORT`` once listening, and
``accepted N`` (its running total) on every SIGUSR1. SIGTERM/SIGINT end it
(the sink ends at EOF on its socket, or with its parent via PDEATHSIG).

    python benchmarks/peers/accept_close.py 127.0.0.1 PORT [close|pass]
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import sys

from dispatch._fdpass import accept_batch, close_fds, recv_fds, send_fds, set_parent_death_signal

BATCH = 256
MAX_FDS = 253


def sink(sock: socket.socket) -> None:
    """Receive descriptors until EOF and close them."""
    set_parent_death_signal(signal.SIGKILL)
    fd = sock.fileno()
    while True:
        got = recv_fds(fd, 16)
        if got is None or not got[0]:
            return
        for conn in got[1]:
            os.close(conn)


def main() -> int:
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    mode = sys.argv[3] if len(sys.argv) > 3 else "close"
    if mode not in ("close", "pass"):
        print(f"unknown mode {mode!r}: close or pass", file=sys.stderr)
        return 2
    out_fd = -1
    if mode == "pass":
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if os.fork() == 0:
            ours.close()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                sink(theirs)
            finally:
                os._exit(0)
        theirs.close()
        out_fd = ours.fileno()  # blocking: if the sink falls behind, stop accepting
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(2048)
    listener.setblocking(False)
    accepted = 0
    running = True

    def report(signum: int, frame: object) -> None:
        os.write(1, f"accepted {accepted}\n".encode())

    def stop(signum: int, frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGUSR1, report)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    buf = array.array("i", bytes(4 * BATCH))
    fd = listener.fileno()
    os.write(1, f"ready {listener.getsockname()[1]}\n".encode())
    try:
        while running:
            for _ in ep.poll(0.2):
                try:
                    n = accept_batch(fd, buf)
                except OSError:
                    continue  # EMFILE and the like: try again on the next wakeup
                if out_fd < 0:
                    close_fds(buf, 0, n)
                else:
                    start = 0
                    while start < n:
                        chunk = min(n - start, MAX_FDS)
                        send_fds(out_fd, buf, start, chunk, None, 0, True)
                        start += chunk
                accepted += n
    finally:
        ep.close()
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
