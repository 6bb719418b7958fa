"""Baseline: remove the last N units."""

from ...evidence import Context
from .base import Criterion, Selection, register


@register
class LastUnits(Criterion):
    name = "last"
    summary = "remove the last N units (no data needed)"
    needs_calibration = False

    def select(self, ctx: Context, n_remove: int) -> Selection:
        n = len(ctx.units)
        return Selection(removed=list(range(n - n_remove, n)))
