"""A read-only index over an ONNX graph: producers, consumers, constants,
dtypes, module scopes and reachability.

Unit discovery and surgery both reason about tensor names in the protobuf
graph; this index answers their questions in O(1) or one graph walk.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx

from .ops import NONDETERMINISTIC_OPS, SHAPE_ONLY_OPS, is_onnx

# Float element types; a weight is a float constant with more than one element.
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}

# Integer element types of quantized weights (int32 and int64 tensors are
# shapes, indices and biases, never a layer's weights).
QUANTIZED_TYPES = {
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.INT4,
    onnx.TensorProto.UINT4,
}

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def subgraph_references(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the outer scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs)
        for graph in graphs:
            local = {i.name for i in graph.initializer} | {i.name for i in graph.input}
            read: set[str] = set()
            for inner in graph.node:
                read.update(i for i in inner.input if i)
                read |= subgraph_references(inner)
                local.update(inner.output)
            names |= read - local
    return names


def declared_dims(vi: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    """A tensor's dims as declared: numbers, symbolic names, None where neither
    is given; None when no shape is declared at all."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in vi.type.tensor_type.shape.dim)


def node_scope(node: onnx.NodeProto) -> str:
    """The dotted torch module path a node was exported from, or ''.

    The dynamo exporter records it in node metadata (`pkg.torch.onnx.name_scopes`:
    the module paths from the root, then the fx node name); the TorchScript
    exporter encodes it in the node name (`/model/layers.0/self_attn/MatMul`),
    where each component is either a full path or a child name.
    """
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            modules = [s for s in scopes[:-1] if s]
            return modules[-1] if modules else ""
    name = node.name
    if not name.startswith("/"):
        return ""
    parts = [p for p in name.split("/")[1:-1] if p]
    path = ""
    for part in parts:
        if path and part.startswith(path + "."):
            path = part
        else:
            path = f"{path}.{part}" if path else part
    return path


@dataclass
class GraphIndex:
    """Producers, consumers and helpers for one `onnx.GraphProto`."""

    model: onnx.ModelProto
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=dict)
    constants: dict[str, onnx.TensorProto] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    subgraph_refs: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        graph = self.model.graph
        for init in graph.initializer:
            self.constants[init.name] = init
            self.dtypes[init.name] = init.data_type
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self.dtypes[vi.name] = vi.type.tensor_type.elem_type
        for i, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(i)
            if is_onnx(node, "Constant"):
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = attr.t
                        self.dtypes[node.output[0]] = attr.t.data_type
            implicit = subgraph_references(node)
            # A node whose subgraph (If/Loop/Scan body) reads a tensor of this
            # scope consumes it like an input.
            for name in sorted(implicit - set(node.input)):
                self.consumers.setdefault(name, []).append(i)
            self.subgraph_refs |= implicit
        # Tensors computed from constants only (exporters route shared weights
        # through Identity, cast them, or build them from Constant nodes).
        self.constant_valued: set[str] = set(self.constants)
        for node in graph.node:
            inputs = [i for i in node.input if i]
            if inputs and node.op_type not in NONDETERMINISTIC_OPS and not any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
            ) and all(i in self.constant_valued for i in inputs):
                self.constant_valued.update(o for o in node.output if o)
        self.implicit_inputs = {
            i: subgraph_references(node) for i, node in enumerate(graph.node) if any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        }
        self.input_names = [i.name for i in graph.input if i.name not in self.constants]
        self.output_names = [o.name for o in graph.output]
        self._scopes: list[str] | None = None

    @property
    def nodes(self):
        return self.model.graph.node

    # -- tensors ---------------------------------------------------------
    def is_constant(self, name: str) -> bool:
        """True for initializers, Constant outputs and anything computed from constants alone."""
        return name in self.constant_valued

    def constant_source(self, name: str) -> str:
        """The initializer behind a chain of Identity/Cast/DequantizeLinear nodes (else `name`)."""
        while name not in self.constants and name in self.producer:
            node = self.nodes[self.producer[name]]
            if node.op_type not in ("Identity", "Cast", "DequantizeLinear") or not node.input:
                break
            name = node.input[0]
        return name

    def is_weight(self, name: str) -> bool:
        """A float or quantized-integer constant with more than one element (not a
        scalar or a shape), seen through casts and dequantization."""
        tensor = self.constants.get(self.constant_source(name))
        if tensor is None or tensor.data_type not in FLOAT_TYPES | QUANTIZED_TYPES:
            return False
        return int(np.prod(tensor.dims)) > 1 if tensor.dims else False

    def numel(self, name: str) -> int:
        tensor = self.constants[name]
        return int(np.prod(tensor.dims)) if tensor.dims else 1

    def position(self, name: str) -> int:
        """Topological position of a tensor's producer (-1 for graph inputs/constants)."""
        return self.producer.get(name, -1)

    # -- scopes ----------------------------------------------------------
    @property
    def scopes(self) -> list[str]:
        if self._scopes is None:
            self._scopes = [node_scope(n) for n in self.nodes]
        return self._scopes

    # -- reachability ----------------------------------------------------
    def ancestors_of(self, tensor: str, *, stop_below: int = -1, values_only: bool = False) -> set[int]:
        """Indices of nodes that tensor depends on, ignoring nodes before `stop_below`.

        With `values_only`, the walk does not pass through Shape/Size nodes:
        what they read is needed for its shape, not its values.
        """
        seen: set[int] = set()
        queue = deque([tensor])
        while queue:
            t = queue.popleft()
            p = self.producer.get(t)
            if p is None or p in seen or p < stop_below:
                continue
            seen.add(p)
            if values_only and self.nodes[p].op_type in SHAPE_ONLY_OPS:
                continue
            queue.extend(i for i in self.nodes[p].input if i)
            queue.extend(self.implicit_inputs.get(p, ()))
        return seen

    def is_ancestor(self, source: str, tensor: str) -> bool:
        """True when the values of `tensor` are computed (strictly) from the values of `source`."""
        if source == tensor or self.is_constant(source):
            return False
        start = self.position(source)
        seen: set[str] = set()
        queue = deque([tensor])
        while queue:
            t = queue.popleft()
            p = self.producer.get(t)
            if p is None or p <= start and start >= 0:
                continue
            if self.nodes[p].op_type in SHAPE_ONLY_OPS:
                continue
            for i in self.nodes[p].input:
                if i == source:
                    return True
                if i and i not in seen:
                    seen.add(i)
                    queue.append(i)
        return False

    def descendants_of(self, tensor: str, *, within: set[int] | None = None) -> set[int]:
        """Indices of nodes that (transitively) consume `tensor`; with `within`,
        only through nodes in it (the nodes between two tensors, say)."""
        def readers(name: str):
            found = self.consumers.get(name, ())
            return found if within is None else [c for c in found if c in within]

        seen: set[int] = set()
        queue = deque(readers(tensor))
        while queue:
            i = queue.popleft()
            if i in seen:
                continue
            seen.add(i)
            for out in self.nodes[i].output:
                queue.extend(readers(out))
        return seen

    def live_nodes(self, outputs: Iterable[str], substitutions: dict[str, str] | None = None) -> set[int]:
        """Nodes needed to compute `outputs` once each key of `substitutions`
        is read from its value instead (the rewiring surgery will do)."""
        subs = substitutions or {}
        seen: set[int] = set()
        visited: set[str] = set()
        queue = deque(outputs)
        while queue:
            t = queue.popleft()
            while t in subs:
                t = subs[t]
            if t in visited:
                continue
            visited.add(t)
            p = self.producer.get(t)
            if p is None or p in seen:
                continue
            seen.add(p)
            queue.extend(i for i in self.nodes[p].input if i)
            queue.extend(self.implicit_inputs.get(p, ()))
        return seen


def walk_back(index: GraphIndex, start: str, visit: Callable[[onnx.NodeProto, list[str]], object]):
    """Breadth-first from tensor `start` towards the inputs, each producer once.

    `visit(node, computed_inputs)` returns either a list of tensors to walk on
    from, or any other value, which ends the walk and is returned (None when
    the walk runs out)."""
    queue = deque([start])
    seen: set[int] = set()
    while queue:
        p = index.producer.get(queue.popleft())
        if p is None or p in seen:
            continue
        seen.add(p)
        node = index.nodes[p]
        got = visit(node, [t for t in node.input if t and not index.is_constant(t)])
        if not isinstance(got, list):
            return got
        queue.extend(got)
    return None


def is_weighted_head(node: onnx.NodeProto, computed: list[str], ops: set[str]) -> bool:
    """A node of `ops` reading one computed tensor and at least one constant (its weights)."""
    return node.op_type in ops and len(computed) == 1 and len(computed) < len([t for t in node.input if t])
