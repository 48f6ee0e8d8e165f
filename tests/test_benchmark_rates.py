"""The open-loop benchmark's arrival plan: short periods, so bursts stay small and alike."""

from __future__ import annotations

import pytest

from benchmarks.measurement.h2load import RATE_TOLERANCE, rate_plan


@pytest.mark.parametrize("rate", [18, 25, 60, 199, 597, 602, 607, 825, 1190, 1218, 1781, 1824, 3000])
def test_the_plan_is_close_to_the_rate_with_a_short_period(rate: float) -> None:
    count, period_ms = rate_plan(rate)
    assert abs(count * 1000 / period_ms - rate) / rate <= RATE_TOLERANCE
    # Never the 22 connections every 37 ms a 0.5% tolerance gave 597/s.
    assert period_ms <= max(10, round(1000 / rate) + 1), (count, period_ms)
    assert count <= max(1, rate * 0.01)


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        rate_plan(0)
