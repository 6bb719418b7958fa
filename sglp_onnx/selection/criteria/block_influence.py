"""ShortGPT's block influence (Men et al. 2024): BI = 1 - cos(unit input,
unit output) averaged over samples or tokens; the lowest-BI units go."""

from ...evidence import Context
from .base import Criterion, Selection, lowest, register


@register
class BlockInfluence(Criterion):
    name = "block-influence"
    summary = "ShortGPT: remove the units whose output is most parallel to their input"

    def select(self, ctx: Context, n_remove: int) -> Selection:
        influence = ctx.evidence().block_influence
        return Selection(removed=lowest(influence, n_remove), importance=[float(v) for v in influence],
                         importance_kind="block influence 1 - cos(entry, exit)", passes={"forward": 1})
