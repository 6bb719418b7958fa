"""Healing a pruned model: skip modules, distillation loss, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import criteria_models as cm
from sglp_onnx.files.calibration import CalibrationSet
from sglp_onnx.cli import main
from sglp_onnx.errors import UserError
from sglp_onnx.tools.finetune import (SkipModule, distillation_loss, finetune, output_structure, read_plan,
                                skip_modules, train)
from sglp_onnx.files.model_files import load_model
from sglp_onnx.graph.runtime import make_session

FACTORY = "criteria_models:dead_branch_mlp"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """dead_branch.onnx pruned by SGLP with its torch pairing, plus training data."""
    folder = tmp_path_factory.mktemp("finetune")
    cm.write_model(cm.dead_branch_mlp, folder, "dead_branch")
    np.savez(folder / "train.npz", **cm.data(256, seed=5))
    assert main(["-q", "compress", str(folder / "dead_branch.onnx"), "--remove", "2",
                 "--torch-model", FACTORY]) == 0
    return folder / "dead_branch.pruned.onnx"


def signature(path: Path):
    model = load_model(path)
    describe = [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
                for v in list(model.graph.input) + list(model.graph.output)]
    return describe


def test_finetune_cli_end_to_end(pruned, capsys):
    folder = pruned.parent
    code = main(["finetune", str(pruned), "--torch-model", FACTORY, "--train-data", str(folder / "train.npz"),
                 "--epochs", "8", "--lr", "0.01", "--eval-data", str(folder / "dead_branch.calib.npz"),
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    out = folder / "dead_branch.pruned.finetuned.onnx"
    assert report == json.loads((folder / "dead_branch.pruned.finetuned.json").read_text())
    assert signature(out) == signature(pruned)
    assert report["skipped_modules"] == [f"blocks.{k}" for k in sorted(
        int(u.split(".")[1]) for u in report["removed_units"])]
    assert report["skip_reproduces_pruned_relative_error"] < 1e-5
    train_metrics = report["train_metrics"]
    assert train_metrics["after"]["accuracy"] >= train_metrics["before"]["accuracy"]
    assert train_metrics["after"]["loss"] < train_metrics["before"]["loss"]
    assert report["validation"] == {"checker": True, "runs": True, "signature": True, "finite": True}
    # The written model is the trained one: its accuracy on the training data
    # is what the report says the torch model reached.
    data = np.load(folder / "train.npz")
    logits = make_session(out).run(None, {"input": data["input"]})[0]
    assert np.mean(logits.argmax(1) == data["labels"]) == pytest.approx(train_metrics["after"]["accuracy"])
    assert report["eval"]["before"]["model"] == str(pruned)
    # Same nodes removed: the fine-tuned graph has no more weights than the pruned one.
    count = lambda m: sum(int(np.prod(i.dims)) for i in m.graph.initializer)
    assert count(load_model(out)) <= count(load_model(pruned))
    # An existing output is not overwritten without --force.
    code = main(["finetune", str(pruned), "--torch-model", FACTORY, "--train-data", str(folder / "train.npz"),
                 "--epochs", "1"])
    assert code == 2 and "--force" in capsys.readouterr().err


def test_an_existing_report_beside_a_new_output_is_refused_before_any_work(pruned, tmp_path, capsys):
    out, report = tmp_path / "ft.onnx", tmp_path / "ft.json"
    report.write_text("kept")
    code = main(["finetune", str(pruned), "--torch-model", "sglp_never_imported:f", "--train-data",
                 str(pruned.parent / "train.npz"), "--epochs", "1", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {report} exists; pass --force to overwrite it\n"
    assert not out.exists() and report.read_text() == "kept"


def test_training_is_seeded(pruned):
    data = cm.data(128, seed=5)
    calib = CalibrationSet(inputs={"input": data["input"]}, labels=data["labels"])
    plan = read_plan(pruned)
    teacher = cm.dead_branch_mlp()
    weights = []
    for _ in range(2):
        student = skip_modules(teacher, plan.modules, {})
        train(student, teacher, calib, ["input"], epochs=2, lr=1e-2, batch_size=32, seed=3)
        weights.append(torch.cat([p.flatten() for p in student.parameters()]))
    assert torch.equal(weights[0], weights[1])
    # The teacher is never trained.
    assert torch.equal(torch.cat([p.flatten() for p in teacher.parameters()]),
                       torch.cat([p.flatten() for p in cm.dead_branch_mlp().parameters()]))


def test_report_without_pairing_is_paired_by_finetune(pruned, tmp_path):
    """compress without --torch-model (its default criterion needs none), then finetune with it: finetune
    pairs the original's units itself, and refuses when the original model is gone."""
    folder = pruned.parent
    out = tmp_path / "plain.onnx"
    assert main(["-q", "compress", str(folder / "dead_branch.onnx"), "--remove", "1", "-o", str(out)]) == 0
    assert not json.loads(out.with_suffix(".json").read_text())["pairing"]
    result = finetune(out, torch_model=FACTORY, train_data=folder / "train.npz", epochs=1)
    assert result.report["pairing"].startswith("made by finetune")
    removed = result.report["removed_units"]
    assert len(removed) == 1 and result.report["skipped_modules"] == [f"blocks.{removed[0].split('.')[1]}"]
    assert result.report["skip_reproduces_pruned_relative_error"] < 1e-5
    with pytest.raises(UserError, match="no pruning report"):
        finetune(out, torch_model=FACTORY, train_data=folder / "train.npz", epochs=1,
                 report=tmp_path / "missing.json", output=tmp_path / "other.onnx")
    report = json.loads(out.with_suffix(".json").read_text())
    report["input"] = str(tmp_path / "gone.onnx")
    (tmp_path / "moved.json").write_text(json.dumps(report))
    with pytest.raises(UserError, match="no torch pairing and the model it was made from"):
        finetune(out, torch_model=FACTORY, train_data=folder / "train.npz", epochs=1, report=tmp_path / "moved.json",
                 output=tmp_path / "other.onnx")
    assert not (tmp_path / "other.onnx").exists()


def test_demo_model_default_compress_then_finetune_with_json_redirected(tmp_path):
    """The demo's ResNet-56 compressed with default options, then `finetune -o ft.onnx --json > ft.json`:
    the shell's ft.json is the report's default path, which must not be refused as existing."""
    import subprocess

    from cli_runs import CLI

    root = Path(__file__).resolve().parent.parent
    pruned = tmp_path / "r56.onnx"
    assert main(["-q", "compress", str(root / "models/resnet56_digits.onnx"), "-o", str(pruned),
                 "--criterion", "block-influence"]) == 0
    with open(tmp_path / "ft.json", "w") as stdout:
        done = subprocess.run([CLI, "finetune", str(pruned), "--torch-model", "models.resnet_cifar:resnet56_digits",
                               "--torch-weights", str(root / "models/resnet56_digits.pt"), "--train-data",
                               str(root / "models/resnet56_digits.calib.npz"), "--epochs", "1", "-o",
                               str(tmp_path / "ft.onnx"), "--json"], stdout=stdout, stderr=subprocess.PIPE,
                              text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "ft.json").read_text())
    assert report["output"] == str(tmp_path / "ft.onnx") and report["pairing"].startswith("made by finetune")
    assert report["skip_reproduces_pruned_relative_error"] < 1e-4
    assert (tmp_path / "ft.onnx").is_file()


def test_wrong_torch_model_is_refused(pruned, tmp_path):
    # A different network: skipping the same modules cannot reproduce the pruned ONNX model.
    with pytest.raises(UserError, match="does not reproduce"):
        finetune(pruned, torch_model="criteria_models:other_mlp", train_data=pruned.parent / "train.npz",
                 epochs=1, output=tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


class TupleBlock(nn.Module):
    """Returns (x + f(x), aux) like a transformer layer that also returns attention weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, hidden_states, scale=1.0):
        return hidden_states + self.fc(hidden_states) * scale, hidden_states.sum()


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TupleBlock(), TupleBlock()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(hidden_states=x)[0]
        return x


def test_skip_module_keeps_tuple_outputs_and_keyword_inputs():
    model = TupleNet().eval()
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    structure = output_structure(model, ["layers.1"], {"input": x}, ["input"])
    assert structure == {"layers.1": 2}
    skipped = skip_modules(model, ["layers.1"], structure)
    assert isinstance(skipped.layers[1], SkipModule) and isinstance(model.layers[1], TupleBlock)
    with torch.no_grad():
        expected = model.layers[0](hidden_states=torch.from_numpy(x))[0]
        got = skipped(torch.from_numpy(x))
    torch.testing.assert_close(got, expected)


def test_distillation_loss_is_t_squared_kl():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    p = torch.softmax(teacher / T, -1)
    q = torch.softmax(student / T, -1)
    expected = float((p * (p / q).log()).sum(-1).mean() * T * T)
    assert float(distillation_loss(student, teacher, T)) == pytest.approx(expected, rel=1e-6)
    assert float(distillation_loss(teacher, teacher, T)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("option, value, message", [
    ("epochs", 0, "--epochs"), ("distill_weight", 1.5, "--distill-weight"), ("lr", 0.0, "--lr"),
    ("temperature", -1.0, "--temperature"), ("batch_size", 0, "--batch-size"),
])
def test_bad_training_options_are_user_errors(option, value, message):
    data = cm.data(16)
    calib = CalibrationSet(inputs={"input": data["input"]}, labels=data["labels"])
    kwargs = {"epochs": 1, option: value}
    with pytest.raises(UserError, match=message):
        train(cm.block_mlp(), None, calib, ["input"], **kwargs)
