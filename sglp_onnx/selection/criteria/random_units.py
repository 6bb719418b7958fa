"""Baseline: remove N units drawn at random with `--seed`."""

import numpy as np

from ...evidence import Context
from .base import Criterion, Selection, register


@register
class RandomUnits(Criterion):
    name = "random"
    summary = "remove N units drawn uniformly at random (seeded by --seed)"
    needs_calibration = False

    def select(self, ctx: Context, n_remove: int) -> Selection:
        rng = np.random.default_rng(ctx.seed)
        chosen = rng.choice(len(ctx.units), size=n_remove, replace=False)
        return Selection(removed=sorted(int(i) for i in chosen), notes=[f"random seed {ctx.seed}"])
