"""Running wrk and reading its result: exact counters and latency percentiles from a Lua
``done()`` hook instead of wrk's rounded text report."""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass
from typing import Any

# wrk prints this line from the Lua done() hook: exact counters and percentiles
# instead of wrk's rounded text report.
DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def mixed_lua(path: str, share: float) -> str:
    """A wrk script whose requests go to ``path`` with probability ``share``, else to ``/``."""
    return f"""
-- Each request picks its path: {share:.0%} {path}, the rest are instant.
-- Built in init(): only then does wrk.headers hold Host (and the -H headers).
local slow, fast
init = function(args)
  slow = wrk.format(nil, "{path}")
  fast = wrk.format(nil, "/")
end
request = function()
  if math.random() < {share} then return slow end
  return fast
end
""" + DONE_LUA


@dataclass
class Wrk:
    cmd: list[str]
    proc: subprocess.Popen[str]


def start_wrk(cmd: list[str]) -> Wrk:
    return Wrk(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True))


def finish_wrk(w: Wrk, timeout: float) -> dict[str, Any]:
    """The BENCHJSON line of a wrk run started with a script that ends in DONE_LUA."""
    try:
        out, _ = w.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        w.proc.kill()
        out, _ = w.proc.communicate(timeout=5)
        raise RuntimeError(f"wrk did not finish in {timeout}s: {shlex.join(w.cmd)}") from None
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line[len("BENCHJSON ") :])
    raise RuntimeError(f"wrk printed no result ({w.proc.returncode}): {out[-500:]}")


def reap(*runs: Wrk | None) -> None:
    """Kill any of ``runs`` still running (after an error), and wait for it."""
    for w in runs:
        if w is not None and w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(timeout=5)
