"""Residual stacks next to control flow: a unit whose exit an If/Loop body
reads from the outer scope is bypassed there too, and residual blocks inside
a body are never offered as units."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import plain_bypass
from sglp_onnx.units.discovery import find_units

D = 8


def _blocks(n: int, rng, prefix: str = "", source: str = "x"):
    nodes, inits, x = [], [], source
    for i in range(n):
        w = f"{prefix}w{i}"
        inits.append(numpy_helper.from_array((rng.standard_normal((D, D)) * 0.3).astype(np.float32), w))
        nodes += [helper.make_node("MatMul", [x, w], [f"{prefix}b{i}"], name=f"{prefix}mm{i}"),
                  helper.make_node("Relu", [f"{prefix}b{i}"], [f"{prefix}r{i}"], name=f"{prefix}relu{i}"),
                  helper.make_node("Add", [x, f"{prefix}r{i}"], [f"{prefix}y{i}"], name=f"{prefix}add{i}")]
        x = f"{prefix}y{i}"
    return nodes, inits, x


def _condition(nodes, inits):
    """cond = all(x > 0) as a bool scalar, computed from x."""
    inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    nodes += [helper.make_node("Greater", ["x", "zero"], ["gt"], name="gt"),
              helper.make_node("Cast", ["gt"], ["gt_f"], to=TensorProto.FLOAT, name="gt_f"),
              helper.make_node("ReduceMin", ["gt_f"], ["gt_min"], keepdims=0, name="gt_min"),
              helper.make_node("Cast", ["gt_min"], ["cond"], to=TensorProto.BOOL, name="cond")]


def _model(nodes, inits, outputs=("out",)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", D]) for o in outputs],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def if_model() -> onnx.ModelProto:
    """Four blocks; an If whose branches read y3 (then: 2*y3) and y2 + y3 (else)."""
    rng = np.random.default_rng(0)
    nodes, inits, _ = _blocks(4, rng)
    _condition(nodes, inits)
    then_g = helper.make_graph([helper.make_node("Mul", ["y3", "two"], ["t_out"], name="then_mul")], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)],
                               initializer=[numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    else_g = helper.make_graph([helper.make_node("Add", ["y2", "y3"], ["e_out"], name="else_add")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes.append(helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g, name="if"))
    return _model(nodes, inits)


def loop_model() -> onnx.ModelProto:
    """Four blocks; a Loop of 3 iterations whose body accumulates acc + y3 (read from the outer scope)."""
    rng = np.random.default_rng(1)
    nodes, inits, _ = _blocks(4, rng)
    inits.append(numpy_helper.from_array(np.array(3, np.int64), "trips"))
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("Add", ["acc_in", "y3"], ["acc_out"], name="body_add")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None)])
    inits.append(numpy_helper.from_array(np.array(True), "true"))
    nodes.append(helper.make_node("Loop", ["trips", "true", "y1"], ["out"], body=body, name="loop"))
    return _model(nodes, inits)


def body_only_model() -> onnx.ModelProto:
    """Residual blocks only inside an If's branches: no unit of the main graph."""
    rng = np.random.default_rng(2)
    nodes, inits = [], []
    _condition(nodes, inits)
    branches = []
    for name in ("then", "else"):
        inner, inner_inits, last = _blocks(3, rng, prefix=f"{name}_")
        inner.append(helper.make_node("Identity", [last], [f"{name}_out"], name=f"{name}_id"))
        branches.append(helper.make_graph(inner, name, [],
                                          [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
                                          initializer=inner_inits))
    nodes.append(helper.make_node("If", ["cond"], ["out"], then_branch=branches[0], else_branch=branches[1],
                                  name="if"))
    return _model(nodes, inits)


def _rewired(model: onnx.ModelProto, mapping: dict[str, str]) -> onnx.ModelProto:
    """An independent reference: every reader of a key, in every scope, reads its value."""
    out = onnx.ModelProto()
    out.CopyFrom(model)

    def visit(graph):
        for node in graph.node:
            for k, name in enumerate(node.input):
                if name in mapping:
                    node.input[k] = mapping[name]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
    visit(out.graph)
    return out


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _compress(tmp_path: Path, model: onnx.ModelProto, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(3)
    # Positive and mixed inputs: both branches of the If run during calibration.
    x = np.concatenate([np.abs(rng.standard_normal((16, D))), rng.standard_normal((16, D))]).astype(np.float32)
    np.savez(tmp_path / "m.calib.npz", x=x)
    return subprocess.run([sys.executable, "-m", "sglp_onnx.cli", "compress", str(path), "-o",
                           str(tmp_path / "p.onnx"), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("make", [if_model, loop_model], ids=["if", "loop"])
def test_units_read_inside_a_body_are_units_with_their_own_cost(make):
    units = find_units(make())
    assert [u.exit for u in units] == ["y0", "y1", "y2", "y3"]
    assert [len(u.nodes) for u in units] == [3, 3, 3, 3]  # the body's reader is not owned by any unit
    assert all(u.params == D * D for u in units)


@pytest.mark.parametrize("make", [if_model, loop_model], ids=["if", "loop"])
@pytest.mark.parametrize("criterion", ["last", "damage", "cka-removal", "default"])
def test_a_unit_whose_exit_a_body_reads_is_bypassed_there_too(tmp_path, make, criterion):
    model = make()
    # "default": every option at its default (the damage criterion, a quarter of the units).
    options = ["--remove", "2", "--criterion", criterion] if criterion != "default" else []
    proc = _compress(tmp_path, model, *options)
    assert proc.returncode == 0, proc.stderr
    import json
    report = json.loads((tmp_path / "p.json").read_text())
    pruned = plain_bypass(tmp_path / "p.onnx", report)
    removed = [u for u in report["units"] if u["removed"]]
    assert len(removed) == (2 if options else 1)
    # The reference: readers of each removed exit (outer and inner scopes) read its entry, chains followed.
    exits = {u["exit"]: u["entry"] for u in removed}
    mapping = {}
    for exit_ in exits:
        source = exits[exit_]
        while source in exits:
            source = exits[source]
        mapping[exit_] = source
    rng = np.random.default_rng(4)
    for x in (np.abs(rng.standard_normal((5, D))).astype(np.float32), rng.standard_normal((5, D)).astype(np.float32)):
        np.testing.assert_allclose(_run(pruned, x), _run(_rewired(model, mapping), x), rtol=1e-6, atol=1e-6)
    assert len(pruned.graph.node) < len(model.graph.node)


def test_residual_blocks_inside_a_body_are_never_units(tmp_path):
    assert find_units(body_only_model()) == []
    proc = _compress(tmp_path, body_only_model(), "--remove", "1")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no prunable unit" in proc.stderr
    assert not (tmp_path / "p.onnx").exists()
