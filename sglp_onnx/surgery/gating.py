"""Running removal sets without writing them: the gated graph.

One *gated* copy of the graph reads, after every unit, `Where(skip_u,
entry_u, exit_u)` with a boolean input `skip_u`, so a single ONNX Runtime
session runs the original network and any removal set (all gates false: the
original; gates set: what `surgery.remove_units` writes). A network that
differs from a known one only from unit u on is run as a *suffix*: a session
that starts at u's exit, fed with the known network's value of u's entry.
Measured-damage and similarity criteria, and the fidelity in every report,
run their candidates through this module.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from ..errors import UserError
from ..graph.runtime import make_session, session_with_outputs
from ..units.discovery import PrunableUnit

GATE_PREFIX = "sglp_skip."


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


class GatedRunner:
    """Runs the original network, any removal set, and single-unit extensions of one.

    `targets` are the tensors the caller scores (a representation, the first
    graph output). A full run returns them and, with `entries`, every unit's
    entry: what a suffix run of a candidate unit starts from.
    """

    def __init__(self, model: onnx.ModelProto, units: Sequence[PrunableUnit], targets: Sequence[str], *,
                 provider: str = "cpu") -> None:
        self.units = list(units)
        self.targets = list(dict.fromkeys(targets))
        self.provider = provider
        self.gated, self.gates = gated_model(model, self.units)
        self.exposed = self.targets + [n for n in dict.fromkeys(u.entry for u in self.units)
                                       if n not in self.targets]
        self.full = session_with_outputs(self.gated, self.exposed, provider)
        self.full_inputs = {i.name for i in self.full.get_inputs()}
        self._suffix: dict[int, tuple[object, set[str]]] = {}

    def gate_feed(self, removed: set[int] | frozenset[int]) -> dict[str, np.ndarray]:
        return {g: np.array(k in removed) for k, g in enumerate(self.gates)}

    def run(self, feed: dict[str, np.ndarray], removed, *, entries: bool = False) -> dict[str, np.ndarray]:
        """Targets (and unit entries) of the network with `removed` bypassed."""
        names = self.exposed if entries else self.targets
        run_feed = {**{k: v for k, v in feed.items() if k in self.full_inputs}, **self.gate_feed(set(removed))}
        return dict(zip(names, self.full.run(names, run_feed)))

    def _suffix_session(self, unit: int, dtype: np.dtype):
        if unit not in self._suffix:
            model = suffix_model(self.gated, self.units[unit].exit, dtype, self.targets)
            session = make_session(model, self.provider)
            self._suffix[unit] = (session, {i.name for i in session.get_inputs()})
        return self._suffix[unit]

    def run_extension(self, feed: dict[str, np.ndarray], removed, unit: int,
                      current: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Targets with `removed | {unit}` bypassed, from `current` (a full run of
        `removed` with entries): a partial pass from `unit` on."""
        entry_value = current[self.units[unit].entry]
        session, inputs = self._suffix_session(unit, entry_value.dtype)
        run_feed = {**feed, **self.gate_feed(set(removed)), self.units[unit].exit: entry_value}
        values = session.run(self.targets, {k: v for k, v in run_feed.items() if k in inputs})
        return dict(zip(self.targets, values))
