"""ONNX Runtime's fused residual join and norm: com.microsoft
`SkipLayerNormalization` and `SkipSimplifiedLayerNormalization`.

Both compute `s = input + skip (+ bias)` and normalise it: output 0 is the
(RMS) norm of `s`, output 3 (optional) is `s` itself; outputs 1 and 2 (mean,
inverse standard deviation) are rarely used. Graphs from ONNX Runtime's
transformer optimizer (BERT, GPT-2) and from the onnxruntime-genai builder
(Llama and friends) carry every residual join inside one of them, so no
plain `Add` is left to find. Which of `input` and `skip` is the residual
stream differs: the transformer optimizer puts the sublayer output in
`input` (and the sublayer's dense bias in `bias`), the genai builder puts
the residual stream there.

`prepare` splits every such node whose outputs 1 and 2 are unused into what
it computes, all in the default domain:

- `Add(branch, bias)` when there is a bias, on the side that is not the
  residual stream (the side the other side is not computed from), so the
  bias goes with its layer;
- `Add(input', skip')` (inputs in the fused node's order), producing the
  tensor that was output 3, or a fresh name when output 3 was not declared;
- `LayerNormalization(s, gamma, beta, axis=-1, epsilon)` or ONNX Runtime's
  `SimplifiedLayerNormalization(s, gamma, axis=-1, epsilon)` (registered by
  ONNX Runtime in the default domain, as the genai builder emits it),
  producing output 0.

The plain `Add` pattern then sees the residual joins (a post-norm graph's
norm ends its block). `finish` re-fuses on the pruned model: every
surviving norm made by `prepare` whose input is a surviving sum made by
`prepare` becomes one fused node again (the norm's op type, gamma, beta and
epsilon; the sum's input, skip and bias), declaring output 3 only where the
sum is still read by something else or is a graph output. A norm left
without its sum (a pre-norm model whose layer 0 went now normalises the
embeddings) stays a standalone norm: `LayerNormalization` from opset 17 on
(ONNX Runtime runs its own before, but ONNX has none there, so below 17 it
is the fused node again with an all-zero skip, `ConstantOfShape(Shape(x))`:
x + 0 is x exactly), ONNX Runtime's `SimplifiedLayerNormalization` at any
opset; a sum left without a norm stays a plain `Add`. With nothing
removed, `finish(prepare(m))` has `m`'s nodes again and computes exactly
its outputs.

The split nodes are named `sglp_split/{sum,bias,norm}/<fused node name>`,
which `finish` recognises. A fused node's name says little about its layer
(the genai builder names the node that holds layer k's MLP residual after
layer k+1's input norm; the transformer optimizer numbers them), so a sum
takes the module scope of the node that computes its sublayer side (the
sublayer's output projection, `/model/layers.3/mlp/down_proj/MatMul`), as
`pkg.torch.onnx.name_scopes` metadata, when every sum of the graph has one;
otherwise none has, and layers are told apart by their attention (see
`discovery._group`).
"""

from __future__ import annotations

import onnx
from onnx import helper

from ...graph.index import NAME_SCOPES_KEY, GraphIndex, subgraph_references
from ...graph.ops import CONTRIB_DOMAIN, is_contrib, is_onnx
from . import Pattern, default_opset

FUSED = {"SkipLayerNormalization": "LayerNormalization",
         "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization"}
UNFUSED = {norm: fused for fused, norm in FUSED.items()}
# ONNX Runtime's default epsilon of both fused ops (the unfused norms default to 1e-5).
FUSED_EPSILON = 1e-12
# ONNX defines LayerNormalization from this opset on.
LAYER_NORM_OPSET = 17

# On a split norm: the fused node had no epsilon attribute (the split norm states ONNX Runtime's default).
DEFAULT_EPSILON_KEY = "sglp.fused_epsilon_default"
# A split norm keeps the fused node's metadata, its module scope under this prefix
# (the sum carries the scope discovery reads; a norm's own would hide its block end).
STASHED = "sglp.fused."
PREFIX = "sglp_split/"
UNNAMED = "sglp_unnamed#"
KINDS = ("sum", "bias", "norm")


def split_name(kind: str, base: str) -> str:
    return f"{PREFIX}{kind}/{base}"


def parse_name(name: str) -> tuple[str, str] | None:
    """(kind, fused node name) of a node `prepare` made, else None."""
    if not name.startswith(PREFIX):
        return None
    kind, _, base = name[len(PREFIX):].partition("/")
    return (kind, base) if kind in KINDS else None


def _epsilon(node: onnx.NodeProto) -> float:
    return next((a.f for a in node.attribute if a.name == "epsilon"), FUSED_EPSILON)


def _used(index: GraphIndex, tensor: str) -> bool:
    return bool(tensor) and (bool(index.consumers.get(tensor)) or tensor in index.output_names
                             or tensor in index.subgraph_refs)


def _splittable(index: GraphIndex, node: onnx.NodeProto) -> bool:
    if not is_contrib(node, *FUSED) or len(node.input) < 3 or not node.input[0] or not node.input[1]:
        return False
    if not node.output or not node.output[0]:
        return False
    return not any(_used(index, t) for t in node.output[1:3])


class SkipLayerNormPattern(Pattern):
    name = "skip-layer-norm"
    order = 20

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto | None:
        index = GraphIndex(model)
        targets = [i for i, node in enumerate(index.nodes) if _splittable(index, node)]
        if not targets:
            return None
        out = onnx.ModelProto()
        out.CopyFrom(model)
        nodes: list[onnx.NodeProto] = []
        taken = {n.name for n in model.graph.node}
        unnamed = 0
        sides = {i: _sublayer_side(index, index.nodes[i]) for i in targets}
        scopes = {i: index.scopes[index.producer[index.nodes[i].input[side]]]
                  if index.nodes[i].input[side] in index.producer else "" for i, side in sides.items()}
        if not all(scopes.values()):
            scopes = dict.fromkeys(scopes, "")
        for i, node in enumerate(index.nodes):
            if i not in sides:
                nodes.append(node)
                continue
            base = node.name
            if not base:
                while f"{UNNAMED}{unnamed}" in taken:
                    unnamed += 1
                base = f"{UNNAMED}{unnamed}"
                unnamed += 1
            nodes += _split(node, base, sides[i], scopes[i])
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        # ONNX Runtime's fp16 conversion also lists the graph inputs and outputs
        # in value_info, without their shapes; those copies would replace the
        # declared shapes when the graph is rewritten.
        io_names = {vi.name for vi in list(model.graph.input) + list(model.graph.output)}
        kept = [vi for vi in out.graph.value_info if vi.name not in io_names]
        del out.graph.value_info[:]
        out.graph.value_info.extend(kept)
        return out

    def finish(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Re-fuse `model` in place (its weights are not copied) and return it."""
        graph = model.graph
        made = {i: parse_name(n.name) for i, n in enumerate(graph.node)}
        if not any(made.values()):
            return model
        producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
        readers: dict[str, list[int]] = {}
        for i, n in enumerate(graph.node):
            for t in n.input:
                if t:
                    readers.setdefault(t, []).append(i)
            for t in subgraph_references(n):
                readers.setdefault(t, []).append(i)
        outputs = {o.name for o in graph.output}
        old_opset = default_opset(model) < LAYER_NORM_OPSET
        dtypes = {t.name: t.data_type for t in graph.initializer}
        dtypes.update((vi.name, vi.type.tensor_type.elem_type) for vi in list(graph.value_info) + list(graph.input)
                      if vi.type.tensor_type.elem_type)

        replaced: dict[int, onnx.NodeProto] = {}
        extra: dict[int, list[onnx.NodeProto]] = {}  # nodes to insert before node i
        dropped: set[int] = set()
        for i, node in enumerate(graph.node):
            tag = made[i]
            if tag is None or tag[0] != "norm" or not is_onnx(node, *UNFUSED):
                continue
            s = producer.get(node.input[0])
            if s is None or s in dropped or made.get(s) is None or made[s][0] != "sum":
                if old_opset and node.op_type == "LayerNormalization":
                    extra[i], replaced[i] = _zero_skip(node, tag[1], dtypes.get(node.input[1], onnx.TensorProto.FLOAT))
                else:
                    replaced[i] = _standalone(node, tag[1])
                continue
            sum_node = graph.node[s]
            fused_inputs, bias_node = _sum_operands(graph, producer, made, readers, sum_node)
            total = sum_node.output[0]
            keep_sum = any(r != i for r in readers.get(total, ())) or total in outputs
            replaced[i] = _fused(node, tag[1], fused_inputs, total if keep_sum else "")
            dropped.add(s)
            if bias_node is not None:
                dropped.add(bias_node)
        for i, node in enumerate(graph.node):
            tag = made[i]
            if i in replaced or i in dropped or tag is None:
                continue
            # A sum (or its bias) whose norm went: plain Adds, named after the fused node.
            renamed = onnx.NodeProto()
            renamed.CopyFrom(node)
            renamed.name = f"{_original_name(tag[1])}/{tag[0]}" if _original_name(tag[1]) else ""
            del renamed.metadata_props[:]
            replaced[i] = renamed

        nodes = []
        for i, n in enumerate(graph.node):
            if i not in dropped:
                for node in extra.get(i, []) + [replaced.get(i, n)]:
                    copy = onnx.NodeProto()
                    copy.CopyFrom(node)
                    nodes.append(copy)
        nodes = _toposorted(nodes, graph)
        del graph.node[:]
        graph.node.extend(nodes)
        # The bias sums and undeclared sums that were fused away.
        gone = set(producer) - {o for n in graph.node for o in n.output if o}
        kept_info = [vi for vi in graph.value_info if vi.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
        return model


def _sublayer_side(index: GraphIndex, node: onnx.NodeProto) -> int:
    """0 or 1: which of the fused node's input and skip is the sublayer's output
    (the one computed from the other; the input when neither is)."""
    inp, skip = node.input[0], node.input[1]
    return 1 if _computed_from(index, inp, skip) and not _computed_from(index, skip, inp) else 0


def _computed_from(index: GraphIndex, source: str, tensor: str) -> bool:
    """`tensor` is computed from `source`, or from another output of the node
    that computes it (a fused node's output 3 is the stream, its output 0 the
    norm the next sublayer reads)."""
    if index.is_ancestor(source, tensor):
        return True
    p = index.producer.get(source)
    return p is not None and p in index.ancestors_of(tensor, stop_below=p)


def _split(node: onnx.NodeProto, base: str, side: int, scope: str) -> list[onnx.NodeProto]:
    """The Add node(s) and the norm that `node` computes; the bias goes to the sublayer's `side`."""
    op = node.op_type
    inp, skip = node.input[0], node.input[1]
    gamma = node.input[2]
    if op == "SkipLayerNormalization":
        beta = node.input[3] if len(node.input) > 3 else ""
        bias = node.input[4] if len(node.input) > 4 else ""
    else:
        beta = ""
        bias = node.input[3] if len(node.input) > 3 else ""
    total = node.output[3] if len(node.output) > 3 and node.output[3] else f"{base}/sglp_sum_output"
    result = []
    operands = [inp, skip]
    if bias:
        biased = f"{base}/sglp_bias_output"
        result.append(helper.make_node("Add", [operands[side], bias], [biased], name=split_name("bias", base)))
        operands[side] = biased
    sum_node = helper.make_node("Add", operands, [total], name=split_name("sum", base))
    if scope:
        sum_node.metadata_props.add(key=NAME_SCOPES_KEY, value=repr([scope, "sglp_sum"]))
    result.append(sum_node)
    norm_inputs = [total, gamma] + ([beta] if beta else [])
    norm = helper.make_node(FUSED[op], norm_inputs, [node.output[0]], name=split_name("norm", base),
                            axis=-1, epsilon=_epsilon(node))
    for prop in node.metadata_props:
        norm.metadata_props.add(key=STASHED + prop.key if prop.key == NAME_SCOPES_KEY else prop.key, value=prop.value)
    if not any(a.name == "epsilon" for a in node.attribute):
        norm.metadata_props.add(key=DEFAULT_EPSILON_KEY, value="1")
    result.append(norm)
    return result


def _original_name(base: str) -> str:
    return "" if base.startswith(UNNAMED) else base


def _sum_operands(graph, producer, made, readers, sum_node) -> tuple[list[str], int | None]:
    """(input, skip, bias) of the fused node a `prepare` sum computes, and the index of its bias Add."""
    operands = list(sum_node.input[:2])
    bias = ""
    bias_node = None
    base = parse_name(sum_node.name)[1]
    for side, tensor in enumerate(operands):
        p = producer.get(tensor)
        if p is None or made.get(p) != ("bias", base) or len(readers.get(tensor, ())) != 1:
            continue
        operands[side] = graph.node[p].input[0]
        bias = graph.node[p].input[1]
        bias_node = p
        break
    return operands + [bias], bias_node


def _fused(norm: onnx.NodeProto, base: str, operands: list[str], total: str) -> onnx.NodeProto:
    inp, skip, bias = operands
    op = UNFUSED[norm.op_type]
    gamma = norm.input[1]
    if op == "SkipLayerNormalization":
        beta = norm.input[2] if len(norm.input) > 2 else ""
        inputs = [inp, skip, gamma, beta, bias]
    else:
        inputs = [inp, skip, gamma, bias]
    while inputs and not inputs[-1]:
        inputs.pop()
    outputs = [norm.output[0]] + (["", "", total] if total else [])
    default = any(p.key == DEFAULT_EPSILON_KEY for p in norm.metadata_props)
    node = helper.make_node(op, inputs, outputs, name=_original_name(base), domain=CONTRIB_DOMAIN,
                            **({} if default else {"epsilon": _epsilon(norm)}))
    node.metadata_props.extend(_original_metadata(norm))
    return node


def _standalone(norm: onnx.NodeProto, base: str) -> onnx.NodeProto:
    """The norm alone, named after the fused node it came from."""
    node = onnx.NodeProto()
    node.CopyFrom(norm)
    node.name = _original_name(base)
    kept = _original_metadata(norm)
    del node.metadata_props[:]
    node.metadata_props.extend(kept)
    return node


def _original_metadata(norm: onnx.NodeProto) -> list[onnx.StringStringEntryProto]:
    """The fused node's metadata, from what `prepare` put on its norm."""
    return [onnx.StringStringEntryProto(key=p.key.removeprefix(STASHED), value=p.value)
            for p in norm.metadata_props if p.key != DEFAULT_EPSILON_KEY]


def _zero_skip(norm: onnx.NodeProto, base: str, dtype: int) -> tuple[list[onnx.NodeProto], onnx.NodeProto]:
    """A standalone LayerNormalization below opset 17, spelled as the fused
    node with an all-zero skip: (the nodes making the zeros, the fused node)."""
    name = _original_name(base)
    x = norm.input[0]
    shape, zeros = f"{base}/sglp_zero_skip_shape", f"{base}/sglp_zero_skip"
    made = [helper.make_node("Shape", [x], [shape], name=f"{name}/zero_skip/Shape" if name else ""),
            helper.make_node("ConstantOfShape", [shape], [zeros],
                             name=f"{name}/zero_skip/ConstantOfShape" if name else "",
                             value=helper.make_tensor("zero", dtype, [1], [0]))]
    fused = _fused(norm, base, [x, zeros, ""], "")
    return made, fused


def _toposorted(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """`nodes` in an order where every node follows the producers of what it reads, stable otherwise."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    needs = []
    for n in nodes:
        wanted = (set(n.input) | subgraph_references(n)) - available
        needs.append({producer[t] for t in wanted if t in producer})
    done: set[int] = set()
    order: list[int] = []
    pending = list(range(len(nodes)))
    while pending:
        rest = []
        progressed = False
        for k in pending:
            if needs[k] <= done:
                order.append(k)
                done.add(k)
                progressed = True
            else:
                rest.append(k)
        if not progressed:  # a cycle cannot arise from a valid graph; keep what is left as it was
            order += rest
            break
        pending = rest
    return [nodes[k] for k in order]


PATTERN = SkipLayerNormPattern()
