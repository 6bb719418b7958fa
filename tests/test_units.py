"""Unit discovery from graph structure, for both torch exporters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from graphs import (
    EXPORTERS,
    TinyResNet,
    discover,
    example_input,
    export,
    exported,
    insert_skip_passthrough,
    params_of,
    rewire,
    run,
)
from sglp_onnx.errors import UserError
from sglp_onnx.graph.index import GraphIndex
from sglp_onnx.surgery.remove import remove_units
from sglp_onnx.units.discovery import find_units, layer_key, residual_adds


def _load(name: str, exporter: str):
    torch_model, path = exported(name, exporter)
    return torch_model, onnx.load(str(path))


def _producer_op(model: onnx.ModelProto, tensor: str) -> str:
    return next(n.op_type for n in model.graph.node if tensor in n.output)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_resnet_identity_blocks_are_the_units_and_the_projection_block_is_not(exporter):
    _, model = _load("resnet", exporter)
    units = discover(model, example_input("resnet", 2))
    assert [u.scope for u in units] == list(TinyResNet.IDENTITY_BLOCKS)
    assert [u.name for u in units] == list(TinyResNet.IDENTITY_BLOCKS)
    assert all(u.sublayers == 1 and not u.has_attention for u in units)
    # Blocks of one stage chain: each one's entry is the previous one's exit.
    assert units[1].entry == units[0].exit and units[2].entry == units[1].exit
    assert units[4].entry == units[3].exit
    # The projection block layer2.0 sits between layer1.2 and layer2.1.
    assert units[3].entry != units[2].exit
    # relu(x + f(x)): the exit is the ReLU after the Add.
    assert all(_producer_op(model, u.exit) == "Relu" for u in units)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_unit_params_are_what_removing_it_drops(exporter):
    _, model = _load("resnet", exporter)
    units = discover(model, example_input("resnet", 2))
    total = params_of(model)
    for unit in units:
        dropped = total - params_of(rewire(model, [(unit.entry, unit.exit)]))
        assert unit.params == dropped
        # Two 3x3 convolutions of 8 (or 16) channels, plus BN or folded biases.
        width = 8 if unit.scope.startswith("layer1") else 16
        assert 2 * 9 * width * width <= unit.params <= 2 * 9 * width * width + 8 * width
        assert unit.nodes


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_pre_norm_transformer_layer_is_one_unit_and_the_final_norm_stays(exporter):
    _, model = _load("transformer", exporter)
    feed = example_input("transformer", 2)
    units = discover(model, feed)
    assert [u.scope for u in units] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(u.sublayers == 2 and u.has_attention for u in units)
    # Every exit is a residual Add: the model's final LayerNorm after the last
    # block is not part of that block.
    assert all(_producer_op(model, u.exit) == "Add" for u in units)
    assert units[1].entry == units[0].exit and units[2].entry == units[1].exit

    sub = discover(model, feed, granularity="sublayer")
    assert len(sub) == 6
    assert [layer_key(u.scope) for u in sub] == ["blocks.0"] * 2 + ["blocks.1"] * 2 + ["blocks.2"] * 2
    assert [u.has_attention for u in sub] == [True, False] * 3
    assert [u.entry for u in sub[::2]] == [u.entry for u in units]
    assert [u.exit for u in sub[1::2]] == [u.exit for u in units]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_nested_residual_only_one_level_is_proposed(exporter):
    _, model = _load("nested", exporter)
    index = GraphIndex(model)
    # Four Adds of x + f(x) with weights in f exist: two outer, two inner.
    weighted_adds = [
        n for n in model.graph.node if n.op_type == "Add"
        and not any(index.is_constant(i) for i in n.input)
        and any(index.is_ancestor(a, b) for a in n.input for b in n.input if a != b)
    ]
    assert len(weighted_adds) == 4
    assert len(residual_adds(index)) == 4
    # Never both levels: units.innermost keeps the inner blocks (an outer
    # "residual" may be a U-Net long skip or a mask reused across layers).
    units = discover(model, example_input("nested", 2))
    assert [u.scope for u in units] == ["outer.0.inner", "outer.1.inner"]
    # The ReLU after the inner block runs in the outer module: it is not part of the unit.
    assert all(_producer_op(model, u.exit) == "Add" for u in units)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_weightless_x_plus_c_x_cubed_is_not_a_unit(exporter):
    _, model = _load("gelu_like", exporter)
    units = discover(model, example_input("gelu_like", 2))
    assert [u.scope for u in units] == ["block"]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_skip_seen_through_identity_and_cast(exporter):
    _, model = _load("resnet", exporter)
    feed = example_input("resnet", 3)
    plain = discover(model, feed)
    wrapped = insert_skip_passthrough(model, [u.entry for u in plain])
    n_casts = sum(n.op_type == "Cast" for n in wrapped.graph.node) - sum(n.op_type == "Cast" for n in model.graph.node)
    assert n_casts == len(plain)
    units = discover(wrapped, feed)
    assert [(u.scope, u.entry, u.exit) for u in units] == [(u.scope, u.entry, u.exit) for u in plain]
    # Removing through the no-op chain gives the same network.
    chosen = [units[1], units[2], units[4]]
    np.testing.assert_array_equal(
        run(remove_units(wrapped, chosen), feed)[0], run(remove_units(model, [plain[1], plain[2], plain[4]]), feed)[0])


def _graph_model(nodes, inits, *, dims=(None, 4), out="y") -> onnx.ModelProto:
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *dims[1:]])
    output = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [inp], [output], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _weight(name: str, shape, seed: int) -> onnx.TensorProto:
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return onnx.numpy_helper.from_array(values, name)


class CastSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in, self.fc, self.fc_out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc_in(x)
        return self.fc_out(h.to(torch.float32) + self.fc(h))


def test_legacy_cast_on_the_skip_path_is_seen_through(tmp_path):
    # x.to(float32) on the skip: the TorchScript exporter writes a float->float Cast.
    torch.manual_seed(0)
    model = export(CastSkip().eval(), torch.randn(2, 4), tmp_path / "m.onnx", "legacy")
    assert any(n.op_type == "Cast" for n in model.graph.node)
    units = discover(model, np.ones((2, 4), np.float32))
    assert len(units) == 1
    assert _producer_op(model, units[0].entry) == "Gemm"


def test_dtype_changing_cast_is_not_a_skip():
    # y = Cast(x, to=FLOAT16) -> back to float: not a no-op, so the walk stops at the Cast
    # output, which the branch does not read: no unit.
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["h16"], ["h32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h", "w1"], ["b"]),
        helper.make_node("Add", ["h32", "b"], ["y"]),
    ]
    model = _graph_model(nodes, [_weight("w0", (4, 4), 0), _weight("w1", (4, 4), 1)])
    shapes = {t: (2, 4) for t in ("h", "h16", "h32", "y")}
    dtypes = {"h": TensorProto.FLOAT, "h16": TensorProto.FLOAT16, "h32": TensorProto.FLOAT, "y": TensorProto.FLOAT}
    assert find_units(model, shapes=shapes, dtypes=dtypes) == []
    # With a float->float Cast the same graph is a unit.
    nodes[1] = helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT)
    model = _graph_model(nodes, [_weight("w0", (4, 4), 0), _weight("w1", (4, 4), 1)])
    dtypes["h16"] = TensorProto.FLOAT
    units = find_units(model, shapes=shapes, dtypes=dtypes)
    assert [(u.entry, u.exit) for u in units] == [("h", "y")]


def test_shape_changing_residual_is_not_a_unit():
    # x (N, 1, 4) + f(x) (N, 3, 4) broadcasts: y := x would change the shape.
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("Expand", ["h", "shape"], ["he"]),
        helper.make_node("MatMul", ["he", "w1"], ["b"]),
        helper.make_node("Add", ["h", "b"], ["y"]),
    ]
    shape = onnx.numpy_helper.from_array(np.array([2, 3, 4], np.int64), "shape")
    model = _graph_model(nodes, [_weight("w0", (4, 4), 0), _weight("w1", (4, 4), 1), shape], dims=(None, 1, 4))
    feed = {"x": np.ones((2, 1, 4), np.float32)}
    assert discover(model, feed) == []


def test_units_without_shapes_use_shape_inference():
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w1"], ["b"]),
        helper.make_node("Add", ["h", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    model = _graph_model(nodes, [_weight("w0", (4, 4), 0), _weight("w1", (4, 4), 1)])
    units = find_units(model)
    assert [(u.entry, u.exit, u.params) for u in units] == [("h", "y", 16)]
    with pytest.raises(UserError, match="granularity"):
        find_units(model, granularity="block")


def test_unscoped_pre_norm_stack_leaves_the_final_norm_out_of_the_last_block():
    # x -> a1 = x + W1 LN(x) -> a2 = a1 + W2 LN(a1) -> LN(a2): node names carry no scopes.
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "beta"], ["n1"], axis=-1),
        helper.make_node("MatMul", ["n1", "w1"], ["b1"]),
        helper.make_node("Add", ["x", "b1"], ["a1"]),
        helper.make_node("LayerNormalization", ["a1", "g", "beta"], ["n2"], axis=-1),
        helper.make_node("MatMul", ["n2", "w2"], ["b2"]),
        helper.make_node("Add", ["a1", "b2"], ["a2"]),
        helper.make_node("LayerNormalization", ["a2", "g", "beta"], ["y"], axis=-1),
    ]
    inits = [_weight("w1", (4, 4), 1), _weight("w2", (4, 4), 2), _weight("g", (4,), 3), _weight("beta", (4,), 4)]
    model = _graph_model(nodes, inits)
    units = discover(model, {"x": np.ones((2, 4), np.float32)})
    assert [(u.entry, u.exit) for u in units] == [("x", "a1"), ("a1", "a2")]
    # Post-norm (LN after every Add, the next block reading the LN) keeps the norm in the block.
    post = [
        helper.make_node("MatMul", ["x", "w1"], ["b1"]),
        helper.make_node("Add", ["x", "b1"], ["a1"]),
        helper.make_node("LayerNormalization", ["a1", "g", "beta"], ["n1"], axis=-1),
        helper.make_node("MatMul", ["n1", "w2"], ["b2"]),
        helper.make_node("Add", ["n1", "b2"], ["a2"]),
        helper.make_node("LayerNormalization", ["a2", "g", "beta"], ["y"], axis=-1),
    ]
    units = discover(_graph_model(post, inits), {"x": np.ones((2, 4), np.float32)})
    assert [(u.entry, u.exit) for u in units] == [("x", "n1"), ("n1", "y")]


@pytest.mark.parametrize("add_names, expected", [
    # tf2onnx from Keras: the block name sits before the op's own, under wrapper prefixes.
    ([f"StatefulPartitionedCall/model/stage0_block{i}/add" for i in range(4)], [f"stage0_block{i}" for i in range(4)]),
    # Names that carry no block (an op word only, or the same for two units): unit{i}.
    ([f"model/add_{i}/Add" for i in range(4)], [f"unit{i}" for i in range(4)]),
    (["m/blk/add", "m/blk/add_1", "m/other/add", "m/x/add"], ["unit0", "unit1", "other", "x"]),
])
def test_scope_less_units_take_a_converters_block_name(add_names, expected):
    from tiny_graphs import residual_mlp

    model = residual_mlp(4)
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    for node, name in zip(adds, add_names):
        node.name = name
    units = find_units(model)
    assert [u.name for u in units] == expected
    assert all(u.scope == "" for u in units)  # a name only: layers are never grouped by it
