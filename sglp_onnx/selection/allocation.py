"""How many units to remove, how many from each segment, and which ones.

Stage 6 of the pipeline: the removal count from `--remove` or `--ratio`,
its split over segments in proportion to their lengths (every segment keeps
a unit), and the least important units of each segment.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Sequence

import numpy as np

from ..errors import UserError


def removal_count(n_units: int, *, remove: int | None = None, ratio: float | None = None) -> int:
    """Number of units to remove, from exactly one of `remove` and `ratio`.

    `remove` is taken as is (0 allowed: it must reproduce the model).
    `ratio` in (0, 1) is a fraction of `n_units`, rounded half up to the
    nearest whole unit and at least 1. Either way at least one unit must stay.
    """
    if (remove is None) == (ratio is None):
        raise UserError("give exactly one of --remove N or --ratio R")
    if n_units < 1:
        if remove == 0:
            return 0
        raise UserError("the model has no prunable residual units, so nothing can be removed")
    if remove is not None:
        if isinstance(remove, bool) or not isinstance(remove, Integral):
            raise UserError(f"--remove must be a whole number of units, got {remove!r}")
        count = int(remove)
        if count < 0:
            raise UserError(f"--remove must be 0 or more, got {count}")
        what = f"--remove {count}"
    else:
        if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0.0 < float(ratio) < 1.0:
            raise UserError(f"--ratio must be in (0, 1), got {ratio!r}")
        # Rounding r * n to 9 places first keeps 0.35 * 10 = 3.4999999999999996
        # from rounding down.
        count = max(1, math.floor(round(float(ratio) * n_units, 9) + 0.5))
        what = f"--ratio {ratio} of {n_units} units ({count} units)"
    if count > n_units - 1:
        if n_units == 1:
            raise UserError("the model has only 1 prunable unit and at least one must stay, so nothing can be removed")
        raise UserError(
            f"{what} is too many: the model has {n_units} prunable units and at least one must stay; "
            f"remove at most {n_units - 1}"
        )
    return count


def _largest_remainder(total: int, weights: Sequence[int]) -> list[int]:
    """Apportion `total` over integer `weights` by Hamilton's largest-remainder method.

    Quotas q_s = total * w_s / sum(w) are floored; the units left over go to
    the largest fractional parts, the earlier segment first on ties. Exact
    integer arithmetic, so ties are real ties.
    """
    weight_sum = sum(weights)
    shares = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    order = sorted(range(len(weights)), key=lambda s: (-remainders[s], s))
    for s in order[: total - sum(shares)]:
        shares[s] += 1
    return shares


def allocate(segment_lengths: Sequence[int], n_remove: int) -> list[int]:
    """Units to remove from each segment: proportional to length, each keeping one.

    Segment s gets its largest-remainder share of `n_remove` in proportion to
    its length, capped at length - 1. A segment whose exact quota exceeds its
    cap is fixed at the cap and the rest is re-apportioned over the other
    segments in proportion to their lengths, until no quota exceeds its cap
    (a capped proportional apportionment). Deterministic: ties go to the
    earlier segment.
    """
    lengths = [int(n) for n in segment_lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"segment lengths must be a non-empty list of positive integers, got {list(segment_lengths)}")
    if n_remove < 0:
        raise ValueError(f"n_remove must be >= 0, got {n_remove}")
    capacity = sum(n - 1 for n in lengths)
    if n_remove > capacity:
        k = len(lengths)
        raise UserError(
            f"cannot remove {n_remove} of {sum(lengths)} units with {k} segments: every segment keeps one unit, "
            f"so at most {capacity} can go; use fewer segments (--segments) or remove fewer units"
        )
    counts = [0] * len(lengths)
    active = list(range(len(lengths)))
    left = n_remove
    while True:
        active_length = sum(lengths[s] for s in active)
        # Quota above cap <=> left * length_s / active_length > length_s - 1.
        over = [s for s in active if left * lengths[s] > (lengths[s] - 1) * active_length]
        if not over:
            break
        for s in over:
            counts[s] = lengths[s] - 1
            left -= counts[s]
        active = [s for s in active if s not in over]
    # With every quota within its cap, a floored quota plus one stays within it.
    for s, share in zip(active, _largest_remainder(left, [lengths[s] for s in active])):
        counts[s] = share
    return counts


def choose_removals(segment_ids: Sequence[int], importance: Sequence[float], counts: Sequence[int]) -> list[int]:
    """Indices (sorted) of the `counts[s]` least important units of every segment s.

    Among equally important units the later one goes first: deeper units of
    a segment are the more redundant ones in the layer-pruning literature,
    and it keeps the rule deterministic.
    """
    ids = [int(s) for s in segment_ids]
    scores = np.asarray(importance, dtype=np.float64)
    if scores.shape != (len(ids),):
        raise ValueError(f"need one importance per unit: {len(ids)} units, importance shape {scores.shape}")
    if any(not 0 <= s < len(counts) for s in ids):
        raise ValueError(f"segment ids must be in 0..{len(counts) - 1}, got {sorted(set(ids))}")
    bad = [i for i in range(len(ids)) if not np.isfinite(scores[i])]
    if bad:
        raise UserError(
            f"the importance of units {bad} is not a finite number (NaN or Inf); "
            "check that the model and calibration data give finite outputs"
        )
    removed: list[int] = []
    for s, count in enumerate(counts):
        members = [i for i in range(len(ids)) if ids[i] == s]
        if not 0 <= count <= len(members):
            raise ValueError(f"segment {s} has {len(members)} units, cannot remove {count}")
        members.sort(key=lambda i: (scores[i], -i))
        removed.extend(members[:count])
    return sorted(removed)
