"""Calibration, eval and training arrays are checked against the model's
inputs in one place (files/calibration.py): values outside the input
dtype's range, labels of another shape than documented, arrays that no
input reads, input types numpy cannot hold. Each is exit 2 with one line
through the real CLI, never a silent wrong result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sglp_onnx.cli import main
from cli_runs import Workspace, run_main
from tiny_graphs import calibration, make_model, residual_mlp

CLI = str(Path(sys.executable).with_name("sglp-onnx"))


def with_input_type(elem_type: int) -> onnx.ModelProto:
    """The residual MLP behind a Cast from an `elem_type` input (an image model's uint8 pixels)."""
    model = residual_mlp()
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["as_float" if t == "input" else t for t in node.input]
    graph.node.insert(0, helper.make_node("Cast", ["input"], ["as_float"], to=TensorProto.FLOAT, name="cast_in"))
    graph.input[0].type.tensor_type.elem_type = elem_type
    onnx.checker.check_model(model, full_check=True)
    return model


def fp16_mlp(n_blocks: int = 4, width: int = 8, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "input"
    for i in range(n_blocks):
        s = f"blocks.{i}"
        inits += [numpy_helper.from_array((rng.standard_normal((width, width)) * 0.3).astype(np.float16), f"{s}.w{j}")
                  for j in (1, 2)]
        nodes += [helper.make_node("MatMul", [h, f"{s}.w1"], [f"{s}.a"], name=f"{s}/MatMul"),
                  helper.make_node("Relu", [f"{s}.a"], [f"{s}.r"], name=f"{s}/Relu"),
                  helper.make_node("MatMul", [f"{s}.r", f"{s}.w2"], [f"{s}.f"], name=f"{s}/MatMul_1"),
                  helper.make_node("Add", [h, f"{s}.f"], [f"{s}.out"], name=f"{s}/Add")]
        h = f"{s}.out"
    inits.append(numpy_helper.from_array((rng.standard_normal((width, 3)) * 0.3).astype(np.float16), "head.w"))
    nodes.append(helper.make_node("MatMul", [h, "head.w"], ["logits"], name="head/MatMul"))
    return make_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["batch", width])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", 3])], inits)


def test_integers_outside_the_inputs_range_are_refused(ws, capsys):
    model = ws.root / "in" / "u8.onnx"
    onnx.save_model(with_input_type(TensorProto.UINT8), str(model))
    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 8))
    pixels[3, 2] = 300  # would wrap to 44
    np.savez(ws.root / "in" / "u8.calib.npz", input=pixels)
    run_main(ws, capsys, ["compress", str(model), "-o", str(ws.output), "--remove", "1"], says="300")
    # In range, the same int64 file is cast and used.
    np.savez(ws.root / "in" / "u8.calib.npz", input=np.clip(pixels, 0, 255))
    capsys.readouterr()
    assert main(["-q", "compress", str(model), "-o", str(ws.output), "--remove", "1"]) == 0, capsys.readouterr().err


def test_eval_labels_as_a_column_are_refused(ws, capsys):
    data = calibration()
    bad = ws.root / "in" / "col.npz"
    np.savez(bad, input=data["input"], labels=data["labels"][:, None])
    run_main(ws, capsys, ["eval", str(ws.model), "--data", str(bad)], says="reshape(-1)")


def test_eval_labels_are_used_as_documented(ws, capsys):
    """(N,) labels: the accuracy is the fraction of argmax predictions equal to them."""
    import onnxruntime as ort

    data = calibration()
    logits = ort.InferenceSession(str(ws.model), providers=["CPUExecutionProvider"]).run(None, {"input": data["input"]})[0]
    labels = logits.argmax(-1)
    labels[:4] = (labels[:4] + 1) % 3
    good = ws.root / "in" / "good.npz"
    np.savez(good, input=data["input"], labels=labels)
    capsys.readouterr()
    assert main(["eval", str(ws.model), "--data", str(good), "--json"]) == 0
    import json

    (metrics,) = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(12 / 16)


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_an_array_no_input_reads_is_refused(ws, capsys, command):
    data = calibration()
    bad = ws.root / "in" / "typo.npz"
    np.savez(bad, input=data["input"], label=data["labels"])
    argv = (["compress", str(ws.model), "-o", str(ws.output), "--calib", str(bad)] if command == "compress"
            else ["eval", str(ws.model), "--data", str(bad)])
    err = run_main(ws, capsys, argv, says="'label'")
    assert "'labels'" in err


def test_side_information_is_ignored_and_said(ws, capsys):
    """An array unlike any input name (a radio file's `snr`) is not a typo: ignored, with a note."""
    data = calibration()
    side = ws.root / "in" / "side.npz"
    np.savez(side, **data, snr=np.arange(16))
    capsys.readouterr()
    assert main(["compress", str(ws.model), "-o", str(ws.output), "--calib", str(side), "--remove", "1"]) == 0
    assert "snr ignored" in capsys.readouterr().out


def test_bfloat16_input_is_named(ws, capsys):
    model = ws.root / "in" / "bf16.onnx"
    onnx.save_model(with_input_type(TensorProto.BFLOAT16), str(model))
    err = run_main(ws, capsys, ["compress", str(model), "-o", str(ws.output), "--criterion", "last"],
                   says="bfloat16")
    assert "object" not in err
    run_main(ws, capsys, ["compress", str(model), "-o", str(ws.output), "--calib", str(ws.calib)], says="bfloat16")
    run_main(ws, capsys, ["eval", str(model), "--data", str(ws.calib)], says="bfloat16")
    run_main(ws, capsys, ["bench", str(model), "--runs", "1"], says="bfloat16")


def test_float16_overflow_is_one_line_without_numpy_warnings(ws):
    model = ws.root / "in" / "m16.onnx"
    onnx.save_model(fp16_mlp(), str(model))
    data = calibration()
    np.savez(ws.root / "in" / "m16.calib.npz", input=data["input"] * np.float32(1e6))
    done = subprocess.run([CLI, "-q", "compress", str(model), "-o", str(ws.output)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "float16" in lines[0], done.stderr
    assert not list(ws.out.iterdir())
