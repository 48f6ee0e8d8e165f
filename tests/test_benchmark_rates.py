"""The open-loop benchmark's arrival plan: short periods, so bursts stay small and alike."""

from __future__ import annotations

import math

import pytest

from benchmarks.measurement.h2load import (
    DRIFT_TOLERANCE,
    ONE_AT_A_TIME_TOLERANCE,
    RATE_TOLERANCE,
    late_after,
    rate_plan,
)


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


@pytest.mark.parametrize("rate", [18, 25, 33, 60, 199, 825, 1100])
@pytest.mark.parametrize("other_period", [1, 5, 9, 10, 40])
def test_a_second_generator_drifts_against_the_first(rate: float, other_period: int) -> None:
    count, period_ms = rate_plan(rate, drift_against=other_period)
    assert math.gcd(period_ms, other_period) == 1, (count, period_ms)
    tolerance = ONE_AT_A_TIME_TOLERANCE if count == 1 else DRIFT_TOLERANCE
    assert abs(count * 1000 / period_ms - rate) / rate <= tolerance


def test_the_scenario_s_slow_requests_come_one_at_a_time_at_every_phase() -> None:
    # 800/s fast as 4 every 5 ms; 25/s slow: one every 39 ms, not 40 (always the same phase).
    assert rate_plan(800) == (4, 5)
    assert rate_plan(25, drift_against=5) == (1, 39)


def test_slow_requests_come_one_at_a_time_at_1200_per_second_too() -> None:
    # 1,200/s: 7 fast every 6 ms next to 36.4/s burns, once planned as 2 every 55 ms.
    fast = rate_plan(1200 * 800 / 825)
    assert fast == (7, 6)
    assert rate_plan(1200 * 25 / 825, drift_against=fast[1]) == (1, 29)


@pytest.mark.parametrize("rate", [5, 12.5, 18, 25, 36.4, 50])
@pytest.mark.parametrize("other_period", [3, 5, 6, 7, 10])
def test_a_slow_generator_sends_one_at_a_time_when_a_period_is_near(rate: float, other_period: int) -> None:
    count, period_ms = rate_plan(rate, drift_against=other_period)
    assert count == 1, (count, period_ms)


def test_late_requests_are_told_apart_by_what_was_sent_just_before() -> None:
    # (send time µs, latency ms): two late, one of them 1.5 ms after a slow request was sent.
    fast = [(0, 0.3), (1_000, 5.0), (10_000, 0.4), (21_500, 4.0)]
    assert late_after(fast, [20_000], late_ms=2, window_ms=2) == (50.0, 50.0)
    # A slow request sent after the late one explains nothing; none late: no share to give.
    assert late_after(fast, [30_000], late_ms=2, window_ms=2) == (50.0, 0.0)
    assert late_after([(0, 0.3)], [0], late_ms=2, window_ms=2) == (0.0, None)
    assert late_after([], [0], late_ms=2, window_ms=2) == (None, None)
