"""Numbers over several values: Jain's fairness index, and median with min–max over rounds."""

from __future__ import annotations

import statistics


def jain(values: list[float]) -> float | None:
    """Jain's fairness index: 1 = perfectly even, 1/n = one got everything."""
    if not values or sum(values) <= 0:
        return None
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def summarize(values: list[float | None]) -> dict[str, float] | None:
    """Median, min, max and count of the values that are numbers (None and NaN left out)."""
    got = [v for v in values if v is not None and v == v]
    if not got:
        return None
    return {"median": statistics.median(got), "min": min(got), "max": max(got), "n": len(got)}
