"""Graph surgery: skip removed units and drop what no longer feeds an output.

Rewiring is done with onnx-graphsurgeon; everything graph-surgeon does not
carry over (IR version, model and node metadata) is restored from the input.
"""

from __future__ import annotations

from typing import Sequence

import onnx
import onnx_graphsurgeon as gs

from ..units.discovery import PrunableUnit, shape_twin
from .gating import UNGATED_SUFFIX, baked, gate_graph, resolve_chains


def substitutions(units: Sequence[PrunableUnit]) -> dict[str, str]:
    """Exit tensor -> tensor its consumers must read instead, chains resolved:
    when unit k and k+1 both go, k+1's exit maps to k's entry."""
    return resolve_chains({unit.exit: unit.entry for unit in units})


def bypassed_prefix(model: onnx.ModelProto, units: Sequence[PrunableUnit], names: Sequence[str]
                    ) -> onnx.ModelProto | None:
    """A model computing `names` of `model` with `units` bypassed, and
    nothing after them: the graph's prefix read through the bypasses
    (`runtime.prefix_model` renames), without rewriting the whole graph as
    `remove_units` does. None where a unit has companions (its bypass also
    rewires scales and zero points) or the graph cannot be cut there."""
    from ..graph.runtime import prefix_model

    if any(u.companions for u in units):
        return None
    return prefix_model(model, names, renames=substitutions(units))


def remove_units(model: onnx.ModelProto, units: Sequence[PrunableUnit]) -> onnx.ModelProto:
    """Return a new model in which every unit in `units` is skipped.

    The removal is the gated graph (`gating.gate_graph`, the one bypass)
    with every gate set: readers of a unit's exit read its entry (and its
    companions' entry sides); graph outputs and inputs that belong only to
    removed units (a decoder layer's KV cache) are dropped; every other
    input and output keeps its name, dtype and shape. The opset, IR version
    and metadata of `model` are kept.
    """
    owned_outputs = {o for u in units for o in u.owned_outputs}
    owned_inputs = {i for u in units for i in u.owned_inputs}
    graph = gs.import_onnx(model)
    gates = gate_graph(graph, units)
    subs = baked(graph)
    tensors = graph.tensors()
    # Readers inside If/Loop/Scan bodies read the outer tensors too.
    for node in [n for g in [graph, *graph.subgraphs(recursive=True)] for n in g.nodes]:
        for k, tensor in enumerate(node.inputs):
            if tensor.name in subs:
                node.inputs[k] = tensors[subs[tensor.name]]

    outputs = []
    for out in graph.outputs:
        if out.name in owned_outputs:
            continue
        if out.name in subs:
            # The output keeps its name: detach it from the removed block and
            # feed it from the unit's entry through an Identity.
            out.inputs.clear()
            graph.nodes.append(gs.Node(op="Identity", name=f"sglp_skip/{out.name}",
                                       inputs=[tensors[subs[out.name]]], outputs=[out]))
        outputs.append(out)
    graph.outputs = outputs
    gate_names = set(gates)
    graph.inputs = [i for i in graph.inputs if i.name not in gate_names]

    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    # A removed unit's last node may live on for another of its outputs:
    # its exit gets its own name back.
    for node in graph.nodes:
        for tensor in node.outputs:
            if tensor.name.endswith(UNGATED_SUFFIX):
                tensor.name = tensor.name[: -len(UNGATED_SUFFIX)]
    _redirect_shape_reads(model, graph, owned_inputs)
    still_read = {t.name for node in graph.nodes for t in node.inputs}
    still_read |= {t.name for t in graph.outputs}
    graph.inputs = [i for i in graph.inputs if i.name not in owned_inputs or i.name in still_read]

    pruned = gs.export_onnx(graph, do_type_check=False)
    _restore_initializer_inputs(model, pruned)
    return _restore_model_fields(model, pruned)


def _restore_initializer_inputs(original: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    """Graph inputs that are also initializers (weights a caller may override,
    as some exporters write them) are part of the signature: graph-surgeon
    drops them from the inputs, so the kept ones are put back in their
    original order. One that only removed units read went with them (see
    `dropped_weight_inputs`)."""
    weights = {i.name for i in original.graph.initializer}
    kept = {i.name for i in pruned.graph.initializer}
    overridable = [vi for vi in original.graph.input if vi.name in weights and vi.name in kept]
    if not overridable:
        return
    current = {vi.name: vi for vi in pruned.graph.input}
    for vi in overridable:
        current.setdefault(vi.name, vi)
    order = [vi.name for vi in original.graph.input]
    inputs = [current[name] for name in order if name in current]
    inputs += [vi for name, vi in current.items() if name not in order]
    copies = [onnx.ValueInfoProto() for _ in inputs]
    for copy, vi in zip(copies, inputs):
        copy.CopyFrom(vi)
    del pruned.graph.input[:]
    pruned.graph.input.extend(copies)


def dropped_weight_inputs(original: onnx.ModelProto, pruned: onnx.ModelProto) -> set[str]:
    """Graph inputs of `original` that are also initializers and that no node
    of `pruned` reads any more (only removed units did): they leave the
    signature with their units, and the report lists them as removed."""
    weights = {i.name for i in original.graph.initializer}
    kept = {i.name for i in pruned.graph.initializer}
    return {vi.name for vi in original.graph.input if vi.name in weights and vi.name not in kept}


def _redirect_shape_reads(model: onnx.ModelProto, graph: gs.Graph, owned_inputs: set[str]) -> None:
    """Nodes that still read a dropped input need only its shape (unit discovery
    checked that, see `units.read_for_shape_only`): they read a kept input
    declared with the same shape instead (the past length of a removed
    decoder layer's KV cache equals every other layer's)."""
    read = {t.name for node in graph.nodes for t in node.inputs}
    tensors = graph.tensors()
    for name in sorted(owned_inputs & read):
        twin = shape_twin(model, name, owned_inputs)
        if twin is None or twin not in tensors:
            continue  # the input stays; validation reports the changed signature
        for node in graph.nodes:
            for k, tensor in enumerate(node.inputs):
                if tensor.name == name:
                    node.inputs[k] = tensors[twin]


def _restore_model_fields(original: onnx.ModelProto, pruned: onnx.ModelProto) -> onnx.ModelProto:
    # The kept inputs and outputs keep their declared types exactly (graphsurgeon
    # lets a value_info entry of the same name, without a shape, replace them:
    # ONNX Runtime's float16 converter writes such entries).
    declared = {vi.name: vi.type for vi in list(original.graph.input) + list(original.graph.output)}
    for vi in list(pruned.graph.input) + list(pruned.graph.output):
        if vi.name in declared:
            vi.type.CopyFrom(declared[vi.name])
    pruned.ir_version = original.ir_version
    del pruned.opset_import[:]
    pruned.opset_import.extend(original.opset_import)
    pruned.producer_name = original.producer_name
    pruned.producer_version = original.producer_version
    pruned.domain = original.domain
    pruned.model_version = original.model_version
    pruned.doc_string = original.doc_string
    del pruned.metadata_props[:]
    pruned.metadata_props.extend(original.metadata_props)
    if original.functions and not pruned.functions:
        pruned.functions.extend(original.functions)
    pruned.graph.name = original.graph.name
    node_metadata = {n.name: n.metadata_props for n in original.graph.node if n.name and n.metadata_props}
    for node in pruned.graph.node:
        props = node_metadata.get(node.name)
        if props is not None and not node.metadata_props:
            node.metadata_props.extend(props)
    return pruned
