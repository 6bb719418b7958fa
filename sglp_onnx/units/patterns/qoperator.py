"""A statically quantized model in QOperator form (ONNX Runtime's
`quantize_static` with `QuantFormat.QOperator`): integer tensors between
QLinear ops, each read with its scale and zero point.

The residual join is com.microsoft `QLinearAdd(A, A_scale, A_zp, B, B_scale,
B_zp, C_scale, C_zp) -> C`, summing the computed tensors A and B. A ReLU
after the join is absorbed by C's zero point; a LeakyReLU is a following
`QLinearLeakyRelu`, and an activation the quantizer keeps in float is a
`DequantizeLinear -> op -> QuantizeLinear` after the join: either ends the
block.

Bypassing a block hands what reads its exit the entry's integers, which mean
something only with the entry's scale and zero point: `companions` pairs
the exit's scale and zero point with the entry's (as the join reads the
skip), and the bypass makes everything that reads the exit's ones and is
not upstream of the exit read the entry's instead. Two more things read a
tensor's scale implicitly:

- ops that pass the integers on unchanged (MaxPool, Reshape, Flatten, ...):
  their readers read the exit's scale too, and are re-pointed alike;
- an int32 bias (QLinearConv, QGemm) is quantized with its input's scale
  times the weight's. `prepare` makes each such bias a function of the
  input scale its op reads, `round(B * s_quantized / s_read)` in double
  precision (exactly B while the scale is the one it was quantized with),
  so it follows the bypass in the gated model; `finish` folds every one
  back into an int32 initializer (the original one where the scale did
  not change).

A join is offered only where this is exact (`exact_exit`): every reader of
the exit's integers, directly or through pass-through ops, is a quantized op
reading them with the exit's scale and zero point (its bias, if any, made to
follow the scale), and nothing else that is not upstream of the exit reads
those; and not where the block would end at the join although a float op of
the block follows it (a LeakyReLU between DequantizeLinear and an op that is
not a QuantizeLinear: the bypass would apply it to the entry too).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...files.model_files import tensor_array
from ...graph.index import GraphIndex
from ...graph.ops import PASS_THROUGH_OPS, QUANTIZATION_PRESERVING_OPS, is_contrib, is_onnx, quantized_operands
from . import Join, Pattern
from .add import POST_ADD_OPS

JOIN_OPS = ("QLinearAdd",)
# Activations that may end a block, as com.microsoft QLinear ops.
QLINEAR_POST_OPS = ("QLinearLeakyRelu",)
# Ops with an int32 bias quantized with (input scale x weight scale): (bias position, input scale position).
BIASED_OPS = {("", "QLinearConv"): (8, 1), ("com.microsoft", "QLinearConv"): (8, 1), ("com.microsoft", "QGemm"): (6, 1)}
BIAS_PREFIX = "sglp_bias/"


def _input(node, position: int) -> str:
    return node.input[position] if position < len(node.input) else ""


def output_parameters(index: GraphIndex, tensor: str) -> tuple[str, str] | None:
    """The (scale, zero point) its producer quantizes `tensor` with, or None."""
    p = index.producer.get(tensor)
    if p is None:
        return None
    node = index.nodes[p]
    described = quantized_operands(node)
    if described is None or described[1] is None or node.output[0] != tensor:
        return None
    scale, zero_point = (_input(node, k) for k in described[1])
    return (scale, zero_point) if scale and zero_point else None


def read_parameters(index: GraphIndex, node_index: int, tensor: str) -> tuple[str, str] | None:
    """The (scale, zero point) node `node_index` reads `tensor` with, None when
    it does not read it as a quantized operand or reads it at several places
    with different ones."""
    node = index.nodes[node_index]
    described = quantized_operands(node)
    if described is None:
        return None
    found = {(_input(node, s), _input(node, z)) for k, (s, z) in described[0].items() if _input(node, k) == tensor}
    if len(found) != 1 or any(k not in described[0] for k, name in enumerate(node.input) if name == tensor):
        return None
    return found.pop()


def _passes_on(node: onnx.NodeProto, tensor: str) -> bool:
    return is_onnx(node, *QUANTIZATION_PRESERVING_OPS) and node.input[0] == tensor and tensor not in node.input[1:]


def carriers(index: GraphIndex, exit_: str) -> set[str] | None:
    """`exit_` and the tensors that carry its integers on unchanged (through
    MaxPool, Reshape, Flatten, ...), so are read with its scale and zero
    point; None when one of them leaves the graph."""
    found = {exit_}
    frontier = [exit_]
    while frontier:
        t = frontier.pop()
        if t in index.output_names or t in index.subgraph_refs:
            return None
        for r in index.consumers.get(t, []):
            if _passes_on(index.nodes[r], t):
                new = [o for o in index.nodes[r].output if o and o not in found]
                found.update(new)
                frontier.extend(new)
    return found


def _bias_reader(index: GraphIndex, node_index: int) -> int | None:
    """The op whose bias `prepare`'s subgraph that starts at node `node_index` computes."""
    node = index.nodes[node_index]
    if not node.name.startswith(BIAS_PREFIX):
        return None
    for _ in range(8):
        readers = index.consumers.get(node.output[0], [])
        if len(readers) != 1:
            return None
        node_index = readers[0]
        node = index.nodes[node_index]
        if not node.name.startswith(BIAS_PREFIX):
            return node_index
    return None


def exact_exit(index: GraphIndex, exit_: str) -> bool:
    """True when bypassing a block that ends at `exit_` is exact once every
    node that reads its scale and zero point and is not upstream of it reads
    the entry's instead (what the bypass does with `companions`): every
    reader of the exit's integers, directly or through ops that pass them on
    unchanged, is a quantized op reading them with the exit's scale and zero
    point, and nothing else that is not upstream reads those (but the bias
    `prepare` computes from a reader's input scale)."""
    params = output_parameters(index, exit_)
    held = None if params is None else carriers(index, exit_)
    if held is None or not index.consumers.get(exit_):
        return False
    direct: set[int] = set()
    for t in held:
        for r in index.consumers.get(t, []):
            if _passes_on(index.nodes[r], t):
                continue
            if read_parameters(index, r, t) != params:
                return False
            node = index.nodes[r]
            positions = BIASED_OPS.get((node.domain or "", node.op_type))
            if positions is not None and _input(node, positions[0]):
                bias = index.producer.get(node.input[positions[0]])
                if bias is None or not index.nodes[bias].name.startswith(BIAS_PREFIX):
                    return False  # a bias `prepare` could not make follow the input scale
            direct.add(r)
    upstream = index.ancestors_of(exit_)
    for r in {r for name in params for r in index.consumers.get(name, [])} - upstream:
        if r not in direct:
            reader = _bias_reader(index, r)
            if reader in direct and index.nodes[r].input[0] == index.nodes[reader].input[1]:
                continue
            return False
        node = index.nodes[r]
        for_exit = {p for k, pair in quantized_operands(node)[0].items() if _input(node, k) in held for p in pair}
        if any(name in params and k not in for_exit for k, name in enumerate(node.input)):
            return False
    return True


def entry_parameters(index: GraphIndex, entry: str) -> tuple[str, str] | None:
    """The (scale, zero point) a block's entry is read with: as a residual
    join reads it (the skip), else as every quantized reader reads it, else
    as its producer writes it."""
    joins, others = set(), set()
    for r in index.consumers.get(entry, []):
        params = read_parameters(index, r, entry)
        if params is not None:
            (joins if is_contrib(index.nodes[r], *JOIN_OPS) else others).add(params)
    for found in (joins, others):
        if len(found) == 1:
            params = found.pop()
            return params if all(params) else None
        if found:
            return None
    return output_parameters(index, entry)


def _no_op_source(index: GraphIndex, tensor: str) -> str:
    """`tensor` seen back through Identity and Cast nodes (what a skip is seen through)."""
    while (p := index.producer.get(tensor)) is not None and is_onnx(index.nodes[p], *PASS_THROUGH_OPS):
        tensor = index.nodes[p].input[0]
    return tensor


def _float_post_op(index: GraphIndex, tensor: str) -> bool:
    """True when `tensor` is dequantized for an op of the block that is not
    requantized after it (other than an idempotent ReLU): ending the block
    at `tensor` would apply that op to the entry too."""
    users = index.consumers.get(tensor, [])
    if len(users) != 1 or not is_onnx(index.nodes[users[0]], "DequantizeLinear"):
        return False
    after = index.consumers.get(index.nodes[users[0]].output[0], [])
    return any(index.nodes[r].op_type in POST_ADD_OPS and index.nodes[r].op_type != "Relu" for r in after)


class QOperatorPattern(Pattern):
    name = "qoperator"
    # Asked before `qdq` and `add`: the block end of a QLinearAdd is this pattern's.
    order = -20
    # `prepare`'s bias computation rounds with Round (opset 11).
    opsets = (11, 10_000)

    def joins(self, index: GraphIndex):
        for i, node in enumerate(index.nodes):
            if not is_contrib(node, *JOIN_OPS) or len(node.input) < 8 or not all(node.input):
                continue
            a, b = node.input[0], node.input[3]
            if index.is_constant(a) or index.is_constant(b):
                continue
            # Either operand may turn out to be the skip: both need a known
            # scale and zero point for `companions`.
            if any(entry_parameters(index, _no_op_source(index, t)) is None for t in (a, b)):
                continue
            end = self.block_end(index, node.output[0])
            if end is None and _float_post_op(index, node.output[0]):
                continue
            if not exact_exit(index, node.output[0]):
                continue
            if end is not None and not exact_exit(index, index.nodes[end].output[0]):
                continue
            yield Join(node=i, inputs=(a, b), output=node.output[0], pattern=self)

    def block_end(self, index: GraphIndex, tensor: str) -> int | None:
        p = index.producer.get(tensor)
        if p is None or not is_contrib(index.nodes[p], *JOIN_OPS):
            return None
        if tensor in index.output_names or tensor in index.subgraph_refs:
            return None
        users = index.consumers.get(tensor, [])
        if len(users) != 1:
            return None
        node = index.nodes[users[0]]
        if is_contrib(node, *QLINEAR_POST_OPS) and node.input[0] == tensor:
            return users[0]
        # An activation kept in float: DequantizeLinear -> op -> QuantizeLinear.
        if not is_onnx(node, "DequantizeLinear") or node.input[0] != tensor:
            return None
        chain = [users[0]]
        for op_types in (POST_ADD_OPS, ("QuantizeLinear",)):
            out = index.nodes[chain[-1]].output[0]
            if out in index.output_names or out in index.subgraph_refs:
                return None
            nxt = index.consumers.get(out, [])
            if len(nxt) != 1 or not is_onnx(index.nodes[nxt[0]], *op_types) or index.nodes[nxt[0]].input[0] != out:
                return None
            if any(i and not index.is_constant(i) for i in index.nodes[nxt[0]].input[1:]):
                return None
            chain.append(nxt[0])
        post = index.nodes[chain[1]]
        if any(o for o in post.output[1:] if index.consumers.get(o) or o in index.output_names):
            return None
        join_scope, post_scope = index.scopes[p], index.scopes[chain[1]]
        if join_scope and post_scope and post_scope != join_scope and not post_scope.startswith(join_scope + "."):
            return None
        return chain[-1]

    def companions(self, index: GraphIndex, entry: str, exit: str) -> tuple[tuple[str, str], ...]:
        exit_params = output_parameters(index, exit)
        entry_params = entry_parameters(index, entry)
        if exit_params is None or entry_params is None:
            return ()
        return tuple((x, e) for x, e in zip(exit_params, entry_params) if x != e)

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto | None:
        """A copy of `model` in which every int32 bias of a QLinearConv or QGemm
        is computed from the input scale the op reads, or None when there is none."""
        if not any(n.op_type in JOIN_OPS and n.domain == "com.microsoft" for n in model.graph.node):
            return None
        initializers = {i.name: i for i in model.graph.initializer}
        prepared = onnx.ModelProto()
        prepared.CopyFrom(model)
        graph = prepared.graph
        nodes: list[onnx.NodeProto] = []
        added: list[onnx.TensorProto] = []
        for k, node in enumerate(graph.node):
            positions = BIASED_OPS.get((node.domain or "", node.op_type))
            if positions is not None:
                bias, scale = (_input(node, p) for p in positions)
                b, s = initializers.get(bias), initializers.get(scale)
                if b is not None and s is not None and b.data_type == onnx.TensorProto.INT32 \
                        and s.data_type == onnx.TensorProto.FLOAT and int(np.prod(s.dims)) == 1:
                    tag = f"{BIAS_PREFIX}{k}/{node.name}"
                    quantized = helper.make_tensor(f"{tag}/quantized_scale", onnx.TensorProto.DOUBLE, [],
                                                   [float(tensor_array(s).reshape(()))])
                    added.append(quantized)
                    double = onnx.TensorProto.DOUBLE
                    nodes += [
                        helper.make_node("Cast", [scale], [f"{tag}/read_scale"], name=f"{tag}/read_scale", to=double),
                        helper.make_node("Div", [quantized.name, f"{tag}/read_scale"], [f"{tag}/ratio"],
                                         name=f"{tag}/ratio"),
                        helper.make_node("Cast", [bias], [f"{tag}/original"], name=f"{tag}/original", to=double),
                        helper.make_node("Mul", [f"{tag}/original", f"{tag}/ratio"], [f"{tag}/scaled"],
                                         name=f"{tag}/scaled"),
                        helper.make_node("Round", [f"{tag}/scaled"], [f"{tag}/rounded"], name=f"{tag}/rounded"),
                        helper.make_node("Cast", [f"{tag}/rounded"], [f"{tag}/bias"], name=f"{tag}/bias",
                                         to=onnx.TensorProto.INT32),
                    ]
                    node.input[positions[0]] = f"{tag}/bias"
            nodes.append(node)
        if not added:
            return None
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(added)
        return prepared

    def finish(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Each bias `prepare` made a computation is an int32 initializer again:
        the original one where the op reads the scale it was quantized with,
        else the bias requantized for the scale it reads."""
        graph = model.graph
        initializers = {i.name: i for i in graph.initializer}
        by_output = {o: n for n in graph.node for o in n.output}
        new_initializers = []
        taken = set(initializers) | set(by_output)
        for node in graph.node:
            if node.name.startswith(BIAS_PREFIX):
                continue
            for pos, name in enumerate(node.input):
                last = by_output.get(name)
                if last is None or not last.name.startswith(BIAS_PREFIX) or not name.endswith("/bias"):
                    continue
                tag = name[: -len("/bias")]
                original = by_output[f"{tag}/original"].input[0]
                read = by_output[f"{tag}/read_scale"].input[0]
                b = tensor_array(initializers[original])
                quantized = tensor_array(initializers[f"{tag}/quantized_scale"]).astype(np.float64)
                s = tensor_array(initializers[read]).astype(np.float64).reshape(())
                # The computation `prepare` wrote, in the same double precision.
                value = np.round(b.astype(np.float64) * (quantized / s)).astype(np.int32)
                if np.array_equal(value, b):
                    node.input[pos] = original
                    continue
                fresh, k = f"{original}_requantized", 1
                while fresh in taken:
                    k += 1
                    fresh = f"{original}_requantized{k}"
                taken.add(fresh)
                new_initializers.append(numpy_helper.from_array(value, fresh))
                node.input[pos] = fresh
        made = {i for n in graph.node if n.name.startswith(BIAS_PREFIX) for i in n.input if i.startswith(BIAS_PREFIX)}
        replaced = {n.input[0] for n in graph.node if n.name.startswith(BIAS_PREFIX) and n.name.endswith("/original")}
        kept = [n for n in graph.node if not n.name.startswith(BIAS_PREFIX)]
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(new_initializers)
        # What `prepare` added, and original biases no op reads any more.
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for init in [i for i in graph.initializer if i.name in made | replaced and i.name not in read]:
            graph.initializer.remove(init)
        return model


PATTERN = QOperatorPattern()
