"""A post-norm block's LayerNorm spelled out in element-wise ops (opsets
before 17: ReduceMean, Sub, Pow, Add, Sqrt, Div, Mul) after its residual
join: the block ends at the norm's last node."""

from __future__ import annotations

from ...graph.index import GraphIndex
from ...graph.ops import is_onnx
from . import Pattern

# Element-wise ops a LayerNorm decomposes into.
NORM_OPS = {"ReduceMean", "Sub", "Pow", "Add", "Sqrt", "Div", "Mul", "Cast", "Reciprocal"}
MAX_NODES = 16


class DecomposedNormPattern(Pattern):
    name = "decomposed-norm"
    order = 10

    def block_end(self, index: GraphIndex, tensor: str) -> int | None:
        """The last node of the norm that alone reads `tensor`, or None.

        The region is grown from `tensor` through NORM_OPS whose other inputs
        are constants or region tensors; it qualifies when it contains a
        ReduceMean, nothing outside it reads `tensor` or its intermediate
        tensors, exactly one region tensor leaves it, and (with scopes) it
        runs in the join's module.
        """
        region_tensors = {tensor}
        region: set[int] = set()
        grew = True
        while grew and len(region) <= MAX_NODES:
            grew = False
            for t in list(region_tensors):
                for c in index.consumers.get(t, ()):
                    node = index.nodes[c]
                    if c in region or not is_onnx(node, *NORM_OPS):
                        continue
                    if all(not i or i in region_tensors or index.is_constant(i) for i in node.input):
                        region.add(c)
                        region_tensors.update(o for o in node.output if o)
                        grew = True
        if not region or len(region) > MAX_NODES or not any(index.nodes[n].op_type == "ReduceMean" for n in region):
            return None
        # A norm reads x twice (the statistic and the normalised x); a global
        # average pool reads it once and changes its shape.
        if len(index.consumers.get(tensor, ())) < 2:
            return None
        leaving = [t for t in region_tensors
                   if t in index.output_names or t in index.subgraph_refs
                   or any(c not in region for c in index.consumers.get(t, ()))]
        if len(leaving) != 1 or leaving[0] == tensor:
            return None
        if index.nodes[index.producer[leaving[0]]].op_type not in ("Add", "Mul", "Div", "Cast"):
            return None
        join_scope = index.scopes[index.producer[tensor]]
        if join_scope and any(index.scopes[n] and index.scopes[n] != join_scope
                              and not index.scopes[n].startswith(join_scope + ".") for n in region):
            return None
        return index.producer[leaving[0]]


PATTERN = DecomposedNormPattern()
