"""Counting parameters and FLOPs from the graph.

FLOPs are 2 x multiply-accumulates, the convention of
`torch.utils.flop_counter` (checked against it in tests/test_flops.py).
Counted ops:

- Conv, ConvInteger, QLinearConv, com.microsoft FusedConv:
  2 * prod(output) * (C_in / groups) * prod(kernel);
- ConvTranspose: 2 * prod(input) * (C_out / groups) * prod(kernel);
- Gemm, com.microsoft FusedGemm and QGemm: 2 * M * N * K (transA/transB
  honoured, the bias C is not counted);
- MatMul, MatMulInteger, QLinearMatMul, com.microsoft FusedMatMul,
  QLinearMatMul (float 8), MatMulIntegerToFloat, DynamicQuantizeMatMul:
  2 * prod(output) * K, broadcast batch dimensions included;
- Einsum with two operands: 2 * the product of the sizes of all its indices
  (what the equivalent batched matmul costs);
- Attention (opset 23): 2 * B * H_q * T_q * T_kv * (D_qk + D_v), with T_kv
  including the past KV cache; the causal mask is not discounted (torch
  does not either).

ONNX Runtime's contrib ops of optimized transformer graphs (its transformer
optimizer, the onnxruntime-genai builder), with T_kv the keys attended to
(the past included; from the `present` output when the probe saw it, else
past + new; the causal mask and a local window are not discounted):

- Attention: the packed QKV projection 2 * B * T_q * C_in * (D_q + D_k + D_v)
  (weights (C_in, D_q + D_k + D_v), `qkv_hidden_sizes` or thirds) plus
  2 * B * T_q * T_kv * (D_q + D_v) for Q K^T and the weighted sum of V
  (D_* summed over the heads);
- MultiHeadAttention (projections are separate MatMuls):
  2 * B * T_q * T_kv * (D_q + D_v), D_q from the query (3-D, or packed
  (B, T, N, 3, H)), D_v from the output (B, T_q, D_v);
- GroupQueryAttention: 4 * B * T_q * T_kv * D, D = num_heads * head size
  (the output's width): every query head attends to its shared KV head;
- MatMulNBits: 2 * prod(A.shape[:-1]) * N * K, K and N from its attributes.

Element-wise ops, normalisation, softmax, pooling and reductions are not
counted. Shapes come from a probe run with calibration samples, so dynamic
dimensions (batch, sequence length) are bound to the calibration data.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from .index import FLOAT_TYPES, GraphIndex
from .ops import COUNTED_CONTRIB_OPS, COUNTED_OPS, is_contrib, is_onnx, quantized_operands

# Where the weight (or second matrix) sits among a node's inputs.
_SECOND_OPERAND = {"QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3}


# ONNX Runtime contrib ops of transformer graphs counted here (see the module docstring).
_CONTRIB_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
_TRANSFORMER_CONTRIB_OPS = _CONTRIB_ATTENTION_OPS | {"MatMulNBits"}


def is_counted(node: onnx.NodeProto) -> bool:
    return is_onnx(node, *COUNTED_OPS) or is_contrib(node, *COUNTED_CONTRIB_OPS) \
        or is_contrib(node, *_TRANSFORMER_CONTRIB_OPS)


def _outputs_needed(node: onnx.NodeProto) -> list[str]:
    """Outputs of a counted node whose shapes its count reads: the first; an
    attention op's present key too (the keys attended to)."""
    return list(node.output[:2]) if is_contrib(node, *_CONTRIB_ATTENTION_OPS) else list(node.output[:1])


def node_key(index: int, node: onnx.NodeProto) -> str:
    return node.name or f"#{index}"


def tensors_needed(model: onnx.ModelProto) -> list[str]:
    """Non-constant inputs and outputs of counted nodes: what a probe must report."""
    constants = {i.name for i in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        if is_counted(node):
            names += [t for t in list(node.input) + _outputs_needed(node) if t and t not in constants]
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
        if is_contrib(node, *_TRANSFORMER_CONTRIB_OPS):
            outs = [_shape(index, t, shapes) if t else None for t in node.output]
            flops = _count_contrib(node, ins, outs)
        else:
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
    if op in ("Gemm", "QGemm") and a is not None and out is not None:
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return 2 * _prod(out) * int(k)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul") \
            and a is not None and out is not None:
        k = a[-2] if _attr(node, "transA", 0) and len(a) > 1 else a[-1]
        return 2 * _prod(out) * int(k)
    if op == "Einsum" and len(ins) == 2 and a is not None and b is not None:
        return _einsum(_attr(node, "equation", b""), a, b)
    if op == "Attention" and out is not None and len(ins) > 2 and None not in ins[:3]:
        return _attention(node, ins)
    return 0


def _count_contrib(node: onnx.NodeProto, ins: list, outs: list) -> int:
    """FLOPs of an ONNX Runtime transformer contrib op (formulas in the module docstring); 0 when a shape is missing."""
    def at(shapes: list, k: int):
        return shapes[k] if len(shapes) > k else None

    op = node.op_type
    a, out = at(ins, 0), at(outs, 0)
    if op == "MatMulNBits":
        k, n = _attr(node, "K"), _attr(node, "N")
        if a is None or not k or not n:
            return 0
        return 2 * _prod(a[:-1]) * int(n) * int(k)
    if a is None or out is None or len(a) < 3:
        return 0
    b, t_q = int(a[0]), int(a[1])
    present = at(outs, 1)
    if op == "Attention":
        weights = at(ins, 1)
        if weights is None or len(weights) != 2:
            return 0
        sizes = [int(x) for x in _attr(node, "qkv_hidden_sizes", [])] or [int(weights[1]) // 3] * 3
        past = at(ins, 4)  # (2, B, N, P, H)
        if present is not None and len(present) == 5:
            t_kv = int(present[3])
        else:
            t_kv = t_q + (int(past[3]) if past is not None and len(past) == 5 else 0)
        projection = 2 * b * t_q * int(weights[0]) * int(weights[1])
        return projection + 2 * b * t_q * t_kv * (sizes[0] + sizes[2])
    if op == "MultiHeadAttention":
        d_q = int(a[2]) * int(a[4]) if len(a) == 5 else int(a[2])
        d_v = int(out[-1])
        if present is not None and len(present) == 4:
            t_kv = int(present[2])
        else:
            key, past = at(ins, 1), at(ins, 6)
            if key is None:
                t_kv = t_q  # packed QKV in the query
            elif len(key) == 4:
                t_kv = int(key[2])  # (B, N, L, H): keys already projected (and cached)
            else:
                t_kv = int(key[1]) + (int(past[2]) if past is not None and len(past) == 4 else 0)
        return 2 * b * t_q * t_kv * (d_q + d_v)
    if op == "GroupQueryAttention":
        if present is not None and len(present) == 4:
            t_kv = int(present[2])
        else:
            past = at(ins, 3)
            t_kv = t_q + (int(past[2]) if past is not None and len(past) == 4 else 0)
        return 4 * b * t_q * t_kv * int(out[-1])
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
    """Number of weights in the model (initializers and Constant nodes with >1 element):
    float ones, and a quantized model's integer weights and biases (what is
    dequantized or read as a quantized op's operand or bias), not counting
    scales and zero points, so a model and its quantized copy count alike.
    A MatMulNBits weight counts as the K x N values it packs (see `packed_weights`)."""
    index = GraphIndex(model)
    parameters, quantized = quantization_roles(index)
    packed = packed_weights(index)
    return sum(
        packed.get(name, index.numel(name)) for name, t in index.constants.items()
        if t.dims and index.numel(name) > 1 and name not in parameters
        and (t.data_type in FLOAT_TYPES or name in quantized)
    )


def packed_weights(index: GraphIndex) -> dict[str, int]:
    """Constants read as the packed weight B of a com.microsoft MatMulNBits ->
    the number of weights they hold, K x N from its attributes (the uint8
    tensor holds 8 / bits of them per byte, in blocks)."""
    counts: dict[str, int] = {}
    for node in index.nodes:
        if not is_contrib(node, "MatMulNBits") or len(node.input) < 2 or node.input[1] not in index.constants:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("K", 0) > 0 and attrs.get("N", 0) > 0:
            counts[node.input[1]] = attrs["K"] * attrs["N"]
    return counts


# Integer biases of quantized ops, by position.
_QUANTIZED_BIAS = {"QLinearConv": 8, "QGemm": 6}


def quantization_roles(index: GraphIndex) -> tuple[set[str], set[str]]:
    """(names read as a scale or zero point, names read as quantized data or an integer bias):
    a quantized model's scales and zero points are not parameters."""
    parameters: set[str] = set()
    data: set[str] = set()
    for node in index.nodes:
        if is_onnx(node, "ConvInteger", "MatMulInteger"):
            data.update(node.input[:2])
            parameters.update(node.input[2:4])
            continue
        if is_contrib(node, "MatMulNBits"):
            # A, B (packed weights), scales, zero_points, g_idx, bias: the bias is a float weight.
            data.update(node.input[1:2])
            parameters.update(node.input[2:5])
            continue
        described = quantized_operands(node)
        if described is None:
            continue
        operands, result = described
        for k, pair in operands.items():
            data.add(node.input[k])
            parameters.update(node.input[p] for p in pair if p < len(node.input))
        if result is not None:
            parameters.update(node.input[p] for p in result if p < len(node.input))
        bias = _QUANTIZED_BIAS.get(node.op_type)
        if bias is not None and bias < len(node.input):
            data.add(node.input[bias])
    return parameters - {""}, data - {""}
