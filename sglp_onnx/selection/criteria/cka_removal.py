"""CKA removal (Pons, Yamamoto, Costa, Jordao, "Effective Layer Pruning Through
Similarity Metric Perspective", ICPR 2024, arXiv 2405.17081): greedily bypass
the unit whose removal keeps the network's final representation most similar,
by linear CKA, to the original network's.

Candidate networks are never written out: they run through the gated graph
of `gating.py`. A candidate differs from the current greedy network only from
the unit it bypasses on, so it is run as a *suffix* from that unit, fed with
the current network's value of the unit's entry (captured by one full run per
greedy step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from ...errors import UserError
from ...evidence.gated_runner import GatedRunner, ReferenceOutputs
from ...graph.index import GraphIndex, is_weighted_head, walk_back
from ...evidence.activations import as_samples
from ...evidence.similarity import MinibatchCKA
from ...graph.ops import CONV_OPS, LINEAR_OPS
from ...evidence import Context
from .base import Criterion, Selection, register

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


class GreedyCKA:
    """Runs the greedy search step by step; `extend(n)` makes the order n long."""

    def __init__(self, ctx: Context, *, use_suffix: bool = True) -> None:
        ctx.require_calibration("--criterion cka-removal")
        self.ctx = ctx
        self.units = list(ctx.units)
        rep, rule = final_representation(ctx.model, ctx.output_kind().output)
        self.state = GreedyState(representation=rep, representation_rule=rule)
        self.runner = GatedRunner(ctx.model, self.units, [rep], provider=ctx.provider)
        self.use_suffix = use_suffix
        self.references = ReferenceOutputs(self.runner, rep, transform=self._rows)
        self.rows: int | None = None

    # -- running networks ------------------------------------------------
    def _rows(self, value: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
        calib = self.ctx.calib
        mask_name = calib.token_mask_name
        mask = feed.get(mask_name) if mask_name else None
        return as_samples(value, token_level=calib.is_token_data, token_mask=mask)

    def _run_full(self, feed: dict[str, np.ndarray], removed: set[int], *, entries: bool) -> dict[str, np.ndarray]:
        return self.runner.run(feed, removed, entries=entries)

    def _run_candidate(self, feed, removed: set[int], unit: int, current: dict[str, np.ndarray]) -> np.ndarray:
        if not self.use_suffix:
            return self._run_full(feed, removed | {unit}, entries=False)[self.state.representation]
        return self.runner.run_extension(feed, removed, unit, current)[self.state.representation]

    # -- one greedy step ---------------------------------------------------
    def _batches(self, label: str):
        # A run holds every unit entry, the representation (the reference's,
        # the candidate's) and its rows: within the activation budget.
        if self.rows is None:
            self.rows = self.ctx.rows([u.entry for u in self.units], copies={self.state.representation: 4})
        batches = self.ctx.calib.batches(self.rows)
        return self.ctx.progress(batches, label) if self.ctx.progress else batches

    def step(self) -> None:
        state = self.state
        removed = set(state.order)
        candidates = [k for k in range(len(self.units)) if k not in removed]
        accumulators = {k: MinibatchCKA(2) for k in candidates}
        self.references.start(removed)
        for b, (feed, _) in enumerate(self._batches(f"cka-removal step {len(state.order) + 1}")):
            current = self._run_full(feed, removed, entries=self.use_suffix)
            reference = self.references.get(b, feed, current)
            for k in candidates:
                rows = self._rows(self._run_candidate(feed, removed, k, current), feed)
                accumulators[k].update([reference, rows])
        self.references.end()
        recomputed = self.references.recomputed
        state.full_passes += 1 + recomputed
        if self.use_suffix:
            state.suffix_passes += len(candidates)
        else:
            state.full_passes += len(candidates)
        scores = {k: float(acc.result()[0, 1]) for k, acc in accumulators.items()}
        # Highest similarity goes; ties go to the later unit (as in `lowest`).
        best = max(candidates, key=lambda k: (scores[k], k))
        if not removed:
            state.single_cka = [scores[k] for k in range(len(self.units))]
        state.order.append(best)
        state.step_cka.append(scores[best])

    def extend(self, n: int) -> GreedyState:
        start = time.perf_counter()
        while len(self.state.order) < n:
            self.step()
        self.state.seconds += time.perf_counter() - start
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
