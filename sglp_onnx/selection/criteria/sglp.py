"""SGLP (Li, Lu et al., arXiv 2410.14720): CKA similarity -> Fisher optimal
segmentation -> in each segment, remove the least important units.

Importance is GradNorm on the paired torch model. Without one, the
gradient-free stand-in is 1 - CKA(entry, exit): how much the unit changes
the representation, measured in the same calibration pass (see README).
"""

from ..allocation import allocate, choose_removals
from ...errors import UserError
from ..segmentation import choose_k, fisher_segments, loss_curve, segments_of
from ...evidence import Context
from .base import Criterion, Selection, register


@register
class SGLP(Criterion):
    name = "sglp"
    uses_segments = True
    summary = "SGLP: CKA + Fisher segmentation, GradNorm inside each segment (default)"

    def select(self, ctx: Context, n_remove: int) -> Selection:
        evidence = ctx.evidence()
        L = len(ctx.units)
        k_max = max(1, L - n_remove)
        curve = loss_curve(evidence.cka, min(k_max, L))
        if ctx.segments is not None:
            k = ctx.segments
            if not 1 <= k <= L:
                raise UserError(f"--segments must be between 1 and the number of units ({L}), got {k}")
            if L - k < n_remove:
                raise UserError(f"--segments {k} keeps at least one unit per segment, so at most {L - k} of "
                                f"{L} units can go, not {n_remove}; use fewer segments or remove fewer units")
            rule = f"K = {k} given by --segments"
        else:
            k, rule = choose_k(curve, k_max=min(k_max, L))
        segmentation = fisher_segments(evidence.cka, k)
        notes = []
        # One forward pass over the calibration set measured every CKA; GradNorm
        # adds one forward and backward pass of the paired torch model.
        passes = {"forward": 1}
        if ctx.has_torch_model:
            importance = ctx.gradnorm(self.name)
            kind = "GradNorm"
            passes = {"forward": 2, "backward": 1}
        else:
            importance = 1.0 - evidence.entry_exit_cka
            kind = "1 - CKA(entry, exit) (gradient-free: no --torch-model given)"
            notes.append("no paired torch model: importance is the gradient-free 1 - CKA(entry, exit)")
        lengths = [stop - start for start, stop in segmentation.bounds]
        counts = allocate(lengths, n_remove)
        removed = choose_removals(segments_of(segmentation.bounds), importance, counts)
        return Selection(
            removed=removed,
            importance=[float(v) for v in importance],
            importance_kind=kind,
            segments=[tuple(b) for b in segmentation.bounds],
            k_curve=[float(v) for v in curve],
            k_rule=rule,
            notes=notes + [f"sglp: {passes['forward']} forward and {passes.get('backward', 0)} backward passes "
                           "over the calibration set"],
            passes=passes,
        )
