"""Removal counts, largest-remainder allocation over segments, and the choice of units."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglp_onnx.selection.allocation import allocate, choose_removals, removal_count
from sglp_onnx.errors import UserError

FAST = settings(max_examples=100, deadline=None)


@pytest.mark.parametrize(
    ("n_units", "kwargs", "expected"),
    [
        (10, {"remove": 3}, 3),
        (10, {"remove": 0}, 0),
        (10, {"remove": 9}, 9),
        (10, {"ratio": 0.3}, 3),
        (10, {"ratio": 0.35}, 4),  # half rounds up, despite 0.35 * 10 < 3.5 in floating point
        (10, {"ratio": 0.34}, 3),
        (10, {"ratio": 0.01}, 1),  # at least one
        (27, {"ratio": 0.5}, 14),
        (0, {"remove": 0}, 0),
    ],
)
def test_removal_count(n_units, kwargs, expected):
    assert removal_count(n_units, **kwargs) == expected


@pytest.mark.parametrize(
    ("n_units", "kwargs", "message"),
    [
        (10, {}, "exactly one of --remove N or --ratio R"),
        (10, {"remove": 2, "ratio": 0.2}, "exactly one of --remove N or --ratio R"),
        (10, {"ratio": 1.5}, r"--ratio must be in \(0, 1\), got 1.5"),
        (10, {"ratio": 0.0}, r"--ratio must be in \(0, 1\), got 0.0"),
        (10, {"ratio": float("nan")}, r"--ratio must be in \(0, 1\), got nan"),
        (10, {"remove": -1}, "--remove must be 0 or more, got -1"),
        (10, {"remove": 2.5}, "--remove must be a whole number"),
        (10, {"remove": 10}, "--remove 10 is too many: the model has 10 prunable units.*remove at most 9"),
        (10, {"ratio": 0.97}, r"--ratio 0.97 of 10 units \(10 units\) is too many.*remove at most 9"),
        (1, {"ratio": 0.5}, "only 1 prunable unit"),
        (0, {"remove": 1}, "no prunable residual units"),
    ],
)
def test_removal_count_errors(n_units, kwargs, message):
    with pytest.raises(UserError, match=message):
        removal_count(n_units, **kwargs)


@pytest.mark.parametrize(
    ("lengths", "n_remove", "expected"),
    [
        ([4, 4, 4], 3, [1, 1, 1]),
        ([5, 3, 2], 5, [3, 1, 1]),  # quotas 2.5, 1.5, 1: the tie between .5s goes to the earlier segment
        ([6, 3], 4, [3, 1]),  # quotas 2.67, 1.33
        ([1, 3, 6], 5, [0, 2, 3]),  # a single unit keeps itself; 5 over lengths 3, 6: 1.67, 3.33
        ([2, 2, 8], 9, [1, 1, 7]),  # quotas 1.5, 1.5, 6: the long segment reaches its cap
        ([3, 3, 3, 3], 2, [1, 1, 0, 0]),  # equal remainders: segment order
        ([7], 6, [6]),
        ([4, 2], 0, [0, 0]),
    ],
)
def test_allocate_hand_examples(lengths, n_remove, expected):
    assert allocate(lengths, n_remove) == expected


def test_allocate_impossible_request_says_the_limit():
    message = r"cannot remove 5 of 6 units with 3 segments.*at most 3 can go.*fewer segments"
    with pytest.raises(UserError, match=message):
        allocate([1, 2, 3], 5)


def capped_quotas(lengths: list[int], n_remove: int) -> list[Fraction]:
    """Exact capped proportional quotas in fractions, without any rounding."""
    quotas = [Fraction(0)] * len(lengths)
    free = list(range(len(lengths)))
    left = Fraction(n_remove)
    while free:
        total = sum(lengths[s] for s in free)
        capped = [s for s in free if left * lengths[s] / total > lengths[s] - 1]
        if not capped:
            for s in free:
                quotas[s] = left * lengths[s] / total
            break
        for s in capped:
            quotas[s] = Fraction(lengths[s] - 1)
            left -= lengths[s] - 1
        free = [s for s in free if s not in capped]
    return quotas


@FAST
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=8), data=st.data())
def test_allocate_properties(lengths, data):
    capacity = sum(n - 1 for n in lengths)
    n_remove = data.draw(st.integers(0, capacity))
    counts = allocate(lengths, n_remove)
    assert sum(counts) == n_remove
    assert all(0 <= c <= n - 1 for c, n in zip(counts, lengths))
    # Largest remainder never strays a whole unit from the exact quota.
    for c, q in zip(counts, capped_quotas(lengths, n_remove)):
        assert abs(c - q) < 1
    # Longer segments never give up fewer units than shorter ones.
    for a in range(len(lengths)):
        for b in range(len(lengths)):
            if lengths[a] > lengths[b]:
                assert counts[a] >= counts[b]


def test_choose_removals_picks_the_lowest_per_segment():
    segment_ids = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    importance = [5.0, 1.0, 3.0, 2.0, 9.0, 4.0, 0.5, 7.0, 0.1]
    assert choose_removals(segment_ids, importance, [2, 1, 2]) == [1, 2, 3, 6, 8]
    assert choose_removals(segment_ids, importance, [0, 0, 0]) == []


def test_choose_removals_ties_remove_the_later_unit():
    assert choose_removals([0, 0, 0, 0], [1.0, 2.0, 1.0, 1.0], [2]) == [2, 3]


def test_choose_removals_errors():
    with pytest.raises(UserError, match=r"units \[1\] is not a finite number"):
        choose_removals([0, 0], [1.0, float("nan")], [1])
    with pytest.raises(ValueError, match="cannot remove 3"):
        choose_removals([0, 0], [1.0, 2.0], [3])


@FAST
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_choose_removals_properties(lengths, seed, data):
    ids = np.repeat(np.arange(len(lengths)), lengths).tolist()
    importance = np.random.default_rng(seed).integers(0, 4, size=len(ids)).astype(float).tolist()
    counts = [data.draw(st.integers(0, n)) for n in lengths]
    removed = choose_removals(ids, importance, counts)
    assert removed == sorted(removed)
    for s, count in enumerate(counts):
        members = [i for i in range(len(ids)) if ids[i] == s]
        gone = [i for i in removed if ids[i] == s]
        kept = [i for i in members if i not in gone]
        assert len(gone) == count
        # Every removed unit is less important than every kept one, or tied and later.
        assert all((importance[g], -g) < (importance[k], -k) for g in gone for k in kept)
