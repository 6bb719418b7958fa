"""Fisher optimal segmentation of the ordered units by their similarity profiles.

Splits units 0..L-1 into K contiguous segments of mutually similar units
(stage 4 of the pipeline), gives the loss curve over K and the automatic
choice of K read from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Segmentation:
    """Contiguous half-open segments `(start, stop)` in order covering 0..L, and their loss."""

    bounds: tuple[tuple[int, int], ...]
    loss: float


def _profiles_2d(profiles: np.ndarray) -> np.ndarray:
    profiles = np.asarray(profiles, dtype=np.float64)
    if profiles.ndim != 2 or profiles.shape[0] < 1:
        raise ValueError(f"profiles must be a non-empty 2-D array (units x profile), got shape {profiles.shape}")
    if not np.isfinite(profiles).all():
        raise ValueError("profiles contain NaN or Inf")
    return profiles


def segment_cost_matrix(profiles: np.ndarray) -> np.ndarray:
    """Within-segment scatter of every contiguous segment, an (L+1) x (L+1) matrix.

    For 0 <= i < j <= L, with p_l row l of `profiles` (L x P) and n = j - i::

        cost[i, j] = sum_{l=i}^{j-1} ||p_l - mean||^2
                   = sum_{l=i}^{j-1} ||p_l||^2 - ||sum_{l=i}^{j-1} p_l||^2 / n

    computed from prefix sums of p_l and ||p_l||^2 in O(L^2 P) time and O(L P)
    working memory: the diameter D(i, j-1) of Fisher, "On grouping for maximum
    homogeneity", JASA 53 (1958). Round-off can make the difference slightly
    negative; it is clipped at 0. Entries with i >= j are 0 and unused.
    """
    profiles = _profiles_2d(profiles)
    L = profiles.shape[0]
    prefix = np.zeros((L + 1, profiles.shape[1]), dtype=np.float64)
    np.cumsum(profiles, axis=0, out=prefix[1:])
    prefix_sq = np.concatenate([[0.0], np.cumsum(np.einsum("lp,lp->l", profiles, profiles))])
    cost = np.zeros((L + 1, L + 1), dtype=np.float64)
    for i in range(L):
        sums = prefix[i + 1:] - prefix[i]
        counts = np.arange(1, L - i + 1, dtype=np.float64)
        scatter = prefix_sq[i + 1:] - prefix_sq[i] - np.einsum("jp,jp->j", sums, sums) / counts
        cost[i, i + 1:] = np.maximum(scatter, 0.0)
    return cost


def _fisher_table(cost: np.ndarray, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal loss and last-segment start for 1..k_max segments of every prefix.

    best[k, j] = min_{k-1 <= i < j} best[k-1, i] + cost[i, j]: the optimal
    loss of splitting units 0..j-1 into k segments (Fisher 1958). argmin
    returns the first minimum, so on exact ties the last segment starts as
    early as possible.
    """
    L = cost.shape[0] - 1
    best = np.full((k_max + 1, L + 1), np.inf)
    start = np.zeros((k_max + 1, L + 1), dtype=np.int64)
    best[1, 1:] = cost[0, 1:]
    for k in range(2, k_max + 1):
        for j in range(k, L + 1):
            candidates = best[k - 1, k - 1:j] + cost[k - 1:j, j]
            i = int(np.argmin(candidates))
            best[k, j] = candidates[i]
            start[k, j] = k - 1 + i
    return best, start


def _check_k(k: int, L: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise UserError(f"{what} must be a whole number, got {k!r}")
    if not 1 <= k <= L:
        raise UserError(f"cannot split {L} units into {k} segments: choose {what} between 1 and {L}")


def fisher_segments(profiles: np.ndarray, k: int) -> Segmentation:
    """Exact minimum-loss split of the L ordered units into k contiguous segments.

    Minimises sum over segments of sum_{l in segment} ||p_l - segment mean||^2
    (see `segment_cost_matrix`) by Fisher's dynamic programme, "On grouping
    for maximum homogeneity", JASA 53 (1958): O(k L^2) after the cost matrix.
    Ties: when backtracking from the end, each segment starts at the smallest
    index that attains the minimum, so earlier segments are as short as the
    optimum allows.
    """
    profiles = _profiles_2d(profiles)
    L = profiles.shape[0]
    _check_k(k, L, "--segments")
    cost = segment_cost_matrix(profiles)
    best, start = _fisher_table(cost, k)
    bounds = []
    stop = L
    for segments_left in range(k, 0, -1):
        begin = int(start[segments_left, stop]) if segments_left > 1 else 0
        bounds.append((begin, stop))
        stop = begin
    return Segmentation(bounds=tuple(reversed(bounds)), loss=float(best[k, L]))


def loss_curve(profiles: np.ndarray, k_max: int) -> np.ndarray:
    """Optimal Fisher loss W_K for K = 1..k_max (element K-1), from one DP pass.

    Non-increasing in K up to round-off, and 0 at K = L. Losses below
    1e-12 sum_l ||p_l||^2 are round-off and are returned as 0: equal
    profiles give W_1 ~ 1e-16 instead of 0, and `choose_k` would otherwise
    find an elbow in that noise. The losses are computed on the profiles
    divided by their largest magnitude and scaled back (W_K scales with its
    square), so that the round-off test holds for profiles so small that their
    squares are subnormal (where the threshold itself would underflow to 0).
    """
    profiles = _profiles_2d(profiles)
    L = profiles.shape[0]
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or not 1 <= k_max <= L:
        raise ValueError(f"k_max must be a whole number in 1..{L}, got {k_max!r}")
    scale = float(np.abs(profiles).max()) if profiles.size else 0.0
    if scale > 0.0 and np.isfinite(scale):
        profiles = profiles / scale
    else:
        scale = 1.0
    best, _ = _fisher_table(segment_cost_matrix(profiles), k_max)
    curve = best[1:, L].copy()
    curve[curve < 1e-12 * float(np.einsum("lp,lp->", profiles, profiles))] = 0.0
    return curve * scale**2


def choose_k(losses: Sequence[float], *, k_max: int) -> tuple[int, str]:
    """Number of segments at the elbow of the loss curve, and the rule in one line.

    With W_K = losses[K-1] for K = 1..k_max, normalise x = (K-1)/(k_max-1)
    and y = (W_K - W_kmax)/(W_1 - W_kmax); pick the K with the largest
    distance (1 - x) - y below the chord from (0, 1) to (1, 0), the smallest
    K on ties. This is the Kneedle knee of a decreasing convex curve (Satopaa,
    Albrecht, Irwin, Raghavan, "Finding a 'kneedle' in a haystack", ICDCS
    Workshops 2011): past it, more segments buy little homogeneity. It never
    returns more than k_max; it returns 1 when k_max < 3 (no interior point
    to compare), when the curve is flat (W_1 - W_kmax <= 1e-9 W_1, e.g. all
    profiles equal), or when no point lies more than 1e-9 below the chord
    (a straight line: no elbow).
    """
    losses = np.asarray(losses, dtype=np.float64)
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise ValueError(f"k_max must be a whole number >= 1, got {k_max!r}")
    if losses.ndim != 1 or losses.shape[0] < k_max:
        raise ValueError(f"need losses for K = 1..{k_max}, got shape {losses.shape}")
    if not np.isfinite(losses[:k_max]).all():
        raise ValueError("losses contain NaN or Inf")
    w = losses[:k_max]
    drop = w[0] - w[-1]
    rule = f"Kneedle elbow of the Fisher loss curve over K = 1..{k_max}"
    if k_max < 3:
        return 1, f"{rule}: K = 1 (fewer than 3 candidates)"
    if not drop > 1e-9 * abs(w[0]) or w[0] <= 0.0:
        return 1, f"{rule}: K = 1 (curve is flat)"
    x = np.arange(k_max) / (k_max - 1)
    y = (w - w[-1]) / drop
    below_chord = (1.0 - x) - y
    k = int(np.argmax(below_chord)) + 1
    # The tolerance only absorbs round-off on a straight-line curve.
    if below_chord[k - 1] <= 1e-9:
        return 1, f"{rule}: K = 1 (no point below the chord)"
    return k, f"{rule} (largest distance below the chord from K=1 to K={k_max}): K = {k}"


def segments_of(bounds: Sequence[tuple[int, int]]) -> list[int]:
    """Segment id of every unit, from contiguous half-open `bounds` starting at 0."""
    ids: list[int] = []
    for s, (begin, stop) in enumerate(bounds):
        if begin != len(ids) or stop <= begin:
            raise ValueError(f"bounds must be non-empty, contiguous and start at 0, got {list(bounds)}")
        ids.extend([s] * (stop - begin))
    return ids
