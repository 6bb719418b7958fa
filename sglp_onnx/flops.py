"""Counting parameters and FLOPs from the graph.

FLOPs are 2 x multiply-accumulates of Conv, ConvTranspose, Gemm, MatMul and
the fused Attention op, the convention of `torch.utils.flop_counter`;
element-wise ops, normalisation and softmax are not counted. Shapes come
from a probe run with one calibration sample, so dynamic dimensions are
bound to the calibration data.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from .graph_index import FLOAT_TYPES, GraphIndex

COUNTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Attention"}


def node_key(index: int, node: onnx.NodeProto) -> str:
    return node.name or f"#{index}"


def tensors_needed(model: onnx.ModelProto) -> list[str]:
    """Non-constant inputs and outputs of counted nodes: what a probe must report."""
    constants = {i.name for i in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in COUNTED_OPS and node.domain in ("", "ai.onnx"):
            names += [t for t in list(node.input) + list(node.output[:1]) if t and t not in constants]
    return list(dict.fromkeys(names))


def _shape(index: GraphIndex, name: str, shapes: Mapping[str, tuple]) -> tuple | None:
    if name in shapes:
        return tuple(int(d) for d in shapes[name])
    if name in index.constants:
        return tuple(index.constants[name].dims)
    return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_flops(model: onnx.ModelProto, shapes: Mapping[str, tuple]) -> dict[str, int]:
    """FLOPs of every counted node whose shapes are known, keyed like `PrunableUnit.nodes`."""
    index = GraphIndex(model)
    result: dict[str, int] = {}
    for i, node in enumerate(index.nodes):
        if node.op_type not in COUNTED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        ins = [_shape(index, t, shapes) if t else None for t in node.input]
        out = _shape(index, node.output[0], shapes)
        flops = _count(node, ins, out)
        if flops:
            result[node_key(i, node)] = flops
    return result


def _count(node: onnx.NodeProto, ins: list, out: tuple | None) -> int:
    op = node.op_type
    if op == "Conv" and out is not None and len(ins) > 1 and ins[1] is not None:
        w = ins[1]  # (Cout, Cin/groups, *k)
        return 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    if op == "ConvTranspose" and ins[0] is not None and len(ins) > 1 and ins[1] is not None:
        w = ins[1]  # (Cin, Cout/groups, *k)
        return 2 * int(np.prod(ins[0])) * int(np.prod(w[1:]))
    if op == "Gemm" and ins[0] is not None and out is not None:
        a = ins[0]
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return 2 * int(np.prod(out)) * int(k)
    if op == "MatMul" and ins[0] is not None and out is not None:
        k = ins[0][-1]
        return 2 * int(np.prod(out)) * int(k)
    if op == "Attention" and ins[0] is not None and len(ins) > 2 and ins[1] is not None and out is not None:
        q, k = ins[0], ins[1]
        if len(q) == 4:  # (B, H, Tq, D) and (B, Hkv, Tk, D)
            b, h, tq, d = q
            tk = k[2]
        else:  # (B, T, H*D): heads fold into the feature axis
            b, tq, hd = q
            tk, h, d = k[1], 1, hd
        return 4 * int(b) * int(h) * int(tq) * int(tk) * int(d)
    return 0


def model_params(model: onnx.ModelProto) -> int:
    """Number of float weights in the model (initializers and Constant nodes with >1 element)."""
    index = GraphIndex(model)
    return sum(
        index.numel(name) for name, t in index.constants.items()
        if t.data_type in FLOAT_TYPES and t.dims and index.numel(name) > 1
    )
