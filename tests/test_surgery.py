"""Graph surgery against two references: the torch model with the same blocks
replaced by nn.Identity(), and an independent protobuf rewiring."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from graphs import (
    EXPORTERS,
    discover,
    example_input,
    exported,
    insert_skip_passthrough,
    params_of,
    rewire,
    run,
    signature,
    torch_out,
    with_identity,
)
from sglp_onnx.surgery.remove import remove_units, substitutions
from sglp_onnx.units.discovery import PrunableUnit, find_units

# (model, indices of removed units): singles, adjacent pairs (k and k+1 both
# removed), a whole stage, units on both sides of a projection block, everything.
REMOVALS = [
    ("resnet", (0,)), ("resnet", (0, 1)), ("resnet", (1, 2)), ("resnet", (0, 1, 2)), ("resnet", (3, 4)),
    ("resnet", (2, 3)), ("resnet", (0, 2, 4)), ("resnet", (0, 1, 2, 3, 4)),
    ("transformer", (0,)), ("transformer", (1, 2)), ("transformer", (0, 1)), ("transformer", (0, 1, 2)),
    ("nested", (0,)), ("nested", (0, 1)),
]


def _case(name: str, exporter: str, n: int = 4):
    torch_model, path = exported(name, exporter)
    model = onnx.load(str(path))
    x = example_input(name, n, seed=1)
    return torch_model, model, x, discover(model, x)


def _check_against_references(torch_model, model, units, chosen, x):
    removed = [units[i] for i in chosen]
    pruned = remove_units(model, removed)
    got = run(pruned, x)[0]
    reference = run(rewire(model, [(u.entry, u.exit) for u in removed]), x)[0]
    np.testing.assert_array_equal(got, reference)
    expected = torch_out(with_identity(torch_model, [u.scope for u in removed]), x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    return pruned


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize(("name", "chosen"), REMOVALS, ids=[f"{n}-{'_'.join(map(str, c))}" for n, c in REMOVALS])
def test_pruned_equals_torch_identity_and_independent_rewiring(exporter, name, chosen):
    torch_model, model, x, units = _case(name, exporter)
    pruned = _check_against_references(torch_model, model, units, chosen, x)
    # Something really went: the output differs from the full model's.
    assert not np.allclose(run(pruned, x)[0], run(model, x)[0], atol=1e-4)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_any_subset_of_resnet_blocks(exporter):
    torch_model, model, x, units = _case("resnet", exporter, n=2)

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sets(st.integers(0, len(units) - 1)))
    def check(chosen):
        _check_against_references(torch_model, model, units, sorted(chosen), x)

    check()


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_output_passes_the_checker_and_keeps_signature_opset_and_ir(exporter):
    _, model, x, units = _case("resnet", exporter)
    removed = [units[1], units[2], units[4]]
    pruned = remove_units(model, removed)
    onnx.checker.check_model(pruned, full_check=True)
    assert signature(pruned) == signature(model)
    assert pruned.ir_version == model.ir_version
    assert sorted((o.domain, o.version) for o in pruned.opset_import) == sorted(
        (o.domain, o.version) for o in model.opset_import)
    out = run(pruned, x)
    assert out[0].shape == run(model, x)[0].shape and np.isfinite(out[0]).all()
    # The removed blocks' nodes and weights are gone, and nothing else.
    kept_names = {n.name for n in pruned.graph.node}
    assert not kept_names & {n for u in removed for n in u.nodes}
    assert params_of(model) - params_of(pruned) == sum(u.params for u in removed)
    # The input model still has all its nodes and computes what it did.
    original = onnx.load(str(exported("resnet", exporter)[1]))
    assert [n.name for n in model.graph.node] == [n.name for n in original.graph.node]
    np.testing.assert_array_equal(run(model, x)[0], run(original, x)[0])


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_nothing_removed_reproduces_the_model_exactly(exporter):
    _, model, x, _ = _case("transformer", exporter)
    pruned = remove_units(model, [])
    for a, b in zip(run(pruned, x), run(model, x)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_pruned_model_keeps_scopes_so_the_remaining_units_are_found_again(exporter):
    _, model, x, units = _case("resnet", exporter)
    pruned = remove_units(model, [units[0], units[3]])
    assert [u.scope for u in discover(pruned, x)] == [units[i].scope for i in (1, 2, 4)]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_skip_through_cast_identity_prunes_like_torch(exporter):
    torch_model, model, x, plain = _case("resnet", exporter)
    wrapped = insert_skip_passthrough(model, [u.entry for u in plain])
    units = discover(wrapped, x)
    _check_against_references(torch_model, wrapped, units, (0, 1, 3), x)


def _two_block_graph() -> onnx.ModelProto:
    """x -> a1 = x + x@W1 -> y = a1 + a1@W2 where y is a graph output; `side` reads a1."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), n) for n in ("w1", "w2")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["b1"], name="mm1"),
        helper.make_node("Add", ["x", "b1"], ["a1"], name="add1"),
        helper.make_node("MatMul", ["a1", "w2"], ["b2"], name="mm2"),
        helper.make_node("Add", ["a1", "b2"], ["y"], name="add2"),
        helper.make_node("Neg", ["a1"], ["side"], name="neg"),
    ]
    graph = helper.make_graph(
        nodes, "two_blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_a_graph_output_that_is_a_unit_exit_keeps_its_name():
    model = _two_block_graph()
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    units = discover(model, x)
    assert [(u.entry, u.exit) for u in units] == [("x", "a1"), ("a1", "y")]
    for chosen in ([1], [0, 1], [0]):
        removed = [units[i] for i in chosen]
        pruned = remove_units(model, removed)
        onnx.checker.check_model(pruned, full_check=True)
        assert [o.name for o in pruned.graph.output] == ["y", "side"]
        got = run(pruned, x)
        for a, b in zip(got, run(rewire(model, [(u.entry, u.exit) for u in removed]), x)):
            np.testing.assert_array_equal(a, b)
    # Both gone: y is x itself, side is -x.
    y, side = run(remove_units(model, units), x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(side, -x)


def test_substitutions_resolve_chains_whatever_the_order():
    def unit(entry, exit_):
        return PrunableUnit(name=exit_, scope="", entry=entry, exit=exit_, add_nodes=())

    chain = [unit("x", "a"), unit("a", "b"), unit("b", "c"), unit("p", "q")]
    expected = {"a": "x", "b": "x", "c": "x", "q": "p"}
    assert substitutions(chain) == expected
    assert substitutions(chain[::-1]) == expected
    assert substitutions([chain[2], chain[0]]) == {"c": "b", "a": "x"}


def test_declared_io_types_survive_a_shapeless_value_info_of_the_same_name():
    # ONNX Runtime's float16 converter lists graph outputs in value_info without shapes.
    model = _two_block_graph()
    model.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    units = find_units(model, shapes={"x": (2, 4), "a1": (2, 4), "y": (2, 4)})
    pruned = remove_units(model, units[:1])
    assert [o.type for o in pruned.graph.output] == [o.type for o in model.graph.output]
    assert [i.type for i in pruned.graph.input] == [i.type for i in model.graph.input]
