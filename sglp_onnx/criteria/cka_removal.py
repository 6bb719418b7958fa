"""CKA removal (Pons, Yamamoto, Costa, Jordao, "Effective Layer Pruning Through
Similarity Metric Perspective", ICPR 2024, arXiv 2405.17081): greedily bypass
the unit whose removal keeps the network's final representation most similar,
by linear CKA, to the original network's.

Candidate networks are never written out. One *gated* copy of the graph reads,
after every unit, `Where(skip_u, entry_u, exit_u)` with a boolean input
`skip_u`, so a single ONNX Runtime session runs the original, the current
greedy network and every candidate. A candidate differs from the current
network only from the unit it bypasses on, so it is run as a *suffix*: a
session that starts at that unit's exit, fed with the current network's value
of the unit's entry (captured by one full run per greedy step).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from ..errors import UserError
from ..graph_index import GraphIndex
from ..representations import as_samples
from ..runtime import make_session, session_with_outputs
from ..similarity import MinibatchCKA
from ..units import PrunableUnit
from .base import Context, Criterion, Selection, register

# Ops that can be the classifier or LM head: the tensor they read (besides
# their weights) is the network's final representation.
HEAD_OPS = {"Gemm", "MatMul", "Conv", "FusedGemm", "FusedMatMul", "FusedConv"}
GATE_PREFIX = "sglp_skip."
# The original network's final representation is kept in memory across
# greedy steps up to this size; above it, it is recomputed every step.
REFERENCE_CACHE_BYTES = 256 * 2**20


def final_representation(model: onnx.ModelProto) -> tuple[str, str]:
    """The tensor whose similarity to the original's decides, and how it was found.

    Pons et al. compare the representations the classifier reads. Found
    structurally: walking back from the first graph output, the nearest
    Gemm/MatMul/Conv that has exactly one computed input and a constant
    (weight) input is the head; its computed input is the representation
    (ResNets: the pooled, flattened features; LMs: the final norm's output,
    one row per token). A graph with no such node falls back to the first
    output itself (the logits).
    """
    index = GraphIndex(model)
    first = model.graph.output[0].name
    queue = deque([first])
    seen: set[int] = set()
    while queue:
        p = index.producer.get(queue.popleft())
        if p is None or p in seen:
            continue
        seen.add(p)
        node = index.nodes[p]
        computed = [t for t in node.input if t and not index.is_constant(t)]
        if node.op_type in HEAD_OPS and len(computed) == 1 and len(computed) < len([t for t in node.input if t]):
            return computed[0], f"input of the head node {node.name or node.op_type} ({node.op_type})"
        queue.extend(computed)
    return first, f"first graph output {first!r} (no Gemm/MatMul/Conv head found)"


def gated_model(model: onnx.ModelProto, units: Sequence[PrunableUnit]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` where unit u's exit is `Where(skip_u, entry_u, exit_u)`.

    `skip_u` is a new boolean scalar input per unit (names returned in unit
    order). Every tensor keeps its name: the unit's own result is renamed and
    the Where node produces the exit, so consumers, graph outputs and chained
    units (a unit whose entry is the previous exit) need no rewiring. With all
    gates false the network is the original; with gates set it computes what
    `surgery.remove_units` would produce.
    """
    gated = onnx.ModelProto()
    gated.CopyFrom(model)
    graph = gated.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    gates = []
    after: dict[int, list[onnx.NodeProto]] = {}
    for k, unit in enumerate(units):
        i = producer.get(unit.exit)
        if i is None:
            raise UserError(f"unit {unit.name}: its exit {unit.exit!r} is not computed by a node")
        node = graph.node[i]
        inner = f"{unit.exit}/sglp_ungated"
        node.output[list(node.output).index(unit.exit)] = inner
        gate = f"{GATE_PREFIX}{k}"
        gates.append(gate)
        graph.input.append(helper.make_tensor_value_info(gate, TensorProto.BOOL, []))
        after.setdefault(i, []).append(
            helper.make_node("Where", [gate, unit.entry, inner], [unit.exit], name=f"sglp_gate/{k}"))
    # Keep the node list topologically sorted: each Where right after the
    # node whose output it gates.
    nodes = []
    for i, node in enumerate(graph.node):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes.append(copy)
        nodes.extend(after.get(i, ()))
    del graph.node[:]
    graph.node.extend(nodes)
    return gated, gates


def suffix_model(gated: onnx.ModelProto, start: str, start_dtype: np.dtype, outputs: Sequence[str]) -> onnx.ModelProto:
    """The part of `gated` that computes `outputs` from tensor `start` (made a graph input).

    Nodes only the replaced prefix needed are dropped; nodes that later parts
    still read from the original inputs (masks, positions) stay.
    """
    graph = gs.import_onnx(gated)
    tensors = graph.tensors()
    entry = tensors[start]
    entry.inputs.clear()
    entry.dtype = start_dtype
    entry.shape = None
    graph.inputs.append(entry)
    graph.outputs = [tensors[name] for name in outputs]
    graph.cleanup(remove_unused_graph_inputs=True).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = gated.ir_version
    del model.opset_import[:]
    model.opset_import.extend(gated.opset_import)
    return model


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
        if ctx.calib is None:
            raise UserError("--criterion cka-removal needs calibration data: pass --calib CALIB.npz "
                            "or put MODEL.calib.npz beside the model")
        self.ctx = ctx
        self.units = list(ctx.units)
        rep, rule = final_representation(ctx.model)
        self.state = GreedyState(representation=rep, representation_rule=rule)
        self.gated, self.gates = gated_model(ctx.model, self.units)
        # One session for every full run: the representation plus every
        # unit's entry (what the partial runs start from).
        self.exposed = [rep] + [n for n in dict.fromkeys(u.entry for u in self.units) if n != rep]
        self.full = session_with_outputs(self.gated, self.exposed, ctx.provider)
        self.full_inputs = {i.name for i in self.full.get_inputs()}
        self.use_suffix = use_suffix
        self._suffix: dict[int, object] = {}
        self._reference: list[np.ndarray] | None = None

    # -- running networks ------------------------------------------------
    def _gate_feed(self, removed: set[int]) -> dict[str, np.ndarray]:
        return {g: np.array(k in removed) for k, g in enumerate(self.gates)}

    def _rows(self, value: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
        calib = self.ctx.calib
        mask_name = calib.token_mask_name
        mask = feed.get(mask_name) if mask_name else None
        return as_samples(value, token_level=calib.is_token_data, token_mask=mask)

    def _run_full(self, feed: dict[str, np.ndarray], removed: set[int], *, entries: bool) -> dict[str, np.ndarray]:
        names = self.exposed if entries else [self.state.representation]
        run_feed = {**{k: v for k, v in feed.items() if k in self.full_inputs}, **self._gate_feed(removed)}
        return dict(zip(names, self.full.run(names, run_feed)))

    def _suffix_session(self, unit: int, dtype: np.dtype):
        if unit not in self._suffix:
            model = suffix_model(self.gated, self.units[unit].exit, dtype, [self.state.representation])
            session = make_session(model, self.ctx.provider)
            self._suffix[unit] = (session, {i.name for i in session.get_inputs()})
        return self._suffix[unit]

    def _run_candidate(self, feed, removed: set[int], unit: int, current: dict[str, np.ndarray]) -> np.ndarray:
        if not self.use_suffix:
            return self._run_full(feed, removed | {unit}, entries=False)[self.state.representation]
        entry_value = current[self.units[unit].entry]
        session, inputs = self._suffix_session(unit, entry_value.dtype)
        run_feed = {**feed, **self._gate_feed(removed), self.units[unit].exit: entry_value}
        return session.run([self.state.representation], {k: v for k, v in run_feed.items() if k in inputs})[0]

    # -- one greedy step ---------------------------------------------------
    def _batches(self, label: str):
        batches = self.ctx.calib.batches(self.ctx.batch_size)
        return self.ctx.progress(batches, label) if self.ctx.progress else batches

    def step(self) -> None:
        state = self.state
        removed = set(state.order)
        candidates = [k for k in range(len(self.units)) if k not in removed]
        accumulators = {k: MinibatchCKA(2) for k in candidates}
        reference_rows: list[np.ndarray] | None = [] if self._reference is None and not removed else None
        reference_bytes = 0
        recomputed = False
        for b, (feed, _) in enumerate(self._batches(f"cka-removal step {len(state.order) + 1}")):
            current = self._run_full(feed, removed, entries=self.use_suffix)
            if not removed:
                reference = self._rows(current[state.representation], feed)
            elif self._reference is not None:
                reference = self._reference[b]
            else:
                reference = self._rows(self._run_full(feed, set(), entries=False)[state.representation], feed)
                recomputed = True
            if reference_rows is not None:
                reference_bytes += reference.nbytes
                if reference_bytes <= REFERENCE_CACHE_BYTES:
                    reference_rows.append(reference)
                else:  # too large to keep: recomputed in later steps instead
                    reference_rows = None
            for k in candidates:
                rows = self._rows(self._run_candidate(feed, removed, k, current), feed)
                accumulators[k].update([reference, rows])
        if reference_rows is not None:
            self._reference = reference_rows
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
