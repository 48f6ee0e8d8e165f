"""Balancing policies: pure functions of (count, loads, workers)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.balance import (
    KERNEL_MODES,
    MODES,
    USER_MODES,
    LeastConnections,
    Policy,
    RoundRobin,
    make_policy,
)

worker_counts = st.integers(1, 16)
batch_sizes = st.integers(0, 300)


# ------------------------------------------------------------------ RoundRobin
@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_round_robin_batches_of_one_rotate_exactly(workers: int) -> None:
    policy = RoundRobin()
    chosen = [policy.assign(1, [], workers).index(1) for _ in range(3 * workers)]
    assert chosen == [i % workers for i in range(3 * workers)]


def test_round_robin_continues_after_a_batch() -> None:
    policy = RoundRobin()
    assert policy.assign(5, [], 3) == [2, 2, 1]
    # The extra went to 0 and 1, so the next single connection goes to 2.
    assert policy.assign(1, [], 3) == [0, 0, 1]
    assert policy.assign(1, [], 3) == [1, 0, 0]


@given(worker_counts, st.lists(batch_sizes, min_size=1, max_size=40))
def test_round_robin_is_even_within_and_across_batches(workers: int, batches: list[int]) -> None:
    policy = RoundRobin()
    totals = [0] * workers
    for count in batches:
        counts = policy.assign(count, [], workers)
        assert len(counts) == workers
        assert sum(counts) == count
        assert min(counts) >= 0
        assert max(counts) - min(counts) <= 1
        totals = [t + c for t, c in zip(totals, counts, strict=True)]
        assert max(totals) - min(totals) <= 1


@given(st.lists(st.tuples(worker_counts, batch_sizes), min_size=1, max_size=40))
def test_round_robin_survives_a_changing_number_of_workers(batches: list[tuple[int, int]]) -> None:
    # Workers come and go between batches; every batch is still split evenly.
    policy = RoundRobin()
    for workers, count in batches:
        counts = policy.assign(count, [], workers)
        assert len(counts) == workers
        assert sum(counts) == count
        assert max(counts) - min(counts) <= 1


# ------------------------------------------------------------ LeastConnections
def best_max_load(count: int, loads: list[int]) -> int:
    """The lowest possible highest load after placing ``count`` connections."""
    level = max(loads)
    room = sum(level - load for load in loads)
    if count <= room:
        # Below the top: the lowest level L with enough room under it.
        level = min(loads)
        while sum(max(0, level - load) for load in loads) < count:
            level += 1
        return max(level, max(loads))
    return level + -(-(count - room) // len(loads))


loads_lists = st.lists(st.integers(0, 50), min_size=1, max_size=12)


@given(loads_lists, batch_sizes)
def test_least_connections_pours_like_water(loads: list[int], count: int) -> None:
    counts = LeastConnections().assign(count, loads, len(loads))
    assert len(counts) == len(loads)
    assert sum(counts) == count
    assert min(counts) >= 0
    after = [load + c for load, c in zip(loads, counts, strict=True)]
    assert max(after) == best_max_load(count, loads)
    # Nobody received a connection while someone else ended 2+ lower.
    for i, c in enumerate(counts):
        if c:
            assert after[i] <= min(after) + 1


@given(st.integers(1, 16), st.integers(0, 50))
def test_least_connections_ties_rotate(workers: int, load: int) -> None:
    policy = LeastConnections()
    chosen = [policy.assign(1, [load] * workers, workers).index(1) for _ in range(2 * workers)]
    assert chosen == [i % workers for i in range(2 * workers)]


def test_least_connections_breaks_busy_ties_by_recent_progress() -> None:
    policy = LeastConnections()
    # Both hold one; worker 1 finished something last: a blocked loop (worker 0) finishes nothing.
    for _ in range(4):
        assert policy.assign(1, [1, 1], 2, [7, 9]) == [0, 1]
        assert policy.assign(1, [2, 2], 2, [9, 7]) == [1, 0]
    # A lower load still wins over recent progress.
    assert policy.assign(1, [0, 1], 2, [1, 9]) == [1, 0]
    # Idle workers still rotate, whatever their stamps: they share evenly.
    chosen = [policy.assign(1, [0, 0, 0], 3, [5, 9, 1]).index(1) for _ in range(6)]
    assert sorted(chosen) == [0, 0, 1, 1, 2, 2]


@given(st.lists(st.integers(0, 20), min_size=1, max_size=8), st.integers(0, 64), st.data())
def test_least_connections_with_progress_still_pours_like_water(loads: list[int], count: int,
                                                                 data: st.DataObject) -> None:
    recent = data.draw(st.lists(st.integers(0, 100), min_size=len(loads), max_size=len(loads)))
    counts = LeastConnections().assign(count, loads, len(loads), recent)
    assert sum(counts) == count and all(c >= 0 for c in counts)
    after = [load + c for load, c in zip(loads, counts, strict=True)]
    for i, c in enumerate(counts):
        if c:
            assert after[i] <= min(after) + 1


def test_least_connections_picks_the_idlest() -> None:
    policy = LeastConnections()
    assert policy.assign(1, [3, 0, 5], 3) == [0, 1, 0]
    # 3 fill worker 1 up to worker 0's level; the 4th goes to one of the two.
    counts = policy.assign(4, [3, 0, 5], 3)
    assert counts in ([1, 3, 0], [0, 4, 0])
    # 7 bring everyone to 5; the last 2 go to two different workers.
    counts = policy.assign(9, [3, 0, 5], 3)
    assert sorted(load + c for load, c in zip([3, 0, 5], counts, strict=True)) == [5, 6, 6]


def test_least_connections_simulated_stream_stays_balanced() -> None:
    # Connections arrive one at a time and never finish: loads stay level.
    policy = LeastConnections()
    loads = [0] * 5
    for _ in range(103):
        counts = policy.assign(1, loads, 5)
        loads = [load + c for load, c in zip(loads, counts, strict=True)]
        assert max(loads) - min(loads) <= 1


# --------------------------------------------------------------------- modes
def test_policies_declare_whether_they_need_loads() -> None:
    assert RoundRobin.needs_loads is False
    assert LeastConnections.needs_loads is True
    assert isinstance(RoundRobin(), Policy)
    assert isinstance(LeastConnections(), Policy)


def test_make_policy() -> None:
    assert isinstance(make_policy("round-robin"), RoundRobin)
    assert isinstance(make_policy("least-connections"), LeastConnections)
    for mode, cls in USER_MODES.items():
        assert type(make_policy(mode)) is cls
    assert set(MODES) == {*USER_MODES, *KERNEL_MODES}
    assert not set(USER_MODES) & set(KERNEL_MODES)


@pytest.mark.parametrize("mode", ["reuseport", "shared", "random"])
def test_make_policy_refuses_non_user_space_modes(mode: str) -> None:
    with pytest.raises(ValueError, match=f"no user-space policy for balance mode '{mode}'"):
        make_policy(mode)
