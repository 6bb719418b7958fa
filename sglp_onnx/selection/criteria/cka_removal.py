"""CKA removal (Pons, Yamamoto, Costa, Jordao, "Effective Layer Pruning Through
Similarity Metric Perspective", ICPR 2024, arXiv 2405.17081): greedily bypass
the unit whose removal keeps the network's final representation most similar,
by linear CKA, to the original network's.

The greedy search is `search.GreedySearch` (shared with the measured-damage
criteria) scoring by `CKAMeasure`: every candidate on every calibration
sample, in the file's order, each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ...errors import UserError
from ...evidence import gated_runner
from ...evidence.gated_runner import GatedRunner
from ...graph.index import GraphIndex, is_weighted_head, walk_back
from ...evidence.activations import as_samples
from ...graph.runtime import feed_rows
from ...evidence.similarity import MinibatchCKA
from ...graph.ops import CONV_OPS, LINEAR_OPS
from ...evidence import Context
from .base import Criterion, Selection, register
from .search import GreedySearch, Measure, RunCache, Schedule

# Ops that can be the classifier or LM head: the tensor they read (besides
# their weights) is the network's final representation.
HEAD_OPS = LINEAR_OPS | CONV_OPS


def final_representation(model: onnx.ModelProto, output: str | None = None) -> tuple[str, str]:
    """The tensor whose similarity to the original's decides, and how it was found.

    Pons et al. compare the representations the classifier reads. Found
    structurally: walking back from the first graph output, the nearest
    Gemm/MatMul/Conv that has exactly one computed input and a constant
    (weight) input is the head; its computed input is the representation
    (ResNets: the pooled, flattened features; LMs: the final norm's output,
    one row per token). A graph with no such node falls back to the first
    output itself (the logits). `output`: the graph output to walk back from
    instead of the first (the scored one, `fidelity.output_kind`, when the
    first is integer class ids).
    """
    first = output or model.graph.output[0].name

    def visit(node, computed):
        if is_weighted_head(node, computed, HEAD_OPS):
            return computed[0], f"input of the head node {node.name or node.op_type} ({node.op_type})"
        return computed

    found = walk_back(GraphIndex(model), first, visit)
    return found or (first, f"graph output {first!r} (no Gemm/MatMul/Conv head found)")


class CKAMeasure(Measure):
    """Minibatch linear CKA between the rows of the original's final
    representation and the candidate's (`MinibatchCKA`: the result depends on
    the pieces the samples come in): the highest similarity goes."""

    higher = True

    def __init__(self, ctx: Context, representation: str) -> None:
        self.target = representation
        self.calib = ctx.calib

    def reference(self, value: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
        return as_samples(value, token_level=self.calib.is_token_data, token_mask=self.calib.token_mask(feed),
                          samples=feed_rows(feed))

    def meter(self) -> MinibatchCKA:
        return MinibatchCKA(2)

    def update(self, meter, reference, value, feed, prepared) -> None:
        meter.update([reference, self.reference(value, feed)])

    def score(self, meter) -> float:
        return float(meter.result()[0, 1])


@dataclass
class GreedyState:
    """The greedy removal order found so far on one context."""

    representation: str
    representation_rule: str
    order: list[int] = field(default_factory=list)
    step_cka: list[float] = field(default_factory=list)  # CKA after removing order[:k+1]
    single_cka: list[float] | None = None  # each unit bypassed alone (step 1)
    full_passes: int = 0
    suffix_passes: int = 0
    seconds: float = 0.0


class GreedyCKA(GreedySearch):
    """The greedy search by CKA: every remaining unit on every calibration
    sample each step, in the file's order, in runs of the activation budget;
    the original's representation rows kept across steps where they all fit
    `REFERENCE_CACHE_BYTES` (else recomputed each step, a whole pass).
    `extend(n)` makes the order n long and returns its `GreedyState`."""

    label = "cka-removal"

    def __init__(self, ctx: Context, *, use_suffix: bool = True) -> None:
        ctx.require_calibration("--criterion cka-removal")
        rep, self.representation_rule = final_representation(ctx.model, ctx.output_kind().output)
        runner = GatedRunner(ctx.model, list(ctx.units), [rep], provider=ctx.provider)
        # A run holds every unit entry, the representation (the reference's,
        # the candidate's) and its rows: within the activation budget.
        rows = ctx.rows([u.entry for u in ctx.units], copies={rep: 4})
        super().__init__(ctx, CKAMeasure(ctx, rep), Schedule(shuffle=False, grouped=False, suffix=use_suffix),
                         runner, rows=rows, references=RunCache(gated_runner.REFERENCE_CACHE_BYTES, whole=True))

    @property
    def state(self) -> GreedyState:
        # Every step runs whole passes (the references recomputed all or none): counted whole.
        return GreedyState(representation=self.measure.target, representation_rule=self.representation_rule,
                           order=self.order, step_cka=self.scores, single_cka=self.single,
                           full_passes=round(self.full_passes), suffix_passes=round(self.partial_passes),
                           seconds=self.seconds)

    def extend(self, n: int) -> GreedyState:
        super().extend(n)
        return self.state


@register
class CKARemoval(Criterion):
    name = "cka-removal"
    summary = "Pons et al. 2024: greedily remove the unit whose bypass keeps the final representation most similar"
    needs_calibration = True

    def select(self, ctx: Context, n_remove: int) -> Selection:
        L = len(ctx.units)
        if n_remove >= L:
            raise UserError(f"cannot remove {n_remove} of {L} units: at least one unit must stay")
        if n_remove <= 0:
            return Selection(removed=[], notes=["cka-removal: nothing to remove, no forward pass run"])
        search = ctx.cache.get(self.name)
        if search is None:
            search = ctx.cache[self.name] = GreedyCKA(ctx)
        state = search.extend(n_remove)
        order = state.order[:n_remove]
        passes = state.full_passes + state.suffix_passes
        notes = [
            f"cka-removal compares the final representation: {state.representation_rule}",
            "cka-removal greedy order (CKA with the original after each removal): "
            + ", ".join(f"{ctx.units[k].name} {c:.4f}" for k, c in zip(order, state.step_cka)),
            f"cka-removal: {passes} forward passes over the calibration set for {len(state.order)} greedy steps "
            f"({state.full_passes} full, {state.suffix_passes} partial: from the bypassed unit to the "
            f"representation), {state.seconds:.1f} s",
        ]
        return Selection(
            removed=sorted(order),
            importance=[1.0 - c for c in state.single_cka],
            importance_kind="1 - CKA(original, network without this unit alone) of the final representation",
            notes=notes,
            passes={"forward": passes, "forward_full": state.full_passes, "forward_partial": state.suffix_passes},
        )
