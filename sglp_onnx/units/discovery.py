"""Finding prunable units: residual branches `y = x + f(x)` whose removal
(`y := x`) keeps every tensor shape.

Discovery reads graph structure only. Module scopes (from node names or the
dynamo exporter's metadata) are used to group the residual branches of one
transformer layer, never to decide what is residual.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Mapping, Sequence

import onnx

from ..errors import UserError
from ..evidence.executor import Executor
from ..options import GRANULARITIES
from ..graph.flops import node_flops, packed_weights, quantization_roles, tensors_needed
from ..graph.index import GraphIndex, declared_dims
from ..graph.ops import ATTENTION_OPS, SHAPE_DETERMINED_OPS, SHAPE_ONLY_OPS, VIEW_OPS, is_onnx
from .patterns import Join, applicable
from .patterns.qdq import requantized

if TYPE_CHECKING:
    from ..files.calibration import CalibrationSet



@dataclass(frozen=True)
class Residual:
    """One residual join `join(skip, branch)` with `skip` computed before `branch`."""

    entry: str  # the skip input, seen through no-op steps (`Pattern.skip_step`)
    exit: str  # the join output, or the output of the op that ends the block
    branch: str  # the join input computed by f(x)
    add_node: int
    post_node: int | None
    region: frozenset[int]  # nodes between entry and the branch input
    scope: str
    has_attention: bool
    join: Join | None = None


@dataclass
class PrunableUnit:
    """A removable block; removing it makes consumers of `exit` read `entry`
    (and, for each `companions` pair, readers of `exit` read the second
    tensor where they read the first: a quantized tensor's scale and zero point)."""

    name: str
    scope: str
    entry: str
    exit: str
    add_nodes: tuple[str, ...]
    nodes: tuple[str, ...] = ()
    params: int = 0
    flops: int = 0
    owned_outputs: tuple[str, ...] = ()
    owned_inputs: tuple[str, ...] = ()
    sublayers: int = 1
    has_attention: bool = False
    layer_index: int | None = None
    companions: tuple[tuple[str, str], ...] = ()
    extra: dict = field(default_factory=dict)


def _skip_source(index: GraphIndex, tensor: str) -> str:
    """Walk back through the no-op steps every pattern knows (Identity, dtype-preserving Cast, ...)."""
    while True:
        source = next((s for s in (p.skip_step(index, tensor) for p in applicable(index.model)) if s is not None), None)
        if source is None:
            return tensor
        tensor = source


def _region(index: GraphIndex, source: str, target: str) -> frozenset[int]:
    """Nodes on some path from `source` to `target` (inclusive of target's producer)."""
    ancestors = index.ancestors_of(target, stop_below=index.position(source) + 1, values_only=True)
    return frozenset(index.descendants_of(source, within=ancestors))


def _post_op(index: GraphIndex, join_output: str) -> int | None:
    """The node that ends the block after its join, as the first pattern that knows one says."""
    if join_output in index.output_names or join_output in index.subgraph_refs:
        return None
    return next((n for n in (p.block_end(index, join_output) for p in applicable(index.model)) if n is not None), None)


def _joins(index: GraphIndex) -> list[Join]:
    joins = {j.node: j for p in reversed(applicable(index.model)) for j in p.joins(index)}
    return [joins[i] for i in sorted(joins)]


def probe_targets(model: onnx.ModelProto) -> list[str]:
    """Tensors whose runtime shape and dtype discovery needs: both sides of every
    residual join, the no-op steps behind them, its output and the output of
    the op that ends its block."""
    index = GraphIndex(model)
    names: list[str] = []
    for join in _joins(index):
        for t in join.inputs:
            names.append(t)
            while (source := next((s for s in (p.skip_step(index, t, typed=False) for p in applicable(index.model))
                                   if s is not None), None)):
                t = source
                names.append(t)
        names.append(join.output)
        names += join.pattern.probe_targets(index, join)
        post = _post_op(index, join.output)
        end = join.output if post is None else index.nodes[post].output[0]
        names += [end] + _views_after(index, end)
    return list(dict.fromkeys(names))


# At most this many view ops (`VIEW_OPS`) between a layer's sublayers, or after its last.
VIEW_STEPS = 3


def _view_of(index: GraphIndex, tensor: str) -> int | None:
    """The one view node that reads `tensor` (its data input) where every
    other reader takes only its shape, else None."""
    if tensor in index.output_names or tensor in index.subgraph_refs:
        return None
    views = []
    for c in index.consumers.get(tensor, ()):
        node = index.nodes[c]
        if is_onnx(node, *SHAPE_ONLY_OPS):
            continue
        if not (is_onnx(node, *VIEW_OPS) and node.input[0] == tensor and tensor not in node.input[1:]):
            return None
        views.append(c)
    return views[0] if len(views) == 1 else None


def _views_after(index: GraphIndex, tensor: str) -> list[str]:
    """The outputs of the chain of views that alone read `tensor` (`_view_of`),
    in order; a QDQ model's requantization of a view (`Q -> DQ`) is a step too."""
    chain = []
    for _ in range(2 * VIEW_STEPS):
        node = _view_of(index, tensor)
        if node is None and chain:
            node = requantized(index, tensor)
        if node is None:
            break
        tensor = index.nodes[node].output[0]
        chain.append(tensor)
    return chain


def _chains(index: GraphIndex, exit_: str, entry: str) -> bool:
    """True when a residual whose skip starts at `entry` follows one ending at
    `exit_`: the same tensor, or `entry` a view of `exit_` that nothing else
    reads but for its shape (OPT flattens the hidden state for its MLP)."""
    return exit_ == entry or entry in _views_after(index, exit_)


def residual_adds(index: GraphIndex) -> list[Residual]:
    """Every residual join of the form `x + f(x)` whose branch f carries weights (shapes unchecked)."""
    found: list[Residual] = []
    for join in _joins(index):
        a, b = join.inputs
        for skip_input, branch in ((a, b), (b, a)):
            entry = _skip_source(index, skip_input)
            if not index.is_ancestor(entry, branch):
                continue
            region = _region(index, entry, branch)
            # Element-wise formulas (tanh-GELU's x + c*x^3) have this shape too;
            # a layer's branch carries weights.
            if not any(index.is_weight(t) for n in region for t in index.nodes[n].input):
                break
            post = _post_op(index, join.output)
            exit_ = index.nodes[post].output[0] if post is not None else join.output
            found.append(Residual(
                entry=entry, exit=exit_, branch=branch, add_node=join.node, post_node=post,
                region=region, scope=index.scopes[join.node],
                has_attention=any(index.nodes[n].op_type in ATTENTION_OPS for n in region),
                join=join,
            ))
            break
    found = _consistent_post_ops(index, found)
    return found


def innermost(residuals: Sequence[Residual]) -> list[Residual]:
    """Drop every residual whose branch contains a kept residual.

    The inner blocks are the units: removing an outer one would take a whole
    stage with it (a U-Net long skip), and an Add that merely looks residual
    because its "skip" (an attention mask or T5's position bias, built in an
    earlier layer) feeds the rest of the network contains real residual
    blocks in its branch. Such a dropped Add does not in turn drop the real
    residual whose branch holds it (T5's attention adds the position bias to
    its scores inside the layer's residual branch): residuals are decided in
    graph order, each against those kept before it (what a branch contains
    comes before its Add).
    """
    adds: set[int] = set()
    for r in sorted(residuals, key=lambda r: r.add_node):
        if not (r.region & adds):
            adds.add(r.add_node)
    return [r for r in residuals if r.add_node in adds]


def _consistent_post_ops(index: GraphIndex, found: list[Residual]) -> list[Residual]:
    """Drop a post-op that the chained blocks never show.

    When blocks chain Add to Add (pre-norm: the next block's skip reads the
    Add itself), an op after a block that feeds no further block (the final
    norm) is not part of that block, unless chained blocks end with it too.
    """
    entries = {r.entry for r in found}
    chained = {None if r.post_node is None else index.nodes[r.post_node].op_type for r in found if r.exit in entries}
    if None not in chained:
        return found
    return [
        replace(r, post_node=None, exit=r.join.output)
        if r.post_node is not None and index.nodes[r.post_node].op_type not in chained else r
        for r in found
    ]


def layer_key(scope: str) -> str:
    """The scope cut after its last numeric component: `model.layers.3.mlp` -> `model.layers.3`."""
    parts = scope.split(".")
    for k in range(len(parts) - 1, -1, -1):
        if parts[k].isdigit():
            return ".".join(parts[: k + 1])
    return scope


def _group(index: GraphIndex, residuals: Sequence[Residual], granularity: str) -> list[list[Residual]]:
    """Consecutive residuals that chain (next entry = previous exit, or a view
    of it: `_chains`) and belong to one layer form one unit at layer granularity.

    A layer is recognised by a shared numbered module scope; when the export
    carries no scopes, an attention branch starts a layer and the branches
    after it join until the next attention.
    """
    if granularity == "sublayer":
        return [[r] for r in residuals]
    have_scopes = any(r.scope for r in residuals)
    keys = _layer_keys(residuals)
    groups: list[list[Residual]] = []
    for i, r in enumerate(residuals):
        if groups and _chains(index, groups[-1][-1].exit, r.entry):
            prev = groups[-1]
            if have_scopes:
                # Branches of one transformer layer share the layer's numbered
                # scope; two CNN blocks under one numbered stage do not merge
                # unless their Adds sit in the very same module.
                key = keys[i]
                same = bool(key) and key == keys[i - len(prev)] and (
                    r.scope == prev[-1].scope or any(p.has_attention for p in prev + [r])
                )
            else:
                same = prev[0].has_attention and not r.has_attention
            if same:
                prev.append(r)
                continue
        groups.append([r])
    return groups


def _parent_key(key: str) -> str:
    """The numbered scope above a layer key: `block.1.layer.0` -> `block.1`."""
    parts = key.split(".")
    return layer_key(".".join(parts[:-1])) if len(parts) > 1 and parts[-1].isdigit() else ""


def _layer_keys(residuals: Sequence[Residual]) -> list[str]:
    """Each residual's layer: its `layer_key`, or, where every such key holds
    one residual only and the keys run in numbered parents that each start
    with an attention and end without one, the parent (T5's `block.1` holds
    `layer.0` self-attention, [`layer.1` cross-attention,] `layer.1|2` MLP,
    each a module doing its own residual Add). Swin's `blocks.1` holds both
    of its residuals, so its blocks stay apart."""
    keys = [layer_key(r.scope) for r in residuals]
    parents = [_parent_key(k) for k in keys]
    if not residuals or not all(parents) or len(set(keys)) != len(keys):
        return keys
    runs: list[list[Residual]] = []
    for k, r in enumerate(residuals):
        if k and parents[k] == parents[k - 1]:
            runs[-1].append(r)
        else:
            runs.append([r])
    if len(runs) != len(set(parents)) or max(map(len, runs)) < 2 or \
            not all(run[0].has_attention and not run[-1].has_attention for run in runs):
        return keys
    return parents


def _fit_exit(index: GraphIndex, r: Residual, shapes: Mapping[str, Sequence], dtypes: Mapping[str, int]) -> Residual:
    """The residual ending at its Add when the op after it does not keep the shape."""
    if r.post_node is not None and not _shape_ok(r.entry, r.exit, shapes, dtypes):
        return replace(r, post_node=None, exit=r.join.output)
    return r


def _shape_ok(entry: str, exit_: str, shapes: Mapping[str, Sequence], dtypes: Mapping[str, int]) -> bool:
    if entry not in shapes or exit_ not in shapes:
        return False
    if tuple(shapes[entry]) != tuple(shapes[exit_]):
        return False
    de, dx = dtypes.get(entry), dtypes.get(exit_)
    return de is None or dx is None or de == dx


def find_units(
    model: onnx.ModelProto,
    *,
    granularity: str = "layer",
    shapes: Mapping[str, Sequence] | None = None,
    dtypes: Mapping[str, int] | None = None,
) -> list[PrunableUnit]:
    """Prunable units of `model` in graph order.

    `shapes` maps tensor names to concrete shapes (from a probe run, see
    `representations.probe_shapes`); without it, ONNX shape inference is used
    and only candidates whose shapes it can prove equal are kept.
    """
    if granularity not in GRANULARITIES:
        raise UserError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if shapes is None:
        shapes, inferred_dtypes = static_shapes(model)
        dtypes = {**inferred_dtypes, **(dtypes or {})}
    index = GraphIndex(model)
    index.dtypes.update(dtypes or {})
    residuals = residual_adds(index)
    dtypes = index.dtypes
    residuals = innermost([
        r for r in (_fit_exit(index, r, shapes, dtypes) for r in residuals)
        if _shape_ok(r.entry, r.exit, shapes, dtypes)
    ])
    units = [_make_unit(index, group, exit_) for group in _group(index, residuals, granularity)
             for group, exit_ in _group_exits(index, group, shapes, dtypes)]
    _fill_removal_sets(index, units)
    _set_layer_indices(units)
    _name_units(units)
    return units


def static_shapes(model: onnx.ModelProto) -> tuple[dict[str, tuple], dict[str, int]]:
    """Shapes ONNX shape inference can determine; symbolic dims kept as names."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, int] = {}
    graph = inferred.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.tensor_type.elem_type:
            dtypes[vi.name] = vi.type.tensor_type.elem_type
        dims = declared_dims(vi)
        if dims is not None and None not in dims:
            shapes[vi.name] = dims
    return shapes, dtypes


def _group_exits(index: GraphIndex, group: list[Residual], shapes: Mapping[str, Sequence],
                 dtypes: Mapping[str, int]) -> list[tuple[list[Residual], str]]:
    """(residuals, exit) of the units a group makes: one whose exit is its
    last residual's, or the view after it (`_views_after`) that has the
    entry's shape when the sublayers were chained through views; else each
    residual alone."""
    first, last = group[0], group[-1]
    # The last that fits: past a view back to the entry's shape, its requantization (QDQ).
    for exit_ in reversed([last.exit] + (_views_after(index, last.exit) if len(group) > 1 else [])):
        if _shape_ok(first.entry, exit_, shapes, dtypes):
            return [(group, exit_)]
    return [([r], r.exit) for r in group]


def _numbered_prefix(scopes: Sequence[str]) -> str:
    """The scopes' common prefix up to its last numeric component (a layer's
    scope from its sublayers': `model.layers.3.self_attn`, `model.layers.3.mlp`
    -> `model.layers.3`)."""
    common: list[str] = []
    for parts in zip(*(s.split(".") for s in scopes)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return layer_key(".".join(common))


def _make_unit(index: GraphIndex, group: list[Residual], exit_: str) -> PrunableUnit:
    first, last = group[0], group[-1]
    scope = _numbered_prefix([r.scope for r in group]) if len(group) > 1 else first.scope
    return PrunableUnit(
        name="",
        scope=scope,
        entry=first.entry,
        exit=exit_,
        add_nodes=tuple(index.nodes[r.add_node].name or f"#{r.add_node}" for r in group),
        sublayers=len(group),
        has_attention=any(r.has_attention for r in group),
        companions=last.join.pattern.companions(index, first.entry, exit_),
    )


def read_for_shape_only(index: GraphIndex, tensor: str, live: set[int]) -> bool:
    """True when the nodes in `live` need only the shape of `tensor`: every path
    from it ends in Shape/Size through ops whose output shape depends on input
    shapes alone (`SHAPE_DETERMINED_OPS`)."""
    memo: dict[str, bool] = {}

    def shape_only(t: str) -> bool:
        if t in memo:
            return memo[t]
        memo[t] = False  # a cycle is impossible in a valid graph; be safe anyway
        if t in index.output_names or t in index.subgraph_refs:
            return False
        for c in index.consumers.get(t, ()):
            if c not in live:
                continue
            node = index.nodes[c]
            if not is_onnx(node):
                return False
            if node.op_type in SHAPE_ONLY_OPS:
                continue
            if node.op_type not in SHAPE_DETERMINED_OPS:
                return False
            positions = SHAPE_DETERMINED_OPS[node.op_type]
            if positions is not None and any(name == t and k not in positions for k, name in enumerate(node.input)):
                return False
            if not all(shape_only(o) for o in node.output if o):
                return False
        memo[t] = True
        return True

    return shape_only(tensor)


def declared_type(model: onnx.ModelProto, name: str) -> tuple | None:
    """(dtype, dims) of graph input `name` when every dim is declared (a number or a
    symbolic name), else None. Two inputs with equal declared types always have
    equal shapes at run time: equal symbolic names denote equal sizes."""
    vi = next((i for i in model.graph.input if i.name == name), None)
    dims = None if vi is None else declared_dims(vi)
    if dims is None or None in dims:
        return None
    return vi.type.tensor_type.elem_type, dims


def shape_twin(model: onnx.ModelProto, name: str, exclude: set[str]) -> str | None:
    """Another graph input (not in `exclude`) declared with exactly the type and shape of `name`.

    Shape-only readers of an input that goes with its unit (the past length
    read from a removed layer's KV cache) read its twin instead.
    """
    wanted = declared_type(model, name)
    if wanted is None:
        return None
    initializers = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name != name and vi.name not in exclude and vi.name not in initializers \
                and declared_type(model, vi.name) == wanted:
            return vi.name
    return None


def _fill_removal_sets(index: GraphIndex, units: list[PrunableUnit]) -> None:
    """Nodes, parameters and graph inputs/outputs that go when each unit alone goes.

    A graph input the unit's nodes read goes with the unit when nothing else
    reads it, or when what else reads it needs only its shape and another
    input declared with the same shape can stand in (see `shape_twin`).
    """
    outputs = index.output_names
    scales = quantization_roles(index)[0]  # a quantized model's scales and zero points are no parameters
    packed = packed_weights(index)  # MatMulNBits weights count as the K x N values they pack
    base_live = index.live_nodes(outputs)
    used_inputs = {t for n in base_live for t in index.nodes[n].input}
    for unit in units:
        downstream = index.descendants_of(unit.exit)
        interior = index.descendants_of(unit.entry) & index.ancestors_of(unit.exit)
        owned = []
        for name in outputs:
            if name == unit.exit or name in index.constants or name in index.input_names:
                continue
            p = index.producer.get(name)
            if p is None or p in downstream:
                continue
            if p in interior or index.ancestors_of(name, stop_below=index.position(unit.entry) + 1) & interior:
                owned.append(name)
        live = index.live_nodes([o for o in outputs if o not in owned], {unit.exit: unit.entry})
        dead = base_live - live
        still_used = {t for n in live for t in index.nodes[n].input}
        dead_weights = {t for n in dead for t in index.nodes[n].input if t in index.constants and t not in still_used}
        unit.nodes = tuple(index.nodes[n].name or f"#{n}" for n in sorted(dead))
        unit.params = sum(packed.get(t, index.numel(t)) for t in dead_weights
                          if index.constants[t].dims and t not in scales)
        unit.owned_outputs = tuple(owned)
        candidates = [i for i in index.input_names if i in used_inputs and i != unit.entry]
        alone = {i for i in candidates if i not in still_used}
        # Inputs whose values only this unit needed: the rest of the graph reads their shape.
        shape_left = [i for i in candidates if i not in alone and read_for_shape_only(index, i, live)
                      and not read_for_shape_only(index, i, base_live)]
        unit.owned_inputs = tuple(
            i for i in candidates
            if i in alone or (i in shape_left and shape_twin(index.model, i, alone | set(shape_left)))
        )


def _set_layer_indices(units: list[PrunableUnit]) -> None:
    """Number the transformer layers: a unit with attention (or with a cache of
    its own: graph inputs and outputs only it uses) starts a layer, and the
    attention-free sublayers after it (its MLP) belong to that layer.

    A layer's number is the one in the names of the KV-cache tensors it owns
    (`present.3.key` -> 3) when they agree, else its position among the layers.
    CNN blocks (no attention anywhere) get none.
    """
    current: int | None = None
    current_key = None
    count = 0
    for unit in units:
        if unit.has_attention or (unit.owned_inputs and unit.owned_outputs):
            numbers = {layer_index_of(n) for n in unit.owned_inputs + unit.owned_outputs} - {None}
            current = numbers.pop() if len(numbers) == 1 else count
            current_key = layer_key(unit.scope)
            count += 1
            unit.layer_index = current
        elif current is not None and (not unit.scope or layer_key(unit.scope) == current_key):
            unit.layer_index = current


def _name_units(units: list[PrunableUnit]) -> None:
    """Each unit's name: its module scope when no other unit shares it; else,
    for a unit without a scope, the block name a converter wrote into its
    join's node name (see `converter_block_name`) when that is unique; else `unit{i}`."""
    counts: dict[str, int] = {}
    for u in units:
        counts[u.scope] = counts.get(u.scope, 0) + 1
    converted = {i: converter_block_name(u.add_nodes) for i, u in enumerate(units) if not u.scope}
    taken = [n for n in converted.values() if n] + [u.scope for u in units if u.scope]
    for i, u in enumerate(units):
        if u.scope and counts[u.scope] == 1:
            u.name = u.scope
        elif converted.get(i) and taken.count(converted[i]) == 1:
            u.name = converted[i]
        else:
            u.name = f"unit{i}" + (f"@{u.scope}" if u.scope else "")


# Path components that name a wrapper or the op, not a block (tf2onnx keeps TF's
# `StatefulPartitionedCall/model/...` prefixes).
_WRAPPER_WORDS = {"", "add", "sum", "plus", "residual", "statefulpartitionedcall", "partitionedcall", "model",
                  "functional", "sequential", "tfoplambda"}


def converter_block_name(add_nodes: Sequence[str]) -> str:
    """The block name in the path-like node name of a one-join unit's Add, as
    converters without module scopes write them (tf2onnx from Keras:
    `model/stage0_block1/add` -> `stage0_block1`): the innermost component
    before the op's own that is more than a wrapper or op word; '' when there
    is none. Only a name: it never groups units into layers (scopes do)."""
    if len(add_nodes) != 1:
        return ""
    parts = [p for p in add_nodes[0].split("/") if p]
    for part in reversed(parts[:-1]):
        if re.sub(r"[\d_:.\-]", "", part).lower() not in _WRAPPER_WORDS:
            return part
    return ""


def layer_index_of(name: str) -> int | None:
    """The layer number in a KV-cache tensor name such as `past_key_values.3.key`."""
    m = re.search(r"(?:^|[._/])(\d+)(?:[._/]|$)", name)
    return int(m.group(1)) if m else None


def with_flops(units: Sequence[PrunableUnit], flops: Mapping[str, int]) -> list[PrunableUnit]:
    """Units with `flops` set from per-node FLOPs (keyed by node name)."""
    return [replace(u, flops=sum(flops.get(n, 0) for n in u.nodes)) for u in units]


# Samples of the calibration set the discovery probe runs on.
PROBE_SAMPLES = 2


def discover(model: onnx.ModelProto, calib: CalibrationSet, *, granularity: str, provider: str,
             executor: Executor = Executor.WHOLE, batch_size: int | None = None) -> tuple[list[PrunableUnit], int]:
    """The prunable units of `model` with their FLOPs per sample, and the
    model's total FLOPs per sample, from one probe run on the first
    `PROBE_SAMPLES` calibration samples (at most `batch_size`: a model that
    runs only one sample at a time is run so), run by `executor` (piece by
    piece: `Executor.PIECEWISE`)."""
    names = probe_targets(model) + tensors_needed(model)
    feed = calib.first(min(PROBE_SAMPLES, batch_size or PROBE_SAMPLES))
    n_probe = next(iter(feed.values())).shape[0]
    # The probes run ONNX Runtime, which `executor` imports only now: reading
    # units (the report does) and finding them in a graph do not load it.
    shapes, dtypes = executor.probe_shapes(model, feed, names, provider=provider)
    units = find_units(model, granularity=granularity, shapes=shapes, dtypes=dtypes)
    # The probe ran on n_probe samples; FLOPs are reported per sample.
    per_node = {k: v // n_probe for k, v in node_flops(model, shapes).items()}
    return with_flops(units, per_node), sum(per_node.values())
