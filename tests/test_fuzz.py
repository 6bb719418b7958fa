"""Fuzzing unit discovery, allocation, surgery and the numerics on random graphs.

Random residual networks are built with onnx.helper: dense or convolutional,
branches of MatMul/Gemm/Conv with Relu, Softmax and Mul, Identity/Cast on the
skip paths, projection shortcuts that change the width, nested residuals,
broadcasting Adds that widen a tensor, and auxiliary graph outputs. Every
removal that allocation can produce is checked against an independent
rewiring of the protobuf written here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sglp_onnx.selection.allocation import allocate, choose_removals
from sglp_onnx.errors import UserError
from sglp_onnx.evidence.activations import probe, probe_shapes
from sglp_onnx.selection.segmentation import choose_k, fisher_segments, loss_curve, segments_of
from sglp_onnx.evidence.similarity import MinibatchCKA
from sglp_onnx.surgery.remove import remove_units
from sglp_onnx.units.discovery import find_units, probe_targets
from sglp_onnx.surgery.validation import validate
from tiny_graphs import IR_VERSION, OPSET

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CPU = ["CPUExecutionProvider"]

BLOCKS = ("residual", "residual", "residual", "nested", "projection", "widen", "transition", "aux")
BRANCH_OPS = ("Relu", "Softmax", "Mul", "MulScalar")
SKIPS = ("direct", "identity", "cast", "identity+cast", "fp16-roundtrip")


@dataclass
class Net:
    """A generated network and what the generator knows about it."""

    model: onnx.ModelProto
    kind: str
    # (entry, exit, has_attention, add output) of every residual whose removal
    # keeps shapes, in graph order; exit is the ReLU after the Add, if any.
    residuals: list[tuple[str, str, bool, str]] = field(default_factory=list)


class _Builder:
    def __init__(self, kind: str, seed: int) -> None:
        self.kind = kind
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[str] = []
        self.residuals: list[tuple[str, str, bool, str]] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name("t")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name("n"), **attrs))
        return out

    def weight(self, shape: tuple[int, ...], scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if self.kind == "conv" and len(shape) == 3 else shape[0]
        scale = scale if scale is not None else 0.5 / np.sqrt(max(fan_in, 1))
        name = self.name("w")
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    # Widths: dense tensors are (B, D); conv tensors are (B, C, L), L fixed per block.
    def linear(self, h: str, w_in: int, w_out: int, *, stride: int = 1, op: str | None = None) -> str:
        if self.kind == "dense":
            op = op or ("MatMul" if self.rng.random() < 0.5 else "Gemm")
            if op == "Gemm":
                return self.node("Gemm", [h, self.weight((w_in, w_out)), self.weight((w_out,))])
            return self.node("MatMul", [h, self.weight((w_in, w_out))])
        k = 3 if self.rng.random() < 0.5 else 1
        return self.node("Conv", [h, self.weight((w_out, w_in, k)), self.weight((w_out,))],
                         kernel_shape=[k], pads=[k // 2, k // 2], strides=[stride])

    def activation(self, h: str, op: str, width: int) -> str:
        if op == "Relu":
            return self.node("Relu", [h])
        if op == "Softmax":
            return self.node("Softmax", [h], axis=-1)
        if op == "Mul":
            shape = (width,) if self.kind == "dense" else (width, 1)
            return self.node("Mul", [h, self.weight(shape, scale=1.0)])
        scalar = self.name("c")
        self.inits.append(numpy_helper.from_array(np.array(0.5, np.float32), scalar))
        return self.node("Mul", [h, scalar])

    def skip(self, h: str, how: str) -> str:
        if how in ("identity", "identity+cast"):
            h = self.node("Identity", [h])
        if how in ("cast", "identity+cast"):
            h = self.node("Cast", [h], to=TensorProto.FLOAT)
        if how == "fp16-roundtrip":  # not a no-op: the values change
            h = self.node("Cast", [self.node("Cast", [h], to=TensorProto.FLOAT16)], to=TensorProto.FLOAT)
        return h

    def add(self, a: str, b: str, swap: bool) -> str:
        return self.node("Add", [b, a] if swap else [a, b])


@st.composite
def networks(draw) -> Net:
    kind = draw(st.sampled_from(["dense", "conv"]))
    b = _Builder(kind, draw(st.integers(0, 2**31 - 1)))
    width = draw(st.integers(2, 6))
    length = 8
    input_shape = ["batch", width] if kind == "dense" else ["batch", width, length]
    h = "input"
    for block in draw(st.lists(st.sampled_from(BLOCKS), min_size=2, max_size=8)):
        if block == "residual":
            ops = draw(st.lists(st.sampled_from(BRANCH_OPS), max_size=2))
            hidden = draw(st.integers(2, 6))
            branch = b.linear(h, width, hidden)
            for op in ops:
                branch = b.activation(branch, op, hidden)
            branch = b.linear(branch, hidden, width)
            how = draw(st.sampled_from(SKIPS))
            out = added = b.add(b.skip(h, how), branch, draw(st.booleans()))
            if draw(st.booleans()):
                out = b.node("Relu", [out])
            if how != "fp16-roundtrip":
                b.residuals.append((h, out, "Softmax" in ops, added))
            h = out
        elif block == "nested":
            # x + W2 (z + f(z)) with z = W1 x: the innermost residual is the unit
            # (removing the outer one would take the inner block with it).
            z = b.linear(h, width, width)
            inner = b.add(z, b.linear(b.node("Relu", [z]), width, width), draw(st.booleans()))
            b.residuals.append((z, inner, False, inner))
            h = b.add(h, b.linear(inner, width, width), draw(st.booleans()))
        elif block == "projection":
            new_width = width + draw(st.integers(1, 3))
            stride = 2 if kind == "conv" and length >= 4 and draw(st.booleans()) else 1
            shortcut = b.linear(h, width, new_width, stride=stride, op="MatMul")
            branch = b.linear(b.node("Relu", [b.linear(h, width, new_width, stride=stride)]), new_width, new_width)
            h = b.add(shortcut, branch, draw(st.booleans()))
            width, length = new_width, (length + 1) // stride if stride > 1 else length
        elif block == "widen" and kind == "dense":
            # s + f(s) with s of width 1 broadcast to `width`: y := s would change the shape.
            s = b.linear(h, width, 1, op="MatMul")
            h = b.add(s, b.linear(b.node("Relu", [s]), 1, width, op="MatMul"), draw(st.booleans()))
        elif block == "transition":
            new_width = draw(st.integers(2, 6))
            h = b.node("Relu", [b.linear(h, width, new_width)])
            width = new_width
        elif block == "aux":
            # An auxiliary graph output: the tensor itself, or a head on it.
            b.outputs.append(h if h != "input" and draw(st.booleans()) else
                             b.linear(h, width, 2, op="MatMul") if kind == "dense" else b.node("ReduceMean", [h]))
    if kind == "conv":
        h = b.node("ReduceMean", [h], axes=[2], keepdims=0)
    logits = b.node("MatMul", [h, b.weight((width, 3))])
    outputs = list(dict.fromkeys(b.outputs + [logits]))
    graph = helper.make_graph(
        b.nodes, "fuzz",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    # Output shapes from shape inference; intermediate value_info is not kept.
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return Net(model=model, kind=kind, residuals=b.residuals)


def _feed(net: Net, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    dims = [d.dim_value for d in net.model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return {"input": np.random.default_rng(seed).standard_normal([batch, *dims]).astype(np.float32)}


def _units(net: Net):
    """Units as the pipeline finds them: shapes from a probe run."""
    shapes, dtypes = probe_shapes(net.model, _feed(net, 2), probe_targets(net.model))
    return find_units(net.model, shapes=shapes, dtypes=dtypes)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=CPU)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def _expected_units(residuals: list[tuple[str, str, bool, str]]) -> list[tuple[str, set[str]]]:
    """(entry, allowed exits) per unit. Unscoped layer grouping: an attention
    residual takes the chained non-attention ones after it. A ReLU after an Add
    may be left out of the block (a pre-norm stack's final norm looks the same)."""
    groups: list[list[tuple[str, str, bool, str]]] = []
    for r in residuals:
        if groups and groups[-1][-1][1] == r[0] and groups[-1][0][2] and not r[2]:
            groups[-1].append(r)
        else:
            groups.append([r])
    return [(g[0][0], {g[-1][1], g[-1][3]}) for g in groups]


# -- unit discovery -----------------------------------------------------------------------------------------------


@FUZZ
@given(net=networks())
def test_units_are_exactly_the_shape_preserving_residuals(net):
    units = _units(net)
    expected = _expected_units(net.residuals)
    assert [u.entry for u in units] == [entry for entry, _ in expected]
    assert all(u.exit in exits for u, (_, exits) in zip(units, expected))
    # Removing a unit never changes a shape: entry and exit agree at another batch size too.
    names = [t for u in units for t in (u.entry, u.exit)]
    values = probe(net.model, _feed(net, 5, seed=1), names) if names else {}
    for u in units:
        assert values[u.entry].shape == values[u.exit].shape, u
        assert values[u.entry].dtype == values[u.exit].dtype, u
        # Graph outputs computed inside the unit (an auxiliary head between the
        # sublayers of a grouped layer) go with it, like a decoder layer's KV cache.
        assert set(u.owned_outputs) == outputs_inside(net.model, u.entry, u.exit)
        assert not u.owned_inputs


@FUZZ
@given(net=networks())
def test_static_shapes_never_propose_more_than_the_probe(net):
    # Without a probe, only candidates whose shapes shape inference proves equal are kept.
    static = {(u.entry, u.exit) for u in find_units(net.model)}
    assert static <= {(u.entry, u.exit) for u in _units(net)}


# -- allocation + surgery against an independent rewiring -----------------------------------------------------------


def _closure(start: set[str], edges: dict[str, set[str]]) -> set[str]:
    seen, stack = set(start), list(start)
    while stack:
        for nxt in edges.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def outputs_inside(model: onnx.ModelProto, entry: str, exit_: str) -> set[str]:
    """Graph outputs computed from the tensors strictly between `entry` and `exit_`
    but not from `exit_` itself. Written on the protobuf, sharing no code with sglp_onnx."""
    forward: dict[str, set[str]] = {}
    backward: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            for o in node.output:
                forward.setdefault(i, set()).add(o)
                backward.setdefault(o, set()).add(i)
    interior = (_closure({entry}, forward) & _closure({exit_}, backward)) - {entry, exit_}
    after_exit = _closure({exit_}, forward)
    return {o.name for o in model.graph.output
            if o.name not in after_exit and _closure({o.name}, backward) & interior}


def rewire_by_hand(model: onnx.ModelProto, removed: list[tuple[str, str]]) -> onnx.ModelProto:
    """Consumers of each removed exit read its entry (chains resolved); outputs
    computed inside a removed unit, dead nodes and dead weights are dropped.

    Written against the protobuf alone, sharing no code with sglp_onnx.
    """
    subs = dict((exit_, entry) for entry, exit_ in removed)
    dropped = set().union(*(outputs_inside(model, entry, exit_) for entry, exit_ in removed))

    def resolve(name: str) -> str:
        while name in subs:
            name = subs[name]
        return name

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    kept_outputs = [o for o in graph.output if o.name not in dropped]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    for node in graph.node:
        node.input[:] = [resolve(i) for i in node.input]
    for o in graph.output:
        if o.name in subs:
            # The output keeps its name: its old producer writes elsewhere, an Identity feeds it.
            for node in graph.node:
                node.output[:] = [f"{x}__bypassed" if x == o.name else x for x in node.output]
            graph.node.append(helper.make_node("Identity", [resolve(o.name)], [o.name], name=f"bypass_{o.name}"))
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(x in needed for x in node.output):
            live.append(node)
            needed.update(node.input)
    kept = [n for n in graph.node if any(n is m for m in live)]
    del graph.node[:]
    graph.node.extend(kept)
    weights = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(weights)
    return out


@st.composite
def nets_and_removals(draw):
    net = draw(networks().filter(lambda n: len(n.residuals) >= 2))
    units = _units(net)
    L = len(units)
    if L == 0:
        return net, units, []
    # The count first, then a segmentation that allows it: every segment keeps a unit.
    n_remove = draw(st.integers(1, L - 1) | st.just(0)) if L > 1 else 0
    k = draw(st.integers(1, L - n_remove))
    cuts = sorted(draw(st.sets(st.integers(1, L - 1), min_size=k - 1, max_size=k - 1))) if k > 1 else []
    bounds = list(zip([0, *cuts], [*cuts, L]))
    importance = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=L, max_size=L))
    counts = allocate([stop - start for start, stop in bounds], n_remove)
    ids = segments_of(bounds)
    removed = choose_removals(ids, importance, counts)
    assert len(removed) == n_remove
    for s in range(len(bounds)):
        assert sum(1 for i in range(L) if ids[i] == s and i not in removed) >= 1, "a segment lost every unit"
    return net, units, removed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=nets_and_removals())
def test_every_allocated_removal_gives_a_valid_model_equal_to_hand_rewiring(case):
    net, units, removed = case
    chosen = [units[i] for i in removed]
    pruned = remove_units(net.model, chosen)
    feed = _feed(net, 4, seed=2)
    owned = {o for u in chosen for o in u.owned_outputs}
    result = validate(net.model, pruned, feed, removed_outputs=owned, removed_inputs=set(),
                      nothing_removed=not chosen)
    assert result.checker and result.runs and result.signature
    reference = rewire_by_hand(net.model, [(u.entry, u.exit) for u in chosen])
    onnx.checker.check_model(reference, full_check=True)
    got, want = _run(pruned, feed), _run(reference, feed)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert {t.name for t in pruned.graph.initializer} == {t.name for t in reference.graph.initializer}
    if not chosen:
        original = _run(net.model, feed)
        assert all(np.array_equal(got[k], original[k]) for k in original)


# -- numerics never return NaN ------------------------------------------------------------------------------------

MODES = ("constant", "tiny", "zero", "huge", "normal", "nonfinite")


def _features(mode: str, n: int, d: int, rng: np.random.Generator, value: float) -> np.ndarray:
    if mode == "constant":
        return np.full((n, d), value, np.float32)
    if mode == "tiny":
        return rng.standard_normal((n, d)) * 1e-300  # subnormal products
    if mode == "zero":
        return np.zeros((n, d), np.float32)
    if mode == "huge":
        return (rng.standard_normal((n, d)) * 1e30).astype(np.float32)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if mode == "nonfinite":
        x[rng.random((n, d)) < 0.3] = np.nan
        x[0, 0] = np.inf
    return x


@settings(max_examples=60, deadline=None)
@given(
    units=st.lists(st.tuples(st.integers(1, 5), st.sampled_from(MODES), st.floats(-1e3, 1e3)), min_size=1, max_size=5),
    batch_sizes=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_cka_segments_and_k_are_never_nan(units, batch_sizes, seed, data):
    rng = np.random.default_rng(seed)
    cka = MinibatchCKA(len(units))
    for n in batch_sizes:
        cka.update([_features(mode, n, d, rng, value) for d, mode, value in units])
    if sum(batch_sizes) < 4:  # no minibatch could be formed: a clear error, not a NaN
        with pytest.raises(UserError, match="at least 4"):
            cka.result()
        return
    matrix = cka.result()
    assert matrix.shape == (len(units), len(units))
    assert np.isfinite(matrix).all(), matrix
    assert np.allclose(matrix, matrix.T)
    k_max = data.draw(st.integers(1, len(units)))
    curve = loss_curve(matrix, k_max)
    assert np.isfinite(curve).all()
    k, rule = choose_k(curve, k_max=k_max)
    assert 1 <= k <= k_max and rule
    segmentation = fisher_segments(matrix, k)
    assert np.isfinite(segmentation.loss) and len(segmentation.bounds) == k


@settings(max_examples=30, deadline=None)
@given(L=st.integers(1, 8), value=st.floats(-2, 2), data=st.data())
def test_segmentation_of_constant_profiles(L, value, data):
    _check_constant_profiles(L, value, data.draw(st.integers(1, L)))


@pytest.mark.parametrize("value", [7.206174429563306e-162, 1e-200, -3e-170, 5e-324])
def test_segmentation_of_constant_profiles_whose_squares_are_subnormal(value):
    # Found by a CI run: the round-off threshold underflowed and K = 2 came out of the noise.
    for L in range(1, 9):
        for k_max in range(1, L + 1):
            _check_constant_profiles(L, value, k_max)


def _check_constant_profiles(L: int, value: float, k_max: int) -> None:
    # All units alike: a flat loss curve, K = 1, zero loss, no NaN.
    profiles = np.full((L, L), value)
    curve = loss_curve(profiles, k_max)
    assert np.isfinite(curve).all() and np.allclose(curve, 0.0)
    assert choose_k(curve, k_max=k_max)[0] == 1
    assert fisher_segments(profiles, k_max).loss == pytest.approx(0.0, abs=1e-12)
