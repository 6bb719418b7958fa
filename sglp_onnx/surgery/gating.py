"""The gated graph: removal sets as graph inputs instead of rewrites.

One *gated* copy of the graph reads, after every unit, `Where(skip_u,
entry_u, exit_u)` with a boolean input `skip_u`, so a single ONNX Runtime
session runs the original network and any removal set (all gates false: the
original; gates set: what `surgery.remove_units` writes). A network that
differs from a known one only from unit u on is run as a *suffix*: a session
that starts at u's exit, fed with the known network's value of u's entry.
This module builds these graphs; `evidence.gated_runner` runs them (the
measured-damage and similarity criteria, and the fidelity in every report).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UserError
from ..graph.runtime import needed_nodes
from ..units.discovery import PrunableUnit

GATE_PREFIX = "sglp_skip."
GATE_NODE = "sglp_gate"  # unit k's gate node is named GATE_NODE/k (its companions' GATE_NODE/k/NAME)
UNGATED_SUFFIX = "/sglp_ungated"
GATED_SUFFIX = "/sglp_gated/"


def gate_graph(graph: gs.Graph, units: Sequence[PrunableUnit]) -> list[str]:
    """Gate every unit of `graph` in place: unit u's exit becomes `Where(skip_u, entry_u, exit_u)`.

    This is the one bypass: the gated model runs removal sets without writing
    them, and `surgery.remove_units` writes a removal by gating and then
    fixing every gate. `skip_u` is a new boolean scalar input per unit (names
    returned in unit order). Every tensor keeps its name: the unit's own
    result is renamed and the Where node produces the exit, so consumers,
    graph outputs and chained units (a unit whose entry is the previous exit)
    need no rewiring. A unit's companion pairs (a quantized exit's scale and
    zero point) are gated the same way for every node that reads them and
    is not upstream of the exit (what reads the exit, and what computes from
    them constants it reads, such as a bias requantized for its input's
    scale); a unit whose entry is another unit's exit takes that unit's
    gated companions as its entry side.
    The node list is left unsorted.
    """
    tensors = graph.tensors()
    gates = []
    gated_sides: dict[tuple[str, str], gs.Variable] = {}  # (unit exit, exit-side name) -> gated tensor
    entry_sides: list[tuple[gs.Node, str, str]] = []
    for k, unit in enumerate(units):
        exit_tensor = tensors.get(unit.exit)
        if exit_tensor is None or not exit_tensor.inputs:
            raise UserError(f"unit {unit.name}: its exit {unit.exit!r} is not computed by a node")
        upstream = _upstream(exit_tensor) if unit.companions else set()
        producer = exit_tensor.inputs[0]
        gate = gs.Variable(f"{GATE_PREFIX}{k}", dtype=np.bool_, shape=[])
        graph.inputs.append(gate)
        gates.append(gate.name)
        inner = gs.Variable(f"{unit.exit}{UNGATED_SUFFIX}", dtype=exit_tensor.dtype, shape=exit_tensor.shape)
        producer.outputs[producer.outputs.index(exit_tensor)] = inner
        graph.nodes.append(gs.Node("Where", name=f"{GATE_NODE}/{k}", inputs=[gate, tensors[unit.entry], inner],
                                   outputs=[exit_tensor]))
        for exit_side, entry_side in unit.companions:
            original = tensors[exit_side]
            gated = gs.Variable(f"{exit_side}{GATED_SUFFIX}{k}", dtype=original.dtype, shape=original.shape)
            where = gs.Node("Where", name=f"{GATE_NODE}/{k}/{exit_side}",
                            inputs=[gate, tensors[entry_side], original], outputs=[gated])
            graph.nodes.append(where)
            gated_sides[(unit.exit, exit_side)] = gated
            entry_sides.append((where, unit.entry, entry_side))
            for reader in list(original.outputs):
                if reader is where or id(reader) in upstream:
                    continue
                for pos, tensor in enumerate(reader.inputs):
                    if tensor is original:
                        reader.inputs[pos] = gated
    # With the previous unit bypassed too, the entry holds that unit's entry's
    # integers: its scale is the previous unit's gated one.
    for where, entry, entry_side in entry_sides:
        if (entry, entry_side) in gated_sides:
            where.inputs[1] = gated_sides[(entry, entry_side)]
    return gates


def _upstream(tensor: gs.Variable) -> set[int]:
    """Ids of the nodes `tensor` is computed from (its producer included)."""
    seen: set[int] = set()
    frontier = list(tensor.inputs)
    while frontier:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for t in node.inputs:
            frontier.extend(t.inputs)
    return seen


def gated_model(model: onnx.ModelProto, units: Sequence[PrunableUnit]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` gated by `gate_graph`, and its gate inputs in unit order.

    With all gates false the network is the original; with gates set it
    computes what `surgery.remove_units` writes.
    """
    graph = gs.import_onnx(model)
    gates = gate_graph(graph, units)
    gated = gs.export_onnx(graph.toposort(), do_type_check=False)
    gated.ir_version = model.ir_version
    del gated.opset_import[:]
    gated.opset_import.extend(model.opset_import)
    return gated, gates


def unit_gate(node: onnx.NodeProto) -> int | None:
    """k when `node` is unit k's gate (`Where(skip_k, entry, exit)` of `gate_graph`), else None."""
    parts = node.name.split("/")
    return int(parts[1]) if node.op_type == "Where" and len(parts) == 2 and parts[0] == GATE_NODE else None


# Gates on values of these types may run as arithmetic (`arithmetic_gates`).
ARITHMETIC_GATE_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64}


def arithmetic_gates(gated: onnx.ModelProto, dtypes: dict[str, int]) -> int:
    """In place, for a session only: each unit gate `Where(skip, entry,
    exit)` of `gated` whose exit is float32 or float64 (`dtypes`: tensor ->
    ONNX type, where known) becomes `exit * (1 - s) + entry * s`, `s` the
    gate cast to the exit's type. The value is the same bit for bit where
    entry and exit are finite (x * 1 + 0 and 0 + x * 1 round to x), but ONNX
    Runtime's blocked-channel (NCHWc) convolution layout runs through Mul and
    Add and stops at every Where: on a ResNet-50 at 224x224 the optimized
    gated graph had 16 layout reorders and 8 unfused Add + Relu, and a run of
    the current network took 1.57 s with Where against 1.35 s (1.26 s the
    plain model). A gate stays a Where for other types (float16 would
    overflow to inf * 0 = NaN more easily; integers have no such op) and where
    the exit's type is unknown. Returns the number of gates rewritten. The
    graph's structure (`baked`, `repair.graph.add_runtime_maps`) reads
    Where gates: this runs last, on the graph a session is made from."""
    nodes, rewritten, ones = [], 0, {}
    for node in gated.graph.node:
        np_type = ARITHMETIC_GATE_TYPES.get(dtypes.get(node.output[0] if node.output else "", 0))
        if unit_gate(node) is None or np_type is None or not node.input[0].startswith(GATE_PREFIX):
            nodes.append(node)
            continue
        elem = dtypes[node.output[0]]
        gate, entry, inner = node.input
        out, name = node.output[0], node.name
        if elem not in ones:
            ones[elem] = f"{GATE_NODE}/one_{elem}"
            gated.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1, dtype=np_type), ones[elem]))
        nodes += [
            onnx.helper.make_node("Cast", [gate], [f"{name}/s"], name=f"{name}/Cast", to=elem),
            onnx.helper.make_node("Sub", [ones[elem], f"{name}/s"], [f"{name}/keep"], name=f"{name}/Sub"),
            onnx.helper.make_node("Mul", [inner, f"{name}/keep"], [f"{name}/kept"], name=f"{name}/MulExit"),
            onnx.helper.make_node("Mul", [entry, f"{name}/s"], [f"{name}/skipped"], name=f"{name}/MulEntry"),
            onnx.helper.make_node("Add", [f"{name}/kept", f"{name}/skipped"], [out], name=f"{name}/Add"),
        ]
        rewritten += 1
    del gated.graph.node[:]
    gated.graph.node.extend(nodes)
    return rewritten


def baked(graph: gs.Graph) -> dict[str, str]:
    """Tensor -> tensor its readers read once every gate of `graph` is set:
    each gate's Where output maps to its entry input, chains resolved."""
    subs = {node.outputs[0].name: node.inputs[1].name for node in graph.nodes
            if node.op == "Where" and node.inputs[0].name.startswith(GATE_PREFIX)}
    return resolve_chains(subs)


def resolve_chains(subs: dict[str, str]) -> dict[str, str]:
    """Follow each mapping to a tensor no key maps away (a -> b -> c: a -> c)."""
    resolved = {}
    for key, source in subs.items():
        while source in subs:
            source = subs[source]
        resolved[key] = source
    return resolved


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
    # Not into subgraphs: there it would drop a Loop body's unused inputs
    # (the iteration count), which the Loop's signature needs.
    graph.cleanup(remove_unused_graph_inputs=True, recurse_subgraphs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = gated.ir_version
    del model.opset_import[:]
    model.opset_import.extend(gated.opset_import)
    return model


COPY_PREFIX = "sglp_candidate/"


def batched_suffix_model(gated: onnx.ModelProto, starts: dict[int, tuple[str, int]], outputs: Sequence[str],
                         gates: Sequence[str]) -> onnx.ModelProto | None:
    """One model holding, for each key k of `starts` = {k: (tensor, ONNX
    dtype)}, its own copy of the part of `gated` that computes `outputs`
    from that tensor (made an input): what `suffix_model` makes for one
    start, side by side, the weights read once. Copy k's tensors, gates,
    outputs and the other graph inputs it reads (a mask, positions) are
    renamed `sglp_candidate/k/NAME`, so that each copy may run on its own
    number of samples. One session run then scores every candidate, each on
    a partial pass from its own unit. None when a needed node has a subgraph
    (its outer-scope reads would need renaming too)."""
    graph = gated.graph
    producer = {out: node for node in graph.node for out in node.output if out}
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input}
    gate_set = set(gates)
    nodes, inputs, outs, read_inits = [], [], [], {}
    for k, (start, dtype) in starts.items():
        prefix = f"{COPY_PREFIX}{k}/"
        walked = needed_nodes(graph, outputs, stop=start, producer=producer)
        if walked is None:
            return None
        needed = walked[0]
        local = {out for node in needed.values() for out in node.output if out} | {start}

        def rename(t: str) -> str:
            return prefix + t if t in local or t in gate_set or t in graph_inputs else t

        for position, node in enumerate(graph.node):  # the gated graph's order: topological
            if id(node) not in needed:
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            # Unnamed nodes (the ORT optimizer leaves some) get their position:
            # the op type alone would name two Casts alike, which ORT refuses.
            copy.name = prefix + (node.name or f"{node.op_type}@{position}")
            copy.input[:] = [rename(t) if t else t for t in node.input]
            copy.output[:] = [rename(t) if t else t for t in node.output]
            nodes.append(copy)
            for t in node.input:
                if t in initializers:
                    read_inits[t] = initializers[t]
                elif t in gate_set:
                    inputs.append(onnx.helper.make_tensor_value_info(prefix + t, onnx.TensorProto.BOOL, []))
                elif t in graph_inputs and t != start:
                    own = onnx.ValueInfoProto()
                    own.CopyFrom(graph_inputs[t])
                    own.name = prefix + t
                    # Its symbolic dims are its copy's: ONNX Runtime takes equal names for equal sizes.
                    for dim in own.type.tensor_type.shape.dim:
                        if dim.HasField("dim_param"):
                            dim.dim_param = prefix + dim.dim_param
                    inputs.append(own)
        inputs.append(onnx.helper.make_tensor_value_info(prefix + start, dtype, None))
        outs += [onnx.ValueInfoProto(name=prefix + t) for t in outputs]
    inputs = list({vi.name: vi for vi in inputs}.values())
    model = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, f"{graph.name}_candidates", inputs, outs,
                               list(read_inits.values())),
        opset_imports=list(gated.opset_import))
    model.ir_version = gated.ir_version
    model.functions.extend(gated.functions)
    return model


STACK_PREFIX = "sglp_stack/"


def stacked_suffix_model(gated: onnx.ModelProto, starts: dict[int, tuple[str, int]], outputs: Sequence[str],
                         gates: Sequence[str]) -> tuple[onnx.ModelProto, list[int]] | None:
    """What `batched_suffix_model` computes, with the copies' rows stacked in
    one stream instead of side by side: for each key k of `starts` = {k:
    (tensor, ONNX dtype)}, input `sglp_stack/k` joins the stream at tensor
    k (the stream's value there is Concat(the stream so far, input k) along
    the rows), so every node after the first start runs once on the rows of
    the copies that have joined, and each weight is read once per run
    instead of once per copy (a large model's runs stream their weights:
    on CPU those runs cost their weights, not their rows). `outputs` come
    out with the copies' rows in join order, which is returned with the
    model: the keys by the graph position of their tensors.

    None where the rows cannot be stacked: the part after the first start
    reads a graph input other than the gates (a decoder's mask, positions),
    a node after a later start reads a value computed before it other than
    through that start (a long skip connection, a mask expanded once), or a
    needed node has a subgraph."""
    graph = gated.graph
    producer = {out: node for node in graph.node for out in node.output if out}
    position = {id(node): i for i, node in enumerate(graph.node)}
    order = sorted(starts, key=lambda k: position[id(producer[starts[k][0]])] if starts[k][0] in producer else -1)
    first = starts[order[0]][0]
    walked = needed_nodes(graph, outputs, stop=first, producer=producer)
    if walked is None:
        return None
    needed, seen = walked
    gate_set = set(gates)
    if any(i.name in seen and i.name not in gate_set for i in graph.input):
        return None
    nodes = [node for node in graph.node if id(node) in needed]  # topological: the gated graph's order
    # Values that carry rows: everything computed from the first start (gates and constants do not).
    rows = {first}
    for node in nodes:
        if any(t in rows for t in node.input):
            rows.update(t for t in node.output if t)
    joins = {starts[k][0]: k for k in order[1:]}
    if any(t not in rows for t in joins):
        return None
    for tensor in joins:  # only `tensor` may carry rows from before it into what follows it
        after = {tensor}
        for node in nodes:
            if producer.get(tensor) is node:
                continue
            if any(t in after for t in node.input):
                if any(t in rows and t not in after for t in node.input if t):
                    return None
                after.update(t for t in node.output if t)
    out_nodes = [onnx.helper.make_node("Identity", [f"{STACK_PREFIX}{order[0]}"], [first],
                                       name=f"{STACK_PREFIX}{order[0]}/join")]
    for node in nodes:
        joined = [t for t in node.output if t in joins]
        if not joined:
            out_nodes.append(node)
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.output[:] = [f"{t}/sglp_stream" if t in joins else t for t in node.output]
        out_nodes.append(copy)
        for t in joined:
            k = joins[t]
            out_nodes.append(onnx.helper.make_node("Concat", [f"{t}/sglp_stream", f"{STACK_PREFIX}{k}"], [t],
                                                   name=f"{STACK_PREFIX}{k}/join", axis=0))
    inputs = [i for i in graph.input if i.name in gate_set and i.name in seen]
    inputs += [onnx.helper.make_tensor_value_info(f"{STACK_PREFIX}{k}", starts[k][1], None) for k in order]
    initializers = [init for init in graph.initializer if init.name in seen]
    model = onnx.helper.make_model(
        onnx.helper.make_graph(out_nodes, f"{graph.name}_stacked", inputs,
                               [onnx.ValueInfoProto(name=t) for t in outputs], initializers),
        opset_imports=list(gated.opset_import))
    model.ir_version = gated.ir_version
    model.functions.extend(gated.functions)
    return model, order
