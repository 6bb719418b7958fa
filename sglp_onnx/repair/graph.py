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

from ..units.discovery import PrunableUnit

PREFIX = "sglp_repair"
NARROW_FLOATS = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _map_nodes(repair, k: int, source: str, target: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing `target` = map(`source`) in float32, and their constants."""
    name = f"{PREFIX}/{k}"
    rank = repair.rank
    weight, bias = repair.weight.astype(np.float32), repair.bias.astype(np.float32)
    inits, nodes = [], []
    if repair.form == "diagonal":
        shape = (-1,) + (1,) * (rank - 1 - repair.axis) if repair.axis != rank - 1 else (-1,)
        inits += [numpy_helper.from_array(weight.reshape(shape), f"{name}/scale"),
                  numpy_helper.from_array(bias.reshape(shape), f"{name}/bias")]
        nodes += [helper.make_node("Mul", [source, f"{name}/scale"], [f"{name}/scaled"], name=f"{name}/Mul"),
                  helper.make_node("Add", [f"{name}/scaled", f"{name}/bias"], [target], name=f"{name}/Add")]
    elif repair.axis == 1 and rank >= 3:
        kernel = weight.T.reshape(weight.shape + (1,) * (rank - 2))  # (C_out, C_in, 1, ...)
        inits += [numpy_helper.from_array(kernel, f"{name}/weight"), numpy_helper.from_array(bias, f"{name}/bias")]
        nodes.append(helper.make_node("Conv", [source, f"{name}/weight", f"{name}/bias"], [target],
                                      name=f"{name}/Conv", kernel_shape=[1] * (rank - 2)))
    else:
        if repair.axis != rank - 1:
            raise ValueError(f"repair map on axis {repair.axis} of a rank-{rank} tensor")
        inits += [numpy_helper.from_array(weight, f"{name}/weight"), numpy_helper.from_array(bias, f"{name}/bias")]
        nodes += [helper.make_node("MatMul", [source, f"{name}/weight"], [f"{name}/mapped"], name=f"{name}/MatMul"),
                  helper.make_node("Add", [f"{name}/mapped", f"{name}/bias"], [target], name=f"{name}/Add")]
    return nodes, inits


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
