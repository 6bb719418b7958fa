"""Fisher segmentation against brute force, the cost matrix, and the choice of K."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglp_onnx.errors import UserError
from sglp_onnx.selection.segmentation import (
    Segmentation,
    choose_k,
    fisher_segments,
    loss_curve,
    segment_cost_matrix,
    segments_of,
)

FAST = settings(max_examples=60, deadline=None)


def scatter(rows: np.ndarray) -> float:
    return float(((rows - rows.mean(axis=0)) ** 2).sum())


def brute_force_loss(profiles: np.ndarray, k: int) -> float:
    L = profiles.shape[0]
    best = np.inf
    for cuts in itertools.combinations(range(1, L), k - 1):
        edges = (0, *cuts, L)
        best = min(best, sum(scatter(profiles[a:b]) for a, b in zip(edges[:-1], edges[1:])))
    return best


profile_matrices = st.builds(
    lambda seed, L, P, levels: np.random.default_rng(seed).integers(0, levels, size=(L, P)) / max(levels - 1, 1),
    seed=st.integers(0, 2**32 - 1),
    L=st.integers(1, 8),
    P=st.integers(1, 4),
    levels=st.integers(2, 5),  # few distinct values: many exact ties
)


def test_cost_matrix_hand_values():
    profiles = np.array([[0.0, 0.0], [2.0, 0.0], [2.0, 3.0]])
    cost = segment_cost_matrix(profiles)
    assert cost.shape == (4, 4)
    assert cost[0, 1] == cost[1, 2] == cost[2, 3] == 0.0
    assert cost[0, 2] == pytest.approx(2.0)  # mean (1, 0): 1 + 1
    assert cost[1, 3] == pytest.approx(4.5)  # mean (2, 1.5): 2.25 + 2.25
    # mean (4/3, 1): 16/9 + 1 + 4/9 + 1 + 4/9 + 4 = 8 + 2/3
    assert cost[0, 3] == pytest.approx(26.0 / 3.0)
    assert (np.tril(cost) == 0).all()


@FAST
@given(profiles=profile_matrices)
def test_cost_matrix_equals_direct_scatter(profiles):
    cost = segment_cost_matrix(profiles)
    L = profiles.shape[0]
    for i in range(L):
        for j in range(i + 1, L + 1):
            assert cost[i, j] == pytest.approx(scatter(profiles[i:j]), abs=1e-9)


@FAST
@given(profiles=profile_matrices, data=st.data())
def test_fisher_segments_match_brute_force(profiles, data):
    L = profiles.shape[0]
    k = data.draw(st.integers(1, L))
    result = fisher_segments(profiles, k)
    assert isinstance(result, Segmentation)
    assert len(result.bounds) == k
    assert result.bounds[0][0] == 0 and result.bounds[-1][1] == L
    assert all(a < b for a, b in result.bounds)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(result.bounds, result.bounds[1:]))
    assert result.loss == pytest.approx(brute_force_loss(profiles, k), abs=1e-9)
    assert result.loss == pytest.approx(sum(scatter(profiles[a:b]) for a, b in result.bounds), abs=1e-9)


@FAST
@given(profiles=profile_matrices)
def test_loss_curve_is_the_optimum_and_non_increasing(profiles):
    L = profiles.shape[0]
    curve = loss_curve(profiles, L)
    assert curve.shape == (L,)
    assert (np.diff(curve) <= 1e-12).all()
    assert curve[-1] == pytest.approx(0.0, abs=1e-12)
    for k in range(1, L + 1):
        assert curve[k - 1] == pytest.approx(fisher_segments(profiles, k).loss, abs=1e-12)


def test_block_structure_is_recovered():
    # Three blocks of mutually similar units, as in a CKA matrix.
    sizes = [3, 4, 2]
    labels = np.repeat(np.arange(3), sizes)
    cka = np.where(labels[:, None] == labels[None, :], 0.9, 0.2)
    np.fill_diagonal(cka, 1.0)
    assert fisher_segments(cka, 3).bounds == ((0, 3), (3, 7), (7, 9))
    k, rule = choose_k(loss_curve(cka, 8), k_max=8)
    assert k == 3
    assert "K = 3" in rule and "Kneedle" in rule


def test_ties_start_the_last_segment_as_early_as_possible():
    profiles = np.ones((5, 2))
    assert fisher_segments(profiles, 3).bounds == ((0, 1), (1, 2), (2, 5))


def test_bad_segment_counts_are_user_errors():
    with pytest.raises(UserError, match="cannot split 4 units into 5 segments: choose --segments between 1 and 4"):
        fisher_segments(np.eye(4), 5)
    with pytest.raises(UserError, match="between 1 and 4"):
        fisher_segments(np.eye(4), 0)
    with pytest.raises(ValueError, match="NaN"):
        segment_cost_matrix(np.array([[np.nan]]))


def test_choose_k_hand_curves():
    # Normalised: y = 1, 0.2, 0.1, 0.05, 0; distance below chord 1 - x - y is
    # 0, 0.55, 0.4, 0.2, 0: the elbow is K = 2.
    assert choose_k([100.0, 20.0, 10.0, 5.0, 0.0], k_max=5)[0] == 2
    assert choose_k([3.0, 3.0, 3.0], k_max=3)[0] == 1
    assert "flat" in choose_k([0.0, 0.0, 0.0, 0.0], k_max=4)[1]
    assert choose_k([5.0, 1.0], k_max=2)[0] == 1
    assert choose_k([7.0], k_max=1)[0] == 1
    # A straight line has no point below its chord.
    assert choose_k([4.0, 3.0, 2.0, 1.0], k_max=4)[0] == 1
    # Only the first k_max losses count.
    assert choose_k([100.0, 20.0, 10.0, 5.0, 0.0, 0.0, 0.0], k_max=5)[0] == 2


@FAST
@given(
    losses=st.lists(st.floats(0, 1e6), min_size=1, max_size=12).map(lambda xs: sorted(xs, reverse=True)),
    data=st.data(),
)
def test_choose_k_stays_in_range(losses, data):
    k_max = data.draw(st.integers(1, len(losses)))
    k, rule = choose_k(losses, k_max=k_max)
    assert 1 <= k <= k_max
    assert isinstance(rule, str) and "\n" not in rule


def test_segments_of():
    assert segments_of(((0, 2), (2, 3), (3, 6))) == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError):
        segments_of(((0, 2), (3, 4)))
