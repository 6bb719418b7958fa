"""Counting parameters and FLOPs from the graph.

FLOPs are 2 x multiply-accumulates, the convention of
`torch.utils.flop_counter` (checked against it in tests/test_flops.py).
Counted ops:

- Conv, ConvInteger, QLinearConv, com.microsoft FusedConv:
  2 * prod(output) * (C_in / groups) * prod(kernel);
- ConvTranspose: 2 * prod(input) * (C_out / groups) * prod(kernel);
- Gemm, com.microsoft FusedGemm: 2 * M * N * K (transA/transB honoured, the
  bias C is not counted);
- MatMul, MatMulInteger, QLinearMatMul, com.microsoft FusedMatMul:
  2 * prod(output) * K, broadcast batch dimensions included;
- Einsum with two operands: 2 * the product of the sizes of all its indices
  (what the equivalent batched matmul costs);
- Attention (opset 23): 2 * B * H_q * T_q * T_kv * (D_qk + D_v), with T_kv
  including the past KV cache; the causal mask is not discounted (torch
  does not either).

Element-wise ops, normalisation, softmax, pooling and reductions are not
counted. Shapes come from a probe run with calibration samples, so dynamic
dimensions (batch, sequence length) are bound to the calibration data.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from .index import FLOAT_TYPES, GraphIndex
from .ops import COUNTED_CONTRIB_OPS, COUNTED_OPS, is_contrib, is_onnx

# Where the weight (or second matrix) sits among a node's inputs.
_SECOND_OPERAND = {"QLinearConv": 3, "QLinearMatMul": 3}


def is_counted(node: onnx.NodeProto) -> bool:
    return is_onnx(node, *COUNTED_OPS) or is_contrib(node, *COUNTED_CONTRIB_OPS)


def node_key(index: int, node: onnx.NodeProto) -> str:
    return node.name or f"#{index}"


def tensors_needed(model: onnx.ModelProto) -> list[str]:
    """Non-constant inputs and outputs of counted nodes: what a probe must report."""
    constants = {i.name for i in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        if is_counted(node):
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
        if not is_counted(node):
            continue
        ins = [_shape(index, t, shapes) if t else None for t in node.input]
        out = _shape(index, node.output[0], shapes)
        flops = _count(node, ins, out)
        if flops:
            result[node_key(i, node)] = flops
    return result


def _count(node: onnx.NodeProto, ins: list, out: tuple | None) -> int:
    op = node.op_type.removeprefix("Fused")
    a = ins[0] if ins else None
    second = _SECOND_OPERAND.get(op, 1)
    b = ins[second] if len(ins) > second else None
    if op in ("Conv", "ConvInteger", "QLinearConv") and out is not None and b is not None:
        return 2 * _prod(out) * _prod(b[1:])  # weight (C_out, C_in/groups, *kernel)
    if op == "ConvTranspose" and a is not None and b is not None:
        return 2 * _prod(a) * _prod(b[1:])  # weight (C_in, C_out/groups, *kernel)
    if op == "Gemm" and a is not None and out is not None:
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return 2 * _prod(out) * int(k)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul") and a is not None and out is not None:
        k = a[-2] if _attr(node, "transA", 0) and len(a) > 1 else a[-1]
        return 2 * _prod(out) * int(k)
    if op == "Einsum" and len(ins) == 2 and a is not None and b is not None:
        return _einsum(_attr(node, "equation", b""), a, b)
    if op == "Attention" and out is not None and len(ins) > 2 and None not in ins[:3]:
        return _attention(node, ins)
    return 0


def _prod(shape) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.int64))


def _einsum(equation: bytes | str, a: tuple, b: tuple) -> int:
    """2 x the product of every index size of a two-operand einsum."""
    if isinstance(equation, bytes):
        equation = equation.decode()
    lhs = equation.replace(" ", "").split("->")[0]
    terms = lhs.split(",")
    if len(terms) != 2:
        return 0
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, (a, b)):
        if "..." in term:
            head, tail = term.split("...")
            n_broadcast = len(shape) - len(head) - len(tail)
            # Broadcast dims get private labels aligned from the right, so
            # both operands share them as numpy broadcasting does.
            term = head + "".join(chr(0x100 + n_broadcast - 1 - i) for i in range(n_broadcast)) + tail
        if len(term) != len(shape):
            return 0
        for label, dim in zip(term, shape):
            sizes[label] = max(sizes.get(label, 1), int(dim))
    return 2 * _prod(sizes.values())


def _attention(node: onnx.NodeProto, ins: list) -> int:
    """ONNX Attention (opset 23): 4-D (B, H, T, D) or 3-D (B, T, H*D) inputs."""
    q, k, v = ins[:3]
    past = ins[4] if len(ins) > 4 else None
    if len(q) == 4:
        b, h, tq, d_qk = q
        tk, d_v = k[2], v[3]
        if past is not None and len(past) == 4:
            tk += past[2]
    else:
        b, tq, q_hidden = q
        h = int(_attr(node, "q_num_heads", 1)) or 1
        h_kv = int(_attr(node, "kv_num_heads", h)) or h
        d_qk, d_v = q_hidden // h, v[2] // h_kv
        tk = k[1]
        if past is not None and len(past) == 4:
            tk += past[2]
    return 2 * int(b) * int(h) * int(tq) * int(tk) * (int(d_qk) + int(d_v))


def model_params(model: onnx.ModelProto) -> int:
    """Number of float weights in the model (initializers and Constant nodes with >1 element)."""
    index = GraphIndex(model)
    return sum(
        index.numel(name) for name, t in index.constants.items()
        if t.data_type in FLOAT_TYPES and t.dims and index.numel(name) > 1
    )
