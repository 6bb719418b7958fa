"""`--sequential`: the graph cut at unit boundaries, run piece by piece, gives
the same tensors and the same evidence as the one-shot pass."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import sglp_onnx.evidence.sequential as sequential
from sglp_onnx.files.calibration import CalibrationSet, load_calibration
from sglp_onnx.cli import main
from sglp_onnx.errors import UserError
from sglp_onnx.evidence import Executor
from sglp_onnx.evidence.calibration_pass import collect_evidence
from sglp_onnx.units import discover
from sglp_onnx.evidence.activations import stream
from sglp_onnx.evidence.sequential import split_at, stream_sequential
from tiny_graphs import _weight, make_model, residual_mlp, write_model_and_calibration

MODELS = Path(__file__).resolve().parents[1] / "models"
WIDTH = 8


def shared_scale_mlp(n_blocks: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Residual MLP whose every block reads `scale`, computed once from the input and a
    Constant node: a tensor that crosses every cut, as rotary tables do in LLMs."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Constant", [], ["half"], value=helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])),
        helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=1),
        helper.make_node("Sigmoid", ["mean"], ["gate"]),
        helper.make_node("Mul", ["gate", "half"], ["scale"]),
    ]
    inits = []
    h = "input"
    for i in range(n_blocks):
        s = f"blocks.{i}"
        inits += [_weight(rng, f"{s}.w1", (WIDTH, WIDTH)), _weight(rng, f"{s}.w2", (WIDTH, WIDTH))]
        nodes += [
            helper.make_node("MatMul", [h, f"{s}.w1"], [f"{s}.a"]),
            helper.make_node("Relu", [f"{s}.a"], [f"{s}.r"]),
            helper.make_node("MatMul", [f"{s}.r", f"{s}.w2"], [f"{s}.m"]),
            helper.make_node("Mul", [f"{s}.m", "scale"], [f"{s}.f"]),
            helper.make_node("Mul", [f"{s}.f", "half"], [f"{s}.g"]),
            helper.make_node("Add", [h, f"{s}.g"], [f"{s}.out"]),
        ]
        h = f"{s}.out"
    nodes.append(helper.make_node("ReduceSum", [h], ["total"], keepdims=0))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", WIDTH]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
        inits,
    )


def calib_set(n: int = 10, seed: int = 3) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    return CalibrationSet(inputs={"input": rng.standard_normal((n, WIDTH)).astype(np.float32)})


def test_pieces_cover_every_node_once_and_read_only_earlier_tensors():
    model = shared_scale_mlp()
    exits = [f"blocks.{i}.out" for i in range(3)]
    pieces = split_at(model, exits[:-1])
    assert len(pieces) == 3
    constant = 0
    owned = [i for p in pieces for i in p.nodes if model.graph.node[i].op_type != "Constant"]
    assert sorted(owned) == [i for i, n in enumerate(model.graph.node) if i != constant]
    available = {"input"}
    for piece in pieces:
        assert set(piece.inputs) <= available
        available |= set(piece.outputs)
        # The Constant is copied into every piece that reads it, never passed across a cut.
        assert "half" not in piece.inputs and constant in piece.nodes
    assert "scale" in pieces[1].inputs and "scale" in pieces[2].inputs
    assert {o.name for o in model.graph.output} <= available


@pytest.mark.parametrize("batch_size", [3, 10])
def test_stream_sequential_yields_the_one_shot_batches(tmp_path, batch_size):
    model = shared_scale_mlp()
    names = ["input", "scale", "blocks.0.out", "blocks.1.r", "blocks.2.out"]
    calib = calib_set()
    one_shot = list(stream(model, calib, names, batch_size=batch_size))
    pieces = list(stream_sequential(model, calib, names, boundaries=["blocks.0.out", "blocks.1.out"],
                                    batch_size=batch_size, spill_dir=tmp_path))
    assert len(pieces) == len(one_shot) == -(-10 // batch_size)
    for a, b in zip(one_shot, pieces):
        assert a.outputs.keys() == b.outputs.keys() and a.tensors.keys() == b.tensors.keys()
        for key in a.outputs:
            np.testing.assert_allclose(b.outputs[key], a.outputs[key], rtol=1e-6, atol=1e-7)
        for key in a.tensors:
            np.testing.assert_allclose(b.tensors[key], a.tensors[key], rtol=1e-6, atol=1e-7)
    assert list(tmp_path.iterdir()) == []  # spilled tensors are gone


def test_one_piece_session_alive_at_a_time(monkeypatch):
    live: list[weakref.ref] = []
    peak = 0
    make = sequential.make_session

    def counting(model, provider="cpu", **kwargs):
        nonlocal peak
        gc.collect()
        session = make(model, provider, **kwargs)
        live.append(weakref.ref(session))
        peak = max(peak, sum(r() is not None for r in live))
        return session

    monkeypatch.setattr(sequential, "make_session", counting)
    model = residual_mlp(4)
    boundaries = [f"blocks.{i}.out" for i in range(4)]
    list(stream_sequential(model, calib_set(), boundaries, boundaries=boundaries, batch_size=4))
    assert len(live) == 5 and peak == 1


def test_unsorted_graph_is_refused():
    model = residual_mlp(2)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes[4:8] + nodes[:4] + nodes[8:])  # blocks.1 before blocks.0
    with pytest.raises(UserError, match="topologically sorted"):
        split_at(model, ["blocks.1.out"])


def test_cnn1d_sequential_evidence_equals_one_shot():
    model = onnx.load(str(MODELS / "cnn1d_radio.onnx"))
    calib = load_calibration(MODELS / "cnn1d_radio.calib.npz", model, max_samples=96)
    units, _ = discover(model, calib, granularity="layer", provider="cpu")
    one = collect_evidence(model, calib, units, batch_size=32)
    seq = collect_evidence(model, calib, units, batch_size=32, executor=Executor.PIECEWISE)
    assert seq.n_samples == one.n_samples == 96 and seq.batches == one.batches == 3
    np.testing.assert_allclose(seq.cka, one.cka, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(seq.entry_exit_cka, one.entry_exit_cka, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(seq.block_influence, one.block_influence, rtol=1e-6, atol=1e-9)
    units_seq, _ = discover(model, calib, granularity="layer", provider="cpu", executor=Executor.PIECEWISE)
    assert [(u.entry, u.exit, u.flops) for u in units_seq] == [(u.entry, u.exit, u.flops) for u in units]


def test_cli_sequential_compress_matches_one_shot(tmp_path):
    model, _ = write_model_and_calibration(tmp_path, n_blocks=6, n_samples=24)
    reports = []
    for flag in ([], ["--sequential"]):
        out = tmp_path / f"out{len(flag)}.onnx"
        assert main(["-q", "compress", str(model), "-o", str(out), "--remove", "2", "--repair", "none", *flag]) == 0
        reports.append(json.loads(out.with_suffix(".json").read_text()))
    assert [u["removed"] for u in reports[0]["units"]] == [u["removed"] for u in reports[1]["units"]]
    np.testing.assert_allclose(reports[1]["cka"], reports[0]["cka"], atol=1e-6)


@pytest.mark.parametrize("criterion", ["sglp", "damage"])
def test_sequential_fidelity_and_validation_never_load_the_whole_original(tmp_path, monkeypatch, criterion):
    """With --sequential, the held-out fidelity runs the original and the pruned
    model piece by piece and validation compares the pruned model's own session
    with the original's piecewise outputs: no session on a model with every
    block except the pruned model's (and, for damage, the gated search's)."""
    import sglp_onnx.graph.runtime as runtime
    import sglp_onnx.surgery.validation as validation
    from sglp_onnx.pipeline import compress

    model, _ = write_model_and_calibration(tmp_path, n_blocks=6, n_samples=24)
    one_shot = compress(model, tmp_path / "one.onnx", remove=2, criterion=criterion, repair="none")
    sizes: list[int] = []
    make = runtime.make_session

    def recording(source, provider="cpu", **kwargs):
        if isinstance(source, onnx.ModelProto):
            sizes.append(sum(n.op_type == "MatMul" for n in source.graph.node))
        return make(source, provider, **kwargs)

    for module in (sequential, validation):
        monkeypatch.setattr(module, "make_session", recording)
    seq = compress(model, tmp_path / "seq.onnx", remove=2, criterion=criterion, sequential=True)
    assert seq.selection.removed == one_shot.selection.removed
    assert max(sizes) == 2 * (6 - 2) + 1  # the largest session: the pruned model (2 MatMuls a block, a head)
    for key in ("score", "top1_agreement", "rows"):
        np.testing.assert_allclose(seq.report["fidelity"][key], one_shot.report["fidelity"][key], rtol=1e-5)
    assert any("ran the whole model" in note for note in seq.report["notes"]) == (criterion == "damage")
    assert seq.report["validation"]["max_abs_output_diff"] == pytest.approx(
        one_shot.report["validation"]["max_abs_output_diff"], rel=1e-5)


@pytest.mark.parametrize("flags", [{}, {"sequential": True}])
def test_validation_compares_with_the_calibration_pass_outputs(tmp_path, monkeypatch, flags):
    """The calibration pass ran the validation batch first: its outputs are the
    reference, so validation opens one session, on the pruned model; with
    nothing removed both outputs still come from plain sessions (bit-exact)."""
    import sglp_onnx.surgery.validation as validation
    from sglp_onnx.pipeline import compress

    validate = validation.validate

    def without_reference(*args, reference=None, **kwargs):  # validation runs the original itself, as before
        return validate(*args, **kwargs)

    model, _ = write_model_and_calibration(tmp_path, n_blocks=5, n_samples=24)
    with monkeypatch.context() as patch:
        patch.setattr(validation, "validate", without_reference)
        plain = compress(model, tmp_path / "plain.onnx", remove=2, criterion="sglp", repair="none")
    opened: list[int] = []
    make = validation.make_session

    def recording(source, provider="cpu", **kwargs):
        opened.append(sum(n.op_type == "MatMul" for n in source.graph.node))
        return make(source, provider, **kwargs)

    monkeypatch.setattr(validation, "make_session", recording)
    result = compress(model, tmp_path / "out.onnx", remove=2, criterion="sglp", repair="none", **flags)
    assert opened == [2 * 3 + 1]  # the pruned model only
    assert result.report["validation"]["max_abs_output_diff"] == pytest.approx(
        plain.report["validation"]["max_abs_output_diff"], rel=1e-5, abs=1e-7)
    opened.clear()
    none = compress(model, tmp_path / "none.onnx", remove=0, criterion="sglp", **flags)
    assert opened == [2 * 5 + 1, 2 * 5 + 1] and none.report["validation"]["exact_when_nothing_removed"]
