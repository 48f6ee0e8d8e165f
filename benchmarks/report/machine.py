"""What every report names: the machine the run was on, and the commit of src/ it ran."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import time

from benchmarks.paths import ROOT


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def run(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "unavailable"
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"

    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": run(["wrk", "--version"]),
        "node": run(["node", "--version"]) if shutil.which("node") else "not found",
        "dispatch_commit": source_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def source_version() -> str:
    """The commit the servers import (dispatch is installed editable), '+dirty' if src/ differs."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")

