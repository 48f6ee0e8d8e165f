"""Edges where a misbehaving peer used to wedge the primary.

- Idle health clients filling every slot kept ``/healthz`` at 503.
- A unix socket path whose listener never accepts hung the stale-socket probe.
- systemd handing over a socket that is not a stream listener made the
  primary spin instead of refusing to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import dispatch
from dispatch.protocol import Heartbeat
from tests.helpers import ROOT, pid_alive, wait_for
from tests.test_health import Harness, Reply, fake_worker


# ====================================================================== health slots
@pytest.fixture
def harness() -> Any:
    made: list[Harness] = []

    def make(**options: Any) -> Harness:
        made.append(Harness(**options))
        return made[-1]

    yield make
    for h in made:
        h.close()


def cut(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the server has closed ``sock`` without answering."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def writing_client(h: Harness) -> socket.socket:
    """A client whose answer does not fit its buffers: it stays in the writing state."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(h.health.listener.getsockname())
    sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
    return sock


def big_answers(h: Harness) -> None:
    """Make /metrics far larger than a small socket buffer."""
    workers = [fake_worker(i, 10_000_000 + i, sent=i, report=Heartbeat(0, i, 1 << 20, 10)) for i in range(500)]
    h.primary.workers = {w.pid: w for w in workers}
    h.health.listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it


def test_idle_clients_in_every_slot_do_not_keep_healthz_out(harness: Any) -> None:
    h = harness(max_clients=4)
    partial = h.connect()
    partial.sendall(b"GET /heal")  # the oldest, with half a head
    h.accept_pending(1)
    idle = [h.connect() for _ in range(3)]
    h.accept_pending(4)
    assert h.get("/healthz").status == 200
    assert (h.health.refused, h.health.evicted) == (0, 1)
    assert cut(partial)  # the oldest reader made room
    assert len(h.health.fds()) == 1 + 3  # the others keep their slots
    idle.append(h.connect())
    h.accept_pending(4)
    assert h.get("/readyz").status == 200  # next in line: idle[0]
    assert cut(idle[0]) and h.health.evicted == 2
    for sock in [partial, *idle]:
        sock.close()


def test_a_reconnecting_pool_of_idle_clients_does_not_starve_a_probe(harness: Any) -> None:
    h = harness(max_clients=4)
    pool = [h.connect() for _ in range(6)]  # more than fit; each reconnects when cut
    probe = h.connect()
    probe.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
    answer = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        h.loop.run_once()
        for i, sock in enumerate(pool):
            try:
                sock.recv(4096)  # EOF, a 503 or a reset: it was cut or turned away
            except BlockingIOError:
                continue  # still waiting in its slot
            except OSError:
                pass
            sock.close()
            pool[i] = h.connect()
        try:
            chunk = probe.recv(65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        answer += chunk
    else:
        raise AssertionError(f"the probe got no complete answer in 5s; got {answer[:200]!r}")
    assert Reply(answer).status == 200
    for sock in [probe, *pool]:
        sock.close()


def test_clients_writing_answers_keep_their_slots(harness: Any) -> None:
    h = harness(max_clients=3)
    big_answers(h)
    writers = [writing_client(h) for _ in range(2)]
    wait_for(lambda: h.loop.run_once() or h.health.writing == 2, 5,
             what="two answers waiting for EPOLLOUT")
    idle = h.connect()
    h.accept_pending(3)
    # Full: the newcomer takes the idle client's slot, not a writer's.
    assert h.get("/healthz").status == 200
    assert cut(idle) and h.health.evicted == 1
    # Only writers left (a third joins): nobody to make room, so a 503.
    writers.append(writing_client(h))
    wait_for(lambda: h.loop.run_once() or h.health.writing == 3, 5,
             what="three answers waiting for EPOLLOUT")
    with h.connect() as extra:
        extra.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        reply = Reply(h.loop.exchange(extra))
    assert reply.status == 503 and h.health.refused == 1
    for sock in writers:
        sock.setblocking(False)
        reply = Reply(h.loop.exchange(sock))
        assert reply.status == 200 and int(reply.headers["content-length"]) == len(reply.body)
        sock.close()
    idle.close()


def test_a_full_table_of_writers_is_swept_at_their_deadline(harness: Any) -> None:
    h = harness(max_clients=2, timeout=0.5)
    big_answers(h)
    writers = [writing_client(h) for _ in range(2)]  # and never read
    wait_for(lambda: h.loop.run_once() or h.health.writing == 2, 5,
             what="two answers waiting for EPOLLOUT")
    time.sleep(0.6)
    # Nobody calls tick(): a full table is swept of expired clients on accept.
    assert h.get("/healthz").status == 200
    assert h.health.refused == 0 and h.health.evicted == 0
    for sock in writers:
        sock.close()


# ====================================================================== stale unix sockets
BIND_IN_A_CHILD = """
import sys
from dispatch.config import Address
from dispatch.listeners import BindError, bind
try:
    bind(Address.parse("unix:" + sys.argv[1]), 16)
except BindError as exc:
    print("BindError:", exc)
else:
    print("bound")
"""


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child that imports this same ``dispatch`` and ``tests``."""
    source = str(Path(dispatch.__file__).resolve().parent.parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([source, str(ROOT)]), **extra)


def bind_in_a_child(path: Path, deadline: float = 10.0) -> str:
    """What ``bind(unix:PATH)`` does, from a child killed if it hangs."""
    try:
        done = subprocess.run([sys.executable, "-c", BIND_IN_A_CHILD, str(path)], cwd=ROOT,
                              env=child_env(), capture_output=True, text=True, timeout=deadline)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"bind() on {path} still hung after {deadline}s") from None
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def fill_backlog(path: Path) -> list[socket.socket]:
    """Connections queued on a listener that never accepts, until it takes no more."""
    queued = []
    while len(queued) < 64:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        queued.append(sock)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            return queued
    raise AssertionError("the backlog never filled")


def test_a_listener_that_never_accepts_is_busy_not_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = fill_backlog(path)
    try:
        started = time.monotonic()
        result = bind_in_a_child(path)
        assert result.startswith("BindError:") and "another server is listening there" in result
        assert "busy" in result and f"unix:{path}" in result
        assert time.monotonic() - started < 8
        assert path.exists()  # a live server's socket is never removed
    finally:
        for sock in [listener, *queued]:
            sock.close()


def test_stale_and_live_unix_sockets(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(16)
    with live:
        assert "another server is listening there" in bind_in_a_child(path)
    assert path.exists()  # closed, not unlinked: a stale socket file
    assert bind_in_a_child(path) == "bound"


# ====================================================================== systemd sockets
# In a child, since the sockets must sit at fd 3, 4, ... as systemd leaves them.
INHERIT_IN_A_CHILD = """
import fcntl, json, os, socket, sys, tempfile
from dispatch.listeners import BindError
from dispatch.systemd import listen_sockets

def make(kind):
    if kind == "closed":
        return None
    if kind == "file":
        return open(os.devnull)
    if kind.startswith("unix"):
        kind_type = socket.SOCK_SEQPACKET if kind == "unix-seqpacket" else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_UNIX, kind_type)
        sock.bind(os.path.join(tempfile.mkdtemp(), "s"))
    elif kind == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
    else:
        sock = socket.socket(socket.AF_INET6 if kind == "tcp6" else socket.AF_INET)
        sock.bind(("::1" if kind == "tcp6" else "127.0.0.1", 0))
    if kind in ("tcp", "tcp6", "unix", "unix-seqpacket"):
        sock.listen(8)
    return sock

kinds = sys.argv[1].split(",")
# Out of the way first, so that moving one into place clobbers no other.
high = [None if o is None else fcntl.fcntl(o.fileno(), fcntl.F_DUPFD, 100) for o in map(make, kinds)]
for i, fd in enumerate(high):
    if fd is None:
        try:
            os.close(3 + i)
        except OSError:
            pass
    else:
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=sys.argv[2] if len(sys.argv) > 2 else str(len(kinds)))
try:
    socks = listen_sockets()
except BindError as exc:
    result = {"error": str(exc), "errno": exc.errno}
else:
    result = {"sockets": [[s.fileno(), s.family.name, s.type.name, s.getblocking(), s.get_inheritable()]
                          for s in socks]}
result["env"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
print(json.dumps(result))
"""


def inherit_in_a_child(kinds: str, listen_fds: str | None = None) -> dict[str, Any]:
    """What ``listen_sockets()`` makes of sockets of ``kinds`` (comma-separated) at fd 3, 4, ..."""
    command = [sys.executable, "-c", INHERIT_IN_A_CHILD, kinds, *([listen_fds] if listen_fds else [])]
    done = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result.pop("env") == [], "LISTEN_* must not reach workers"
    return result


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_listening_stream_sockets_are_taken() -> None:
    kinds = "tcp,unix,tcp6" if has_ipv6() else "tcp,unix"
    expected = [[3, "AF_INET", "SOCK_STREAM", False, False], [4, "AF_UNIX", "SOCK_STREAM", False, False],
                [5, "AF_INET6", "SOCK_STREAM", False, False]]
    assert inherit_in_a_child(kinds) == {"sockets": expected[: len(kinds.split(","))]}


@pytest.mark.parametrize(("kinds", "listen_fds", "problem"), [
    ("udp", None, "fd 3 passed by systemd is a SOCK_DGRAM socket, not SOCK_STREAM"),
    ("tcp-unlistened", None, "fd 3 passed by systemd is a socket that is not listening"),
    ("unix-seqpacket", None, "fd 3 passed by systemd is a SOCK_SEQPACKET socket, not SOCK_STREAM"),
    ("file", None, "fd 3 passed by systemd is not a socket"),
    ("closed", None, "fd 3 passed by systemd is not open"),
    ("tcp,udp", None, "fd 4 passed by systemd is a SOCK_DGRAM socket"),
    ("tcp", "2", "fd 4 passed by systemd is not open"),
    ("tcp", "many", "LISTEN_FDS='many' is not a number"),
])
def test_sockets_that_cannot_be_served_are_refused(kinds: str, listen_fds: str | None, problem: str) -> None:
    result = inherit_in_a_child(kinds, listen_fds)
    assert "sockets" not in result, f"taken: {result}"
    assert problem in result["error"] and result["errno"] == 22


def processes_in_session(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and pid_alive(int(entry)):
                found.append(int(entry))
    return found


LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ \[\d+\] [A-Z]+ ")  # dispatch.LOG_FORMAT

# The launcher moves the socket to fd 3 and names itself in LISTEN_PID, as systemd does.
ACTIVATE = """
import os, socket, sys
kind = sys.argv[1]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
sock.bind(("127.0.0.1", 0))
os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)  # should sock be fd 3 itself, dup2 left it close-on-exec
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "dispatch", "tests.apps:pid_app", "--workers", "2",
                          "--bind", "127.0.0.1:1"])
"""


@pytest.mark.parametrize(("kind", "problem"), [
    ("udp", "is a SOCK_DGRAM socket"),
    ("tcp-unlistened", "is a socket that is not listening"),
])
def test_the_cli_refuses_an_unusable_inherited_socket(kind: str, problem: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", ACTIVATE, kind], cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the primary and any worker
        proc.communicate()
        raise AssertionError(f"the primary was still running after 20s with a {kind} socket") from None
    finally:
        leftovers = processes_in_session(proc.pid)
        if leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if not LOG_RECORD.match(line)]
    assert len(lines) == 1 and lines[0].startswith("dispatch: error: "), stderr
    assert "fd 3" in lines[0] and problem in lines[0]
    assert leftovers == [], "the primary left processes behind"
