from typing import Any

SCM_MAX_FD: int
DONTWAIT: int
CTRUNC: int

def accept_batch(listen_fd: int, out: Any, limit: int = -1) -> int: ...
def send_fds(
    sock_fd: int,
    fds: Any,
    start: int = 0,
    count: int = -1,
    data: bytes | None = None,
    flags: int = 0,
    close_sent: bool = False,
) -> bool: ...
def recv_fds(
    sock_fd: int, bufsize: int = 4096, maxfds: int = 253, flags: int = 0
) -> tuple[bytes, list[int], int] | None: ...
def unread_bytes(sock_fd: int) -> int: ...
def close_fds(fds: Any, start: int = 0, count: int = -1) -> None: ...
def set_parent_death_signal(signum: int) -> None: ...
