"""A real HAProxy on loopback for the fleet tests: start it from a config, read its runtime
API (the stats socket), stop it by pid. Tests skip when ``haproxy`` is not installed
(``.ci/run`` installs it: ``apt-get install haproxy``)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import wait_for

HAPROXY = shutil.which("haproxy")


class HAProxy:
    """``haproxy -db -f CONFIG`` in the foreground; ``{stats}`` in the config is replaced
    by the path of its admin stats socket."""

    def __init__(self, config: str) -> None:
        assert HAPROXY is not None
        self.dir = Path(tempfile.mkdtemp(prefix="dispatch-haproxy-"))
        self.stats_path = self.dir / "stats.sock"
        self.config_path = self.dir / "haproxy.cfg"
        self.config_path.write_text(config.replace("{stats}", str(self.stats_path)))
        self.log_path = self.dir / "haproxy.log"
        self._log = open(self.log_path, "w+b")  # noqa: SIM115 - closed in stop()
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config_path)], capture_output=True, timeout=30)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.stats_path.exists() or self.proc.poll() is not None, 10,
                 what="haproxy's stats socket")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def command(self, line: str) -> str:
        """One runtime API command; its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_path))
            sock.sendall(line.encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode()

    def servers(self, backend: str) -> dict[str, dict[str, str]]:
        """``show stat`` of ``backend``'s servers: ``{name: {column: value}}``."""
        text = self.command("show stat").lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")}

    def status(self, backend: str, server: str) -> str:
        """``UP``, ``DOWN``, ``MAINT``, ``DRAIN``, ``UP 1/2``, ..."""
        return self.servers(backend)[server]["status"]

    def weight(self, backend: str, server: str) -> int:
        return int(self.servers(backend)[server]["weight"])

    def wait_status(self, backend: str, server: str, status: str, timeout: float = 15.0) -> None:
        wait_for(lambda: self.status(backend, server) == status, timeout, interval=0.05,
                 what=f"haproxy to mark {backend}/{server} {status}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if exc[0] is None:
            shutil.rmtree(self.dir, ignore_errors=True)
