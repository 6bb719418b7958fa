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
        """The last node of the norm that alone reads `tensor` (`spelled_norm`)
        when, with scopes, the norm runs in the join's module; else None."""
        found = spelled_norm(index, tensor)
        if found is None:
            return None
        end, region = found
        join_scope = index.scopes[index.producer[tensor]] if tensor in index.producer else ""
        if join_scope and any(index.scopes[n] and index.scopes[n] != join_scope
                              and not index.scopes[n].startswith(join_scope + ".") for n in region):
            return None
        return end


def norm_region(index: GraphIndex, tensor: str) -> tuple[set[int], set[str]]:
    """The NORM_OPS nodes grown from `tensor` whose other inputs are constants
    or region tensors (at most MAX_NODES + 1), and their tensors."""
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
    return region, region_tensors


def spelled_norm(index: GraphIndex, tensor: str) -> tuple[int, set[int]] | None:
    """(the last node, the nodes) of a LayerNorm or RMSNorm spelled out in
    element-wise ops that alone reads `tensor`, or None.

    The region is grown from `tensor` through NORM_OPS whose other inputs
    are constants or region tensors; it qualifies when it contains a
    ReduceMean, nothing outside it reads `tensor` or its intermediate
    tensors and exactly one region tensor leaves it.
    """
    region, region_tensors = norm_region(index, tensor)
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
    return index.producer[leaving[0]], region


PATTERN = DecomposedNormPattern()
