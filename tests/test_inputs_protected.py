"""No file a run reads is ever written by it, with or without --force: the
model, its external data, the calibration file (--calib or the sidecar),
the torch weights, the pruning report finetune reads, the files export
reads. Every output of every command is checked against them (through the
real CLI: exit 2, one error line, every file byte-identical)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sglp_onnx.cli import main
from cli_runs import Workspace, run_main, snapshot
from tiny_graphs import residual_mlp


def explicit_calib(ws: Workspace) -> Path:
    other = ws.root / "in" / "data.npz"
    other.write_bytes(ws.calib.read_bytes())
    return other


@pytest.mark.parametrize("flag", ["-o", "--report", "--plot"])
@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
@pytest.mark.parametrize("which", ["sidecar", "--calib"])
def test_compress_never_writes_the_calibration_file(ws, capsys, flag, force, which):
    calib = ws.calib if which == "sidecar" else explicit_calib(ws)
    target = calib if flag != "--plot" else calib.with_suffix(".png")
    if flag == "--plot":  # a plot needs an image suffix: the same file through a link
        os.link(calib, target)
    given = ["--calib", str(calib)] if which == "--calib" else []
    argv = ["compress", str(ws.model), *(["-o", str(ws.output)] if flag != "-o" else []), flag, str(target),
            "--remove", "1", *given, *force]
    run_main(ws, capsys, argv, says="file this run reads") if flag != "--plot" else \
        run_main(ws, capsys, argv, says=str(calib.name))


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_analyze_plot_never_writes_the_calibration_file(ws, capsys, force):
    link = ws.calib.with_suffix(".png")
    os.link(ws.calib, link)  # a hard link: another name, the same file
    run_main(ws, capsys, ["analyze", str(ws.model), "--plot", str(link), *force], says="file this run reads")


def test_outputs_never_write_the_external_data(ws, capsys):
    model = residual_mlp(4, 64)
    folder = ws.root / "ext"
    folder.mkdir()
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    np.savez(folder / "m.calib.npz", input=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    for flag in ("-o", "--report"):
        other = ["-o", str(ws.output)] if flag == "--report" else []
        run_main(ws, capsys, ["compress", str(folder / "m.onnx"), *other, flag, str(folder / "weights.bin"),
                              "--remove", "1", "--force"], says="weights.bin")


def test_compress_never_writes_the_torch_weights(ws, capsys):
    weights = ws.root / "in" / "w.pt"
    torch.save({}, weights)
    run_main(ws, capsys, ["compress", str(ws.model), "-o", str(ws.output), "--report", str(weights),
                          "--torch-model", "no_such_module:f", "--torch-weights", str(weights), "--force"],
             says="file this run reads")


def test_export_never_writes_its_weights(ws, capsys):
    weights = ws.root / "in" / "w.pt"
    torch.save({}, weights)
    run_main(ws, capsys, ["export", "no_such_module:f", "--torch-weights", str(weights), "-o", str(weights),
                          "--force"], says="file this run reads")


@pytest.mark.parametrize("which", ["train", "eval", "report", "weights"])
def test_finetune_never_writes_what_it_reads(ws, capsys, which):
    folder = ws.root / "in"
    pruned = folder / "p.onnx"
    pruned.write_bytes(ws.model.read_bytes())
    files = {"train": ws.calib, "eval": folder / "eval.npz", "report": folder / "p.json", "weights": folder / "w.pt"}
    files["eval"].write_bytes(ws.calib.read_bytes())
    files["report"].write_text("{}")
    torch.save({}, files["weights"])
    output = files[which]
    if which == "report":  # -o X.onnx writes its report to X.json: here the pruning report
        output = ws.out / "p.onnx"
        files["report"] = ws.out / "p.json"
        files["report"].write_text("{}")
    argv = ["finetune", str(pruned), "--torch-model", "no_such_module:f", "--torch-weights", str(files["weights"]),
            "--train-data", str(files["train"]), "--eval-data", str(files["eval"]), "--report", str(files["report"]),
            "--epochs", "1", "-o", str(output), "--force"]
    run_main(ws, capsys, argv, says="file this run reads")


def test_a_new_output_beside_the_calibration_still_works(ws, capsys):
    """The sidecar is protected, not its folder: a fresh name beside it is fine."""
    capsys.readouterr()
    assert main(["-q", "compress", str(ws.model), "--remove", "1"]) == 0, capsys.readouterr().err
    assert snapshot(ws.root)["in/model.calib.npz"]


def test_several_models_never_write_one_of_them(ws, capsys):
    """`compress a.onnx a.pruned.onnx -O DIR`: a's output would replace the next model before it is read."""
    second = ws.model.with_name("model.pruned.onnx")
    second.write_bytes(ws.model.read_bytes())
    run_main(ws, capsys, ["compress", str(ws.model), str(second), "-O", str(ws.model.parent), "--remove", "1",
                          "--force"], says="file this run reads")
