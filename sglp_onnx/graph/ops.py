"""Op tables: which ops the stages treat alike, in one place.

Default-domain ops are matched with `is_onnx`; ONNX Runtime's contrib ops
(domain `com.microsoft`) with `is_contrib`, so a table of op types never
matches an op of the same name from another domain by accident.
"""

from __future__ import annotations

import onnx

ONNX_DOMAINS = ("", "ai.onnx")
CONTRIB_DOMAIN = "com.microsoft"


def is_onnx(node: onnx.NodeProto, *op_types: str) -> bool:
    """A default-domain node, of one of `op_types` when any are given."""
    return node.domain in ONNX_DOMAINS and (not op_types or node.op_type in op_types)


def is_contrib(node: onnx.NodeProto, *op_types: str) -> bool:
    """An ONNX Runtime contrib-domain node, of one of `op_types` when any are given."""
    return node.domain == CONTRIB_DOMAIN and (not op_types or node.op_type in op_types)


# Outputs of these depend on a tensor's shape, not its values.
SHAPE_ONLY_OPS = {"Shape", "Size"}
# Never constant-folded even when every input is constant.
NONDETERMINISTIC_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                        "Bernoulli"}
# Casts and identities that change nothing can sit on a skip path.
PASS_THROUGH_OPS = {"Identity", "Cast"}
# Ops that only view their first input in another shape (same values, same order).
VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
ATTENTION_OPS = {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"}

# Ops whose output shape is a function of the shapes (not the values) of the
# inputs at these positions (None: every input).
SHAPE_DETERMINED_OPS: dict[str, frozenset[int] | None] = {
    "Identity": None, "Cast": None, "Concat": None, "Transpose": None, "Neg": None,
    "Add": None, "Sub": None, "Mul": None, "Div": None,
    "Unsqueeze": frozenset({0}), "Squeeze": frozenset({0}), "Reshape": frozenset({0}), "Expand": frozenset({0}),
}

# Linear ops with a weight operand, float and quantized: what a network's
# head (classifier, LM head) is made of.
LINEAR_OPS = {"Gemm", "MatMul", "FusedGemm", "FusedMatMul", "MatMulNBits", "MatMulInteger", "QGemm",
              "QLinearMatMul", "Einsum"}
CONV_OPS = {"Conv", "FusedConv", "ConvInteger", "QLinearConv"}
# Normalisations (and the Tanh of a pooler) that end a network computing features, not logits.
FEATURE_NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                    "SkipSimplifiedLayerNormalization", "RMSNormalization", "LpNormalization", "Tanh",
                    "BatchNormalization", "GroupNormalization", "InstanceNormalization"}

# FLOP-counted ops (default domain), and the contrib ops counted like them.
COUNTED_OPS = {
    "Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger", "QLinearMatMul",
    "Einsum", "Attention",
}
COUNTED_CONTRIB_OPS = {"FusedConv", "FusedGemm", "FusedMatMul", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
                       "DynamicQuantizeMatMul"}

# Ops whose output keeps its input's quantization: ONNX Runtime runs them on
# a QOperator graph's integers directly, and its QDQ quantizer gives their
# output the input's scale and zero point.
QUANTIZATION_PRESERVING_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                               "Slice", "Split")

# Quantized ops (ONNX Runtime's QOperator format, and Q/DQ themselves): for
# each input read in the integer domain, the positions of its scale and zero
# point; and the positions of the output's scale and zero point (None: the
# output is float or int32). com.microsoft QLinearConcat is variadic (see
# `quantized_operands`).
QUANTIZED_ONNX_OPS: dict[str, tuple[dict[int, tuple[int, int]], tuple[int, int] | None]] = {
    "QuantizeLinear": ({}, (1, 2)),
    "DequantizeLinear": ({0: (1, 2)}, None),
    "QLinearConv": ({0: (1, 2), 3: (4, 5)}, (6, 7)),
    "QLinearMatMul": ({0: (1, 2), 3: (4, 5)}, (6, 7)),
}
QUANTIZED_CONTRIB_OPS: dict[str, tuple[dict[int, tuple[int, int]], tuple[int, int] | None]] = {
    "QLinearAdd": ({0: (1, 2), 3: (4, 5)}, (6, 7)),
    "QLinearMul": ({0: (1, 2), 3: (4, 5)}, (6, 7)),
    "QLinearConv": ({0: (1, 2), 3: (4, 5)}, (6, 7)),
    "QLinearMatMul": ({0: (1, 2), 3: (4, 5)}, (6, 7)),
    "QGemm": ({0: (1, 2), 3: (4, 5)}, (7, 8)),
    "QLinearLeakyRelu": ({0: (1, 2)}, (3, 4)),
    "QLinearSigmoid": ({0: (1, 2)}, (3, 4)),
    "QLinearSoftmax": ({0: (1, 2)}, (3, 4)),
    "QLinearGlobalAveragePool": ({0: (1, 2)}, (3, 4)),
    "QLinearAveragePool": ({0: (1, 2)}, (3, 4)),
    "QLinearReduceMean": ({0: (1, 2)}, (3, 4)),
    "QLinearWhere": ({1: (2, 3), 4: (5, 6)}, (7, 8)),
}


def quantized_operands(node: onnx.NodeProto) -> tuple[dict[int, tuple[int, int]], tuple[int, int] | None] | None:
    """(input position -> positions of its scale and zero point, the output's
    scale and zero point positions or None) for a quantized op, None for any
    other op. Positions past the node's inputs are left out (an optional zero
    point, QGemm's float output)."""
    if is_contrib(node, "QLinearConcat"):
        n = len(node.input)
        return {k: (k + 1, k + 2) for k in range(2, n - 2, 3)}, (0, 1)
    if is_onnx(node, *QUANTIZED_ONNX_OPS):
        operands, result = QUANTIZED_ONNX_OPS[node.op_type]
    elif is_contrib(node, *QUANTIZED_CONTRIB_OPS):
        operands, result = QUANTIZED_CONTRIB_OPS[node.op_type]
    else:
        return None
    n = len(node.input)
    if result is not None and result[0] >= n:
        result = None
    return {k: v for k, v in operands.items() if k < n}, result
