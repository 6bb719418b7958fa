"""Ablation of SGLP: GradNorm ranking over the whole network, no segments."""

from ...evidence import Context
from .base import Criterion, Selection, lowest, register


@register
class GlobalGradNorm(Criterion):
    name = "gradnorm"
    summary = "remove the units with the smallest GradNorm over the whole network"
    needs_calibration = True
    needs_torch = True

    def select(self, ctx: Context, n_remove: int) -> Selection:
        scores = ctx.gradnorm(self.name)
        return Selection(removed=lowest(scores, n_remove), importance=[float(v) for v in scores],
                         importance_kind="GradNorm", passes={"forward": 1, "backward": 1})
