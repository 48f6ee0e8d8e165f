"""What a server under test wrote to its log: counts of the lines worth knowing, its last
error, and trimming a log small enough to keep."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

PROBLEM = re.compile(r"\] (ERROR|CRITICAL|WARNING) [\w.]+: (.*)")


def log_text(path: Path, offset: int = 0) -> str:
    """The log from byte ``offset`` on."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def count_log(path: Path, offset: int) -> tuple[int, dict[str, int]]:
    """Lines the server logged since ``offset``: totals of the ones worth knowing."""
    text = log_text(path, offset)
    counts = {
        "log_lines": text.count("\n"),
        "log_task_destroyed": text.count("Task was destroyed but it is pending"),
        "log_tracebacks": text.count("Traceback (most recent call last)"),
    }
    return path.stat().st_size, counts


def trim_log(path: Path, head: int = 64 * 1024, tail: int = 32 * 1024) -> None:
    """Keep a server log small enough to keep: its start and end (counts are taken before)."""
    size = path.stat().st_size
    if size <= head + tail + 1024:
        return
    with open(path, "rb") as f:
        first = f.read(head)
        f.seek(size - tail)
        last = f.read()
    cut = size - len(first) - len(last)
    path.write_bytes(first + f"\n[... {cut} bytes cut by benchmarks ...]\n".encode() + last)


def last_error(text: str) -> str | None:
    """The last exception line or ERROR/CRITICAL message of a log, else its last line."""
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        match = PROBLEM.search(line)
        if match and match.group(1) != "WARNING":
            return match.group(2)[:160]
        if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*", line):
            return line[:160]
    return lines[-1][:160] if lines else None


def log_notes(text: str, died: bool) -> list[str]:
    """How many ERROR and WARNING lines and tracebacks, and the most frequent of each."""
    notes = []
    found = [(m.group(1), re.sub(r"\d+", "N", m.group(2))) for m in PROBLEM.finditer(text)]
    for levels, name in ((("ERROR", "CRITICAL"), "ERROR"), (("WARNING",), "WARNING")):
        counts = Counter(message for level, message in found if level in levels)
        if counts:
            common, times = counts.most_common(1)[0]
            notes.append(f"{sum(counts.values())} {name} lines, most: `{common[:110]}` ×{times}")
    tracebacks = text.count("Traceback (most recent call last)")
    if tracebacks:
        notes.append(f"{tracebacks} tracebacks")
    if died:
        last = last_error(text)
        if last:
            notes.append(f"last error: `{last}`")
    return notes
