"""The pruned model keeps the original's signature (graph inputs that are
also initializers included), and the fidelity, the measured-damage search
and validation score the output that is a distribution when the first
graph output is integer class ids, or the one --fidelity-output names.
Through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from sglp_onnx.cli import main
from sglp_onnx.surgery.validation import validate
from sglp_onnx.errors import ValidationError
from cli_runs import Workspace, run_main
from tiny_graphs import calibration, residual_mlp

OVERRIDABLE = ("blocks.3.w1", "blocks.0.w2", "head.w")


def with_initializer_inputs(names=OVERRIDABLE) -> onnx.ModelProto:
    model = residual_mlp()
    for name in names:
        (init,) = [i for i in model.graph.initializer if i.name == name]
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(init.dims)))
    onnx.checker.check_model(model, full_check=True)
    return model


def compress(capsys, model: Path, out: Path, *options: str) -> dict:
    capsys.readouterr()
    code = main(["-q", "compress", str(model), "-o", str(out), "--force", *options])
    assert code == 0, capsys.readouterr().err
    return json.loads(out.with_suffix(".json").read_text())


@pytest.mark.parametrize("criterion", ["damage", "last"])
def test_initializer_inputs_stay_inputs(ws, capsys, criterion):
    source = ws.root / "in" / "model.onnx"
    onnx.save_model(with_initializer_inputs(), str(source))
    report = compress(capsys, source, ws.output, "--remove", "1", "--criterion", criterion)
    pruned = onnx.load(str(ws.output))
    removed = {f"blocks.{i}" for i, u in enumerate(report["units"]) if u["removed"]}  # unit i is block i
    assert len(removed) == 1
    # A weight of a removed block goes with it, and the report says so; every other stays an input.
    gone = {name for name in OVERRIDABLE if name.rsplit(".", 1)[0] in removed}
    assert [i.name for i in pruned.graph.input] == ["input", *(n for n in OVERRIDABLE if n not in gone)]
    assert report["validation"]["signature"] and report["validation"]["removed_inputs"] == sorted(gone)
    # Still overridable: feeding a weight changes the output exactly as in the original.
    x = calibration(4, seed=3)["input"]
    session = ort.InferenceSession(str(ws.output), providers=["CPUExecutionProvider"])
    head = np.zeros((8, 3), np.float32)
    assert np.all(session.run(None, {"input": x, "head.w": head})[0] == 0)


def test_validation_refuses_a_lost_input():
    original = with_initializer_inputs()
    pruned = onnx.ModelProto()
    pruned.CopyFrom(original)
    pruned.graph.input.pop()  # head.w is no longer an input
    feed = {"input": calibration(4)["input"]}
    with pytest.raises(ValidationError, match="signature"):
        validate(original, pruned, feed, removed_outputs=set(), removed_inputs=set(), nothing_removed=True)


def classifier(first: str) -> onnx.ModelProto:
    """The residual MLP as scikit-learn-to-ONNX lays out a classifier:
    `label` (ArgMax class ids, int64) then `probabilities` (Softmax), or
    (first="probabilities") the probabilities alone."""
    model = residual_mlp()
    graph = model.graph
    graph.node.extend([helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1, name="softmax"),
                       helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0, name="argmax")])
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])]
    if first == "label":
        outputs.insert(0, helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]))
    del graph.output[:]
    graph.output.extend(outputs)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_integer_first_output_scores_the_distribution(ws, capsys):
    folder = ws.root / "in"
    for first in ("label", "probabilities"):
        onnx.save_model(classifier(first), str(folder / f"{first}.onnx"))
        (folder / f"{first}.calib.npz").write_bytes(ws.calib.read_bytes())
    ids = compress(capsys, folder / "label.onnx", ws.out / "a.onnx", "--remove", "2")
    probs = compress(capsys, folder / "probabilities.onnx", ws.out / "b.onnx", "--remove", "2")
    assert ids["fidelity"]["output"] == "probabilities" and ids["fidelity"]["kind"] == "kl"
    assert "'label' is int64" in ids["fidelity"]["rule"]
    # The damage search measured the same thing: the same units, the same score.
    assert [u["removed"] for u in ids["units"]] == [u["removed"] for u in probs["units"]]
    assert ids["fidelity"]["score"] == pytest.approx(probs["fidelity"]["score"], rel=1e-9)
    assert ids["validation"]["top1_agreement"] is not None
    capsys.readouterr()
    assert main(["compress", str(folder / "label.onnx"), "-o", str(ws.out / "c.onnx"), "--remove", "2"]) == 0
    assert "scored output 'probabilities'" in capsys.readouterr().out


def test_fidelity_output_chooses_and_unknown_names_exit_2(ws, capsys):
    source = ws.root / "in" / "cls.onnx"
    onnx.save_model(classifier("label"), str(source))
    (ws.root / "in" / "cls.calib.npz").write_bytes(ws.calib.read_bytes())
    report = compress(capsys, source, ws.output, "--remove", "1", "--fidelity-output", "logits")
    assert report["fidelity"]["output"] == "logits" and "--fidelity-output" in report["fidelity"]["rule"]
    capsys.readouterr()
    assert main(["-q", "analyze", str(source), "--fidelity-output", "logits", "--json", "--suggest", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["fidelity"]["output"] == "logits"
    run_main(ws, capsys, ["compress", str(source), "-o", str(ws.out / "x.onnx"), "--fidelity-output", "logit"],
             says="'logits'")


def test_eval_reads_the_distribution_not_the_class_ids(ws, capsys):
    source = ws.root / "in" / "cls.onnx"
    onnx.save_model(classifier("label"), str(source))
    capsys.readouterr()
    assert main(["eval", str(source), "--data", str(ws.calib), "--json"]) == 0
    (metrics,) = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] is not None


def test_a_zipmap_output_is_refused_in_one_line(ws, capsys):
    """scikit-learn-to-ONNX's default layout: `label`, then the probabilities as a
    sequence of maps (ZipMap), which no score can compare: exit 2, how to export it."""
    model = classifier("label")
    graph = model.graph
    graph.node.append(helper.make_node("ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml",
                                       classlabels_int64s=[0, 1, 2], name="zipmap"))
    del graph.output[1:]
    graph.output.append(helper.make_value_info("output_probability", helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))))
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    onnx.checker.check_model(model, full_check=True)
    source = ws.root / "in" / "zipmap.onnx"
    onnx.save_model(model, str(source))
    (ws.root / "in" / "zipmap.calib.npz").write_bytes(ws.calib.read_bytes())
    run_main(ws, capsys, ["compress", str(source), "-o", str(ws.output)], says="zipmap")
    run_main(ws, capsys, ["eval", str(source), "--data", str(ws.calib)], says="not a tensor")


def test_labels_are_checked_against_the_scored_outputs_classes(ws, capsys):
    source = ws.root / "in" / "cls.onnx"
    onnx.save_model(classifier("label"), str(source))
    data = calibration()
    bad = ws.root / "in" / "bad.npz"
    np.savez(bad, input=data["input"], labels=np.full(16, 7))  # 3 classes
    run_main(ws, capsys, ["eval", str(source), "--data", str(bad)], says="3 classes")
