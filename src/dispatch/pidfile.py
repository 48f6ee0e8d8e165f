"""The pidfile: written after binding, removed on exit, stale ones replaced.

The primary often runs as root while the pidfile's directory may be writable by
others, so nothing here follows a symbolic link or opens a name someone else
could have planted: the new file is created under a fresh random name and
renamed over the path, and an existing file is read without following links,
without blocking, and only its first few bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile

#: A pid takes at most 7 digits on Linux; anything longer is not a pidfile of ours.
_READ_LIMIT = 32
_PID_MAX = 1 << 22  # PID_MAX_LIMIT


class PidfileError(RuntimeError):
    """The pidfile cannot be written, or another live process owns it."""


class Pidfile:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._pid: int | None = None

    def create(self, replacing: int | None = None) -> None:
        """Write our pid; a file naming a live process is an error, a dead one is replaced,
        and so is the primary we take over from (``replacing``, in an upgrade)."""
        other = self._read()
        if other is not None and other not in (os.getpid(), replacing) and _alive(other):
            raise PidfileError(f"pidfile {self.path} names pid {other}, which is running")
        try:
            self._write(os.getpid())
        except OSError as exc:
            raise PidfileError(f"cannot write pidfile {self.path}: {exc.strerror or exc}") from None
        self._pid = os.getpid()

    def claim(self) -> None:
        """Write our pid again (an upgrade failed after the new primary wrote its own)."""
        try:
            self._write(os.getpid())
        except OSError as exc:
            raise PidfileError(f"cannot write pidfile {self.path}: {exc.strerror or exc}") from None
        self._pid = os.getpid()

    def remove(self) -> None:
        """Remove the file if it is still ours (a new primary may have replaced it)."""
        with contextlib.suppress(PidfileError, OSError):
            if self._pid is not None and self._read() == self._pid:
                os.unlink(self.path)
        self._pid = None

    def _write(self, pid: int) -> None:
        # mkstemp: a new random name, O_EXCL (so never an existing file or link), mode 0600.
        directory, name = os.path.split(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        try:
            try:
                os.fchmod(fd, 0o644)
                os.write(fd, f"{pid}\n".encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.path)  # atomic: readers never see a half-written file
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _read(self) -> int | None:
        """The pid the file names; None when there is no file or it names no pid."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PidfileError(f"pidfile {self.path} is a symbolic link; not following it") from None
            raise PidfileError(f"cannot read pidfile {self.path}: {exc.strerror or exc}") from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise PidfileError(f"pidfile {self.path} is a directory")
            if not stat.S_ISREG(mode):
                raise PidfileError(f"pidfile {self.path} is not a regular file")
            data = os.read(fd, _READ_LIMIT + 1)
        except OSError as exc:
            raise PidfileError(f"cannot read pidfile {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        return _parse_pid(data)


def _parse_pid(data: bytes) -> int | None:
    if len(data) > _READ_LIMIT:
        return None
    try:
        pid = int(data.strip())
    except ValueError:
        return None
    return pid if 0 < pid <= _PID_MAX else None  # kill() reads 0 and -1 as groups


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
