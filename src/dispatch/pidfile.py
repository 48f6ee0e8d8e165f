"""The pidfile: written after binding, removed on exit, stale ones replaced."""

from __future__ import annotations

import contextlib
import errno
import os


class PidfileError(RuntimeError):
    """Another live process owns the pidfile."""


class Pidfile:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._pid: int | None = None

    def create(self) -> None:
        """Write our pid; a file naming a live process is an error, a dead one is replaced."""
        other = self._read()
        if other is not None and other != os.getpid() and _alive(other):
            raise PidfileError(f"pidfile {self.path} names pid {other}, which is running")
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, self.path)  # atomic: readers never see a half-written file
        self._pid = os.getpid()

    def remove(self) -> None:
        """Remove the file if it is still ours (a new primary may have replaced it)."""
        if self._pid is not None and self._read() == self._pid:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self._pid = None

    def _read(self) -> int | None:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0) or None
        except (FileNotFoundError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
