"""The plain residual join: a default-domain `Add` of two computed tensors,
optionally followed by one op of the block (`relu(x + f(x))`, a post-norm
`LayerNorm(x + f(x))`). Skip paths are seen through Identity and
dtype-preserving Cast nodes."""

from __future__ import annotations

from ...graph.index import GraphIndex
from ...graph.ops import PASS_THROUGH_OPS, is_onnx
from . import Join, Pattern

# Ops that may follow a residual Add inside the block: the unit's exit is their output.
POST_ADD_OPS = {
    "Relu", "LeakyRelu", "Clip", "Elu", "Selu", "Gelu", "HardSwish",
    "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
}


class AddPattern(Pattern):
    name = "add"
    order = 0

    def joins(self, index: GraphIndex):
        for i, node in enumerate(index.nodes):
            if not is_onnx(node, "Add") or len(node.input) != 2:
                continue
            a, b = node.input
            if a and b and not index.is_constant(a) and not index.is_constant(b):
                yield Join(node=i, inputs=(a, b), output=node.output[0], pattern=self)

    def skip_step(self, index: GraphIndex, tensor: str, *, typed: bool = True) -> str | None:
        p = index.producer.get(tensor)
        if p is None:
            return None
        node = index.nodes[p]
        if not is_onnx(node, *PASS_THROUGH_OPS):
            return None
        source = node.input[0]
        if node.op_type == "Cast" and typed:
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is None or index.dtypes.get(source) != to:
                return None
        return source

    def block_end(self, index: GraphIndex, tensor: str) -> int | None:
        users = index.consumers.get(tensor, [])
        if len(users) != 1:
            return None
        node = index.nodes[users[0]]
        if node.op_type not in POST_ADD_OPS or node.input[0] != tensor:
            return None
        if any(i and not index.is_constant(i) for i in node.input[1:]):
            return None
        if any(o for o in node.output[1:] if index.consumers.get(o) or o in index.output_names):
            return None
        # The op belongs to the block only when it runs inside the block's module:
        # a pre-norm stack's final norm also reads the last residual Add alone.
        add_scope, post_scope = index.scopes[index.producer[tensor]], index.scopes[users[0]]
        if add_scope and post_scope and post_scope != add_scope and not post_scope.startswith(add_scope + "."):
            return None
        return users[0]


PATTERN = AddPattern()
