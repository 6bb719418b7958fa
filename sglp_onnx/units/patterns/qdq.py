"""A statically quantized model in QDQ form (ONNX Runtime's `quantize_static`
with `QuantFormat.QDQ`, TensorRT-style explicit quantization): float ops
between `QuantizeLinear -> DequantizeLinear` pairs.

The residual join is still a plain `Add` of two computed tensors (both
dequantized), which the `add` pattern finds. What this pattern adds is the
end of the block: the join's output is requantized, `Add -> Q -> DQ` (or
`Add -> Relu -> Q -> DQ`, or a post-norm's `Add -> Q -> DQ -> LayerNorm ->
Q -> DQ`, when the quantizer keeps the op), and that requantization belongs
to the block. The unit's exit is the last DequantizeLinear's output, its
entry the dequantized skip (the DequantizeLinear output the block's first
layer reads too). Readers of the exit then read the entry: exactly what
quantizing the pruned float model with the same quantization parameters
gives, where the next block reads the previous block's requantized output.

With `DedicatedQDQPair` the quantizer gives every reader of a tensor its
own `Q -> DQ` pair, so the skip and the branch read different (equal)
tensors and no residual is visible. `prepare` merges such duplicate pairs
(the same op on the same inputs: the same values) and `finish` gives every
reader of a shared activation pair its own pair again.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ...files.model_files import tensor_array
from ...graph.index import GraphIndex, subgraph_references
from ...graph.ops import QUANTIZATION_PRESERVING_OPS, is_onnx
from . import Join, Pattern
from .add import PATTERN as ADD, POST_ADD_OPS

DEDICATED_SUFFIX = "_sglp_dedicated"
REQUANTIZED_SUFFIX = "_requantized"
# Model metadata `prepare` leaves for `finish`: the input gave every reader its own Q -> DQ pair.
DEDICATED_KEY = "sglp.qdq.dedicated_pairs"


def requantized(index: GraphIndex, tensor: str) -> int | None:
    """The DequantizeLinear node of `tensor -> QuantizeLinear -> DequantizeLinear`
    when that pair alone reads `tensor` and the pair's Q output, else None."""
    if tensor in index.output_names or tensor in index.subgraph_refs:
        return None
    users = index.consumers.get(tensor, [])
    if len(users) != 1:
        return None
    q = index.nodes[users[0]]
    if not is_onnx(q, "QuantizeLinear") or q.input[0] != tensor:
        return None
    q_out = q.output[0]
    if q_out in index.output_names or q_out in index.subgraph_refs:
        return None
    readers = index.consumers.get(q_out, [])
    if len(readers) != 1:
        return None
    dq = index.nodes[readers[0]]
    if not is_onnx(dq, "DequantizeLinear") or dq.input[0] != q_out:
        return None
    return readers[0]


def _post_op(index: GraphIndex, tensor: str, join_node: int) -> int | None:
    """The op of the block (a ReLU, a post-norm) that alone reads `tensor`,
    judged by the `add` pattern's rules with the join's module scope."""
    users = index.consumers.get(tensor, [])
    if len(users) != 1 or index.nodes[users[0]].op_type not in POST_ADD_OPS:
        return None
    if tensor in index.output_names or tensor in index.subgraph_refs:
        return None
    if index.producer.get(tensor) == join_node:
        return ADD.block_end(index, tensor)
    # Behind a Q -> DQ pair: the op belongs to the block when it runs in the
    # join's module (a pre-norm stack's final norm does not); without scopes,
    # only activations do.
    node = index.nodes[users[0]]
    if node.input[0] != tensor or any(i and not index.is_constant(i) for i in node.input[1:]):
        return None
    if any(o for o in node.output[1:] if index.consumers.get(o) or o in index.output_names):
        return None
    join_scope, post_scope = index.scopes[join_node], index.scopes[users[0]]
    if join_scope and post_scope:
        if post_scope != join_scope and not post_scope.startswith(join_scope + "."):
            return None
    elif "Norm" in node.op_type:
        return None
    return users[0]


def _share_quantization(index: GraphIndex, exit_: str, params: tuple[str, str]) -> bool:
    """True when every node not upstream of `exit_` that reads its scale and
    zero point `params` quantizes (or dequantizes) a tensor that carries the
    exit's values on: through ops that keep the quantization (MaxPool,
    Reshape, Flatten, ...) and Q -> DQ pairs with those same parameters."""
    carriers = {exit_}
    legit: set[int] = set()
    frontier = [exit_]
    while frontier:
        t = frontier.pop()
        for r in index.consumers.get(t, []):
            node = index.nodes[r]
            if is_onnx(node, *QUANTIZATION_PRESERVING_OPS) and node.input[0] == t and t not in node.input[1:]:
                outs = [o for o in node.output if o]
            elif is_onnx(node, "QuantizeLinear", "DequantizeLinear") and node.input[0] == t \
                    and tuple(node.input[1:3]) == params:
                legit.add(r)
                outs = [node.output[0]]
            else:
                continue
            new = [o for o in outs if o not in carriers]
            carriers.update(new)
            frontier.extend(new)
    upstream = index.ancestors_of(exit_)
    readers = {r for name in params if name for r in index.consumers.get(name, [])} - upstream
    return readers <= legit


class QDQPattern(Pattern):
    name = "qdq"
    # Asked before `add`: a join followed by a ReLU and a Q -> DQ pair ends
    # at the pair, not at the ReLU.
    order = -10

    def joins(self, index: GraphIndex):
        """The `add` pattern's joins whose sum is requantized (so this pattern's `companions` apply)."""
        for join in ADD.joins(index):
            if self.block_end(index, join.output) is not None:
                yield Join(node=join.node, inputs=join.inputs, output=join.output, pattern=self)

    def companions(self, index: GraphIndex, entry: str, exit: str) -> tuple[tuple[str, str], ...]:
        """The exit's DequantizeLinear scale and zero point, paired with the
        entry's, when what reads them past the exit requantizes the exit's own
        values (an op that keeps the quantization, then Q -> DQ with the same
        parameters: ONNX Runtime's quantizer gives its output the input's).
        Without them the bypass stays valid: those pairs requantize the entry."""
        exit_dq, entry_dq = (index.producer.get(t) for t in (exit, entry))
        if exit_dq is None or entry_dq is None:
            return ()
        x, e = index.nodes[exit_dq], index.nodes[entry_dq]
        if not is_onnx(x, "DequantizeLinear") or not is_onnx(e, "DequantizeLinear"):
            return ()
        exit_params, entry_params = tuple(x.input[1:3]), tuple(e.input[1:3])
        if len(exit_params) != len(entry_params) or not all(exit_params) or not all(entry_params):
            return ()
        if any(a.name == "axis" for n in (x, e) for a in n.attribute):
            return ()
        if any(index.dtypes.get(a) != index.dtypes.get(b) for a, b in zip(exit_params, entry_params)):
            return ()  # int8 one side, uint8 the other: no Where picks between them
        if not _share_quantization(index, exit, exit_params):
            return ()
        return tuple((a, b) for a, b in zip(exit_params, entry_params) if a != b)

    def block_end(self, index: GraphIndex, tensor: str) -> int | None:
        join = index.producer.get(tensor)
        if join is None:
            return None
        end = None
        current = tensor
        dq = requantized(index, current)
        if dq is not None:
            end, current = dq, index.nodes[dq].output[0]
        post = _post_op(index, current, join)
        if post is not None:
            dq = requantized(index, index.nodes[post].output[0])
            if dq is not None:
                return dq
            # A float op after a requantized sum, itself not requantized:
            # the block ends at that op.
            return post if end is not None else None
        return end

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto | None:
        """A copy of a QDQ model (None for any other) in which duplicate
        activation Q and DQ nodes (same op, inputs and attributes) are merged
        into the first of each kind; `finish` then requantizes biases, and
        re-dedicates pairs when there were duplicates."""
        weights = {i.name for i in model.graph.initializer}
        quantized = {n.output[0] for n in model.graph.node
                     if is_onnx(n, "QuantizeLinear") and n.input and n.input[0] not in weights}
        if not any(is_onnx(n, "DequantizeLinear") and n.input and n.input[0] in quantized for n in model.graph.node):
            return None  # no activation Q -> DQ pair: not a QDQ model
        merged = onnx.ModelProto()
        merged.CopyFrom(model)
        graph = merged.graph
        protected = set(o.name for o in graph.output)
        for node in graph.node:
            protected |= subgraph_references(node)
        initializers = {i.name for i in graph.initializer}
        changed = False
        for op in ("QuantizeLinear", "DequantizeLinear"):
            first: dict[tuple, onnx.NodeProto] = {}
            rename: dict[str, str] = {}
            drop: set[int] = set()
            for k, node in enumerate(graph.node):
                for i, name in enumerate(node.input):
                    if name in rename:
                        node.input[i] = rename[name]
                if not is_onnx(node, op) or not node.input or node.input[0] in initializers:
                    continue
                if len(node.output) != 1 or node.output[0] in protected:
                    continue
                key = (tuple(node.input), tuple(a.SerializeToString(deterministic=True) for a in
                                               sorted(node.attribute, key=lambda a: a.name)))
                kept = first.setdefault(key, node)
                if kept is not node:
                    rename[node.output[0]] = kept.output[0]
                    drop.add(k)
            if drop:
                changed = True
                kept_nodes = [n for k, n in enumerate(graph.node) if k not in drop]
                del graph.node[:]
                graph.node.extend(kept_nodes)
        if changed:
            kept_names = {o for n in graph.node for o in n.output}
            value_info = [vi for vi in graph.value_info if vi.name in kept_names or vi.name in initializers]
            del graph.value_info[:]
            graph.value_info.extend(value_info)
            merged.metadata_props.add(key=DEDICATED_KEY, value="1")
        return merged

    def finish(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Biases requantized for the input scale their op now reads, and, when
        `prepare` merged duplicate pairs, every reader of a shared activation
        pair beyond the first given its own copy (what `DedicatedQDQPair` writes)."""
        dedicated = any(p.key == DEDICATED_KEY for p in model.metadata_props)
        if dedicated:
            kept = [p for p in model.metadata_props if p.key != DEDICATED_KEY]
            del model.metadata_props[:]
            model.metadata_props.extend(kept)
        requantize_biases(model)
        if dedicated:
            dedicate(model)
        return model


def requantize_biases(model: onnx.ModelProto) -> None:
    """Each int32 bias of a Conv, ConvTranspose or Gemm whose scale is not its
    input scale times its weight scale (the block before it went, so it reads
    another block's output) requantized with that scale, in place.

    The bias keeps its value up to rounding; ONNX Runtime, which runs
    `DQ -> Conv -> Q` as one integer convolution, reads the int32 bias in
    units of input scale times weight scale whatever its own scale says.
    """
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    by_output = {o: n for n in graph.node for o in n.output if o}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    taken = set(initializers) | set(by_output) | {n.name for n in graph.node}

    def dequantized(name: str):
        dq = by_output.get(name)
        if dq is None or not is_onnx(dq, "DequantizeLinear") or len(dq.input) < 2:
            return None
        return dq

    def value(name: str):
        return None if name not in initializers else tensor_array(initializers[name])

    def fresh(base: str) -> str:
        name, k = f"{base}{REQUANTIZED_SUFFIX}", 1
        while name in taken:
            k += 1
            name = f"{base}{REQUANTIZED_SUFFIX}{k}"
        taken.add(name)
        return name

    added: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    for node in graph.node:
        if not is_onnx(node, "Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        x, w, b = (dequantized(t) for t in node.input[:3])
        if x is None or w is None or b is None:
            continue
        x_scale, w_scale = value(x.input[1]), value(w.input[1])
        bias, b_scale = value(b.input[0]), value(b.input[1])
        if x_scale is None or w_scale is None or bias is None or b_scale is None or bias.dtype != np.int32 \
                or x_scale.size != 1:
            continue
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0) if node.op_type == "Gemm" else 1.0
        # The scale ONNX Runtime's quantizer gives a bias: input scale x weight scale (x Gemm's beta).
        wanted = (x_scale.reshape(()) * w_scale * np.float32(beta)).astype(np.float32)
        if wanted.size != b_scale.size:
            continue
        wanted = wanted.reshape(b_scale.shape)
        if np.allclose(b_scale, wanted, rtol=1e-6, atol=0.0):
            continue
        ratio = b_scale.astype(np.float64).reshape(-1) / wanted.astype(np.float64).reshape(-1)
        shape = (-1,) + (1,) * (bias.ndim - 1) if ratio.size > 1 else ()
        requantized_bias = np.round(bias.astype(np.float64) * ratio.reshape(shape)).astype(np.int32)
        copy = onnx.NodeProto()
        copy.CopyFrom(b)
        copy.name = fresh(b.name or "DequantizeLinear")
        copy.input[0] = fresh(b.input[0])
        copy.input[1] = fresh(b.input[1])
        copy.output[0] = fresh(b.output[0])
        graph.initializer.extend([numpy_helper.from_array(requantized_bias, copy.input[0]),
                                  numpy_helper.from_array(wanted, copy.input[1])])
        node.input[2] = copy.output[0]
        added.append((node, copy))
    if added:
        _insert_before(graph, added)


def _insert_before(graph: onnx.GraphProto, added: list[tuple[onnx.NodeProto, onnx.NodeProto]]) -> None:
    """Each (node, new bias DQ) pair: the DQ placed just before its node; the
    bias DQs no op reads any more go, with what only they read."""
    before = {id(node): copy for node, copy in added}
    nodes = []
    for node in graph.node:
        if id(node) in before:
            nodes.append(before[id(node)])
        nodes.append(node)
    still_read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in nodes if is_onnx(n, "DequantizeLinear") and n.output[0] not in still_read]
    nodes = [n for n in nodes if all(n is not d for d in dead)]
    del graph.node[:]
    graph.node.extend(nodes)
    still_read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    orphaned = {i for d in dead for i in d.input}
    for init in [i for i in graph.initializer if i.name in orphaned and i.name not in still_read]:
        graph.initializer.remove(init)


def dedicate(model: onnx.ModelProto) -> None:
    """Every reader of a shared activation `Q -> DQ` pair beyond the first gets its own copy of the pair, in place."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(i for i in node.input if i):
            readers.setdefault(name, []).append(node)
    initializers = {i.name for i in graph.initializer}
    taken = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | initializers \
        | {i.name for i in graph.input}
    extra: dict[int, list[onnx.NodeProto]] = {}

    def fresh(base: str) -> str:
        k = 1
        while f"{base}{DEDICATED_SUFFIX}{k}" in taken:
            k += 1
        taken.add(f"{base}{DEDICATED_SUFFIX}{k}")
        return f"{base}{DEDICATED_SUFFIX}{k}"

    for position, dq in enumerate(graph.node):
        if not is_onnx(dq, "DequantizeLinear") or len(readers.get(dq.output[0], [])) < 2:
            continue
        q = producer.get(dq.input[0])
        if q is None or not is_onnx(q, "QuantizeLinear") or q.input[0] in initializers \
                or len(readers.get(q.output[0], [])) != 1:
            continue
        for reader in readers[dq.output[0]][1:]:
            q_copy, dq_copy = onnx.NodeProto(), onnx.NodeProto()
            q_copy.CopyFrom(q)
            dq_copy.CopyFrom(dq)
            q_copy.name, dq_copy.name = fresh(q.name or "QuantizeLinear"), fresh(dq.name or "DequantizeLinear")
            q_copy.output[0] = fresh(q.output[0])
            dq_copy.input[0] = q_copy.output[0]
            dq_copy.output[0] = fresh(dq.output[0])
            for i, name in enumerate(reader.input):
                if name == dq.output[0]:
                    reader.input[i] = dq_copy.output[0]
            extra.setdefault(position, []).extend([q_copy, dq_copy])
    if not extra:
        return
    nodes = []
    for position, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(extra.get(position, ()))
    del graph.node[:]
    graph.node.extend(nodes)


PATTERN = QDQPattern()
