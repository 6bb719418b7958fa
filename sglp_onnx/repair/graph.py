"""Repair maps as graph nodes.

`with_repairs` adds, for each fitted cut, nodes that compute the map of the
cut's entry, and hands back units whose last unit of each cut reads that
map instead of the entry: bypassing them (`surgery.remove_units`, or the
gated graph) then makes the readers of the cut's exit read the repaired
value. The map is a 1x1 convolution with bias for channel-first feature
maps, MatMul + Add on the last axis (a hidden state), or Mul + Add for the
diagonal form; float16 and bfloat16 activations are mapped in float32
between two Casts; quantized activations are dequantized with the entry's
scale and zero point and requantized with the exit's (so the exit's
readers keep their scale).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..surgery.gating import unit_gate
from ..units.discovery import PrunableUnit

PREFIX = "sglp_repair"
NARROW_FLOATS = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def map_constants(k: int, form: str) -> tuple[str, str]:
    """Names of repair `k`'s weight (the scale, for the diagonal form) and bias in the graph."""
    return f"{PREFIX}/{k}/{'scale' if form == 'diagonal' else 'weight'}", f"{PREFIX}/{k}/bias"


def linear_nodes(name: str, source: str, target: str, *, form: str, axis: int, rank: int, weight: str,
                 bias: str) -> list[onnx.NodeProto]:
    """Nodes computing `target` = map(`source`) along `axis` of a rank-`rank`
    float32 tensor, reading the tensors `weight` and `bias`: Mul + Add for
    the diagonal form (both shaped to broadcast), a 1x1 Conv for channels on
    axis 1 (weight C_out x C_in x 1..., bias C), else MatMul + Add (weight
    C_in x C_out)."""
    if form == "diagonal":
        return [helper.make_node("Mul", [source, weight], [f"{name}/scaled"], name=f"{name}/Mul"),
                helper.make_node("Add", [f"{name}/scaled", bias], [target], name=f"{name}/Add")]
    if axis == 1 and rank >= 3:
        return [helper.make_node("Conv", [source, weight, bias], [target], name=f"{name}/Conv",
                                 kernel_shape=[1] * (rank - 2))]
    if axis != rank - 1:
        raise ValueError(f"repair map on axis {axis} of a rank-{rank} tensor")
    return [helper.make_node("MatMul", [source, weight], [f"{name}/mapped"], name=f"{name}/MatMul"),
            helper.make_node("Add", [f"{name}/mapped", bias], [target], name=f"{name}/Add")]


def stored(weight: np.ndarray, bias: np.ndarray, *, form: str, axis: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted (weight, bias) (y = x @ W + b, or x * w + b) in the layout `linear_nodes` reads, float32."""
    weight, bias = weight.astype(np.float32), bias.astype(np.float32)
    if form == "diagonal":
        shape = (-1,) + (1,) * (rank - 1 - axis)
        return weight.reshape(shape), bias.reshape(shape)
    if axis == 1 and rank >= 3:
        return np.ascontiguousarray(weight.T).reshape(weight.shape + (1,) * (rank - 2)), bias
    return weight, bias


def _map_nodes(repair, k: int, source: str, target: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing `target` = map(`source`) in float32, and their constants."""
    weight_name, bias_name = map_constants(k, repair.form)
    weight, bias = stored(repair.weight, repair.bias, form=repair.form, axis=repair.axis, rank=repair.rank)
    inits = [numpy_helper.from_array(weight, weight_name), numpy_helper.from_array(bias, bias_name)]
    return linear_nodes(f"{PREFIX}/{k}", source, target, form=repair.form, axis=repair.axis, rank=repair.rank,
                        weight=weight_name, bias=bias_name), inits


def repair_nodes(repair, k: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """The nodes and constants of repair `k`, and the tensor they produce
    (the repaired value of the cut's exit, in the exit's dtype)."""
    name = f"{PREFIX}/{k}"
    out = f"{name}/output"
    entry = repair.cut.entry
    elem = repair.elem_type
    if repair.quant is not None:
        entry_scale, entry_zero, exit_scale, exit_zero = repair.quant
        nodes = [helper.make_node("DequantizeLinear", [entry, entry_scale, entry_zero], [f"{name}/float_in"],
                                  name=f"{name}/Dequantize")]
        mapped, inits = _map_nodes(repair, k, f"{name}/float_in", f"{name}/float_out")
        nodes += mapped
        nodes.append(helper.make_node("QuantizeLinear", [f"{name}/float_out", exit_scale, exit_zero], [out],
                                      name=f"{name}/Quantize"))
        return nodes, inits, out
    if elem in NARROW_FLOATS:
        nodes = [helper.make_node("Cast", [entry], [f"{name}/float_in"], name=f"{name}/CastIn",
                                  to=TensorProto.FLOAT)]
        mapped, inits = _map_nodes(repair, k, f"{name}/float_in", f"{name}/float_out")
        nodes += mapped
        nodes.append(helper.make_node("Cast", [f"{name}/float_out"], [out], name=f"{name}/CastOut", to=elem))
        return nodes, inits, out
    nodes, inits = _map_nodes(repair, k, entry, out)
    return nodes, inits, out


def with_repairs(model: onnx.ModelProto, units: Sequence[PrunableUnit],
                 repairs: Sequence) -> tuple[onnx.ModelProto, list[PrunableUnit]]:
    """A copy of `model` computing every repair's map, and `units` with the
    last unit of each repaired cut reading it as its entry (and keeping its
    exit's quantization: no companions). Unchanged where `repairs` is empty.
    The graph's other nodes and tensors are untouched (the maps are added at
    the end of the node list, right after their entry is computed)."""
    if not repairs:
        return model, list(units)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    units = list(units)
    produced_at = {t: i for i, node in enumerate(out.graph.node) for t in node.output}
    insertions: list[tuple[int, list[onnx.NodeProto]]] = []
    for k, repair in enumerate(repairs):
        nodes, inits, mapped = repair_nodes(repair, k)
        out.graph.initializer.extend(inits)
        insertions.append((produced_at.get(repair.cut.entry, -1), nodes))
        tail = repair.cut.units[-1]
        units[tail] = replace(units[tail], entry=mapped, companions=())
    # Insert back to front so earlier positions stay valid; keeps the node list topological.
    graph_nodes = list(out.graph.node)
    for position, nodes in sorted(insertions, key=lambda x: x[0], reverse=True):
        graph_nodes[position + 1:position + 1] = nodes
    del out.graph.node[:]
    out.graph.node.extend(graph_nodes)
    if not any(op.domain in ("", "ai.onnx") for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid("", 13))
    return out, units


RUNTIME_PREFIX = "sglp_map"


def runtime_map_inputs(k: int) -> tuple[str, str]:
    """Graph inputs holding unit k's runtime map (weight, bias) in a gated graph."""
    return f"{RUNTIME_PREFIX}.{k}.weight", f"{RUNTIME_PREFIX}.{k}.bias"


def add_runtime_maps(gated: onnx.ModelProto, specs: dict) -> None:
    """In place: in a gated graph (`surgery.gating.gated_model`), unit k's
    bypass reads a full linear map of its entry whose weight and bias are
    graph inputs (`runtime_map_inputs(k)`), for every k in `specs` = {k:
    (axis, rank, elem_type)}. With identity weights the bypass is the plain
    one; a removal set's cut is repaired by feeding its last unit the cut's
    map and the cut's other units identities, so one session scores any
    removal set with its repairs (the repair-aware damage search)."""
    nodes = []
    for node in gated.graph.node:
        k = unit_gate(node)
        if k is not None and k in specs:
            axis, rank, elem = specs[k]
            weight, bias = runtime_map_inputs(k)
            name = f"{RUNTIME_PREFIX}/{k}"
            source, target = node.input[1], f"{name}/output"
            if elem in NARROW_FLOATS:
                nodes.append(helper.make_node("Cast", [source], [f"{name}/float_in"], name=f"{name}/CastIn",
                                              to=TensorProto.FLOAT))
                nodes += linear_nodes(name, f"{name}/float_in", f"{name}/float_out", form="full", axis=axis,
                                      rank=rank, weight=weight, bias=bias)
                nodes.append(helper.make_node("Cast", [f"{name}/float_out"], [target], name=f"{name}/CastOut",
                                              to=elem))
            else:
                nodes += linear_nodes(name, source, target, form="full", axis=axis, rank=rank, weight=weight,
                                      bias=bias)
            node.input[1] = target
            gated.graph.input.extend([helper.make_tensor_value_info(weight, TensorProto.FLOAT, None),
                                      helper.make_tensor_value_info(bias, TensorProto.FLOAT, None)])
        nodes.append(node)
    del gated.graph.node[:]
    gated.graph.node.extend(nodes)


def strip_repairs(model: onnx.ModelProto, cuts: Sequence[dict]) -> onnx.ModelProto:
    """A written repaired model (`compress` with the report's `repair.cuts`)
    without its maps: every reader of a map's output reads the cut's entry
    again and the map's nodes and constants go, which is the plain bypass.
    What `finetune` pairs with: fine-tuning heals the bypass itself."""
    outputs = {f"{PREFIX}/{k}/output": cut["entry"] for k, cut in enumerate(cuts)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [n for n in out.graph.node if not n.name.startswith(f"{PREFIX}/")]

    def reread(nodes) -> None:  # readers in If/Loop/Scan bodies read the outer tensor too
        for node in nodes:
            node.input[:] = [outputs.get(name, name) for name in node.input]
            for attr in node.attribute:
                for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    reread(graph.node)

    reread(kept)
    for o in out.graph.output:
        if o.name in outputs:
            raise ValueError(f"a graph output is a repair map's output: {o.name}")
    del out.graph.node[:]
    out.graph.node.extend(kept)
    inits = [i for i in out.graph.initializer if not i.name.startswith(f"{PREFIX}/")]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out
