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
COUNTED_CONTRIB_OPS = {"FusedConv", "FusedGemm", "FusedMatMul"}
