"""`sglp-onnx compress` end to end on tiny models: exit codes, outputs, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from graphs import TinyResNet, example_input, exported, rewire, run, seeded, signature, write_exported
from sglp_onnx.cli import main

UNIT_FIELDS = {"name", "scope", "entry", "exit", "params", "flops", "segment", "importance", "removed"}


def _cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("name", "exporter"), [("resnet", "legacy"), ("transformer", "dynamo")])
def test_remove_zero_writes_a_model_with_exactly_the_same_outputs(tmp_path, capsys, name, exporter):
    model = write_exported(tmp_path, name, exporter)
    code, out, err = _cli(capsys, "compress", model, "--remove", 0)
    assert code == 0, err
    pruned = tmp_path / "model.pruned.onnx"
    report = _report(tmp_path / "model.pruned.json")
    x = example_input(name, 7, seed=11)
    for a, b in zip(run(pruned, x), run(model, x)):
        np.testing.assert_array_equal(a, b)
    assert not any(u["removed"] for u in report["units"])
    assert report["validation"]["exact_when_nothing_removed"] is True
    assert report["after"]["params"] == report["before"]["params"]
    assert signature(onnx.load(str(pruned))) == signature(onnx.load(str(model)))


def test_report_fields_and_numbers(tmp_path, capsys):
    model = write_exported(tmp_path)
    code, out, err = _cli(capsys, "compress", model, "--remove", 2, "--criterion", "sglp")
    assert code == 0, err
    assert "removed 2 of 5 units" in out
    pruned = tmp_path / "model.pruned.onnx"
    report = _report(tmp_path / "model.pruned.json")
    units = report["units"]
    assert [u["scope"] for u in units] == list(TinyResNet.IDENTITY_BLOCKS)
    for u in units:
        assert UNIT_FIELDS <= set(u)
        assert isinstance(u["removed"], bool) and u["params"] > 0 and u["flops"] > 0
        assert isinstance(u["segment"], int) and np.isfinite(u["importance"])
    removed = [u for u in units if u["removed"]]
    assert len(removed) == 2

    cka = np.array(report["cka"])
    assert cka.shape == (5, 5)
    np.testing.assert_allclose(cka, cka.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-5)
    segments = report["segments"]
    assert segments[0][0] == 0 and segments[-1][1] == 5
    assert all(a[1] == b[0] for a, b in zip(segments, segments[1:]))
    assert [u["segment"] for u in units] == [k for k, (a, b) in enumerate(segments) for _ in range(a, b)]
    # Every segment keeps at least one unit.
    assert all(any(not units[i]["removed"] for i in range(a, b)) for a, b in segments)
    assert report["k_selection"]["k"] == len(segments)

    before, after = report["before"], report["after"]
    # The repair maps, when applied, are counted in what the pruned model holds and computes.
    repair = report["repair"]
    added = (repair["params"], repair["flops"]) if repair["applied"] else (0, 0)
    assert before["params"] - after["params"] == sum(u["params"] for u in removed) - added[0]
    assert before["flops"] - after["flops"] == sum(u["flops"] for u in removed) - added[1]
    assert before["file_size"] == model.stat().st_size
    assert after["file_size"] == pruned.stat().st_size < before["file_size"]
    validation = report["validation"]
    assert all(validation[k] is True for k in ("checker", "runs", "signature", "finite", "opset_ir_kept"))
    assert {"load", "discovery", "calibration", "surgery", "validation"} <= set(report["timings"])
    assert all(v >= 0 for v in report["timings"].values())
    assert report["output"] == str(pruned)


# Removal sets through several criteria, among them adjacent units (last: 3 and 4).
SELECTIONS = [
    ("resnet", "legacy", ["--criterion", "last", "--remove", "2"]),
    ("resnet", "legacy", ["--criterion", "random", "--remove", "3", "--seed", "1"]),
    ("resnet", "legacy", ["--criterion", "random", "--remove", "2", "--seed", "4"]),
    ("resnet", "legacy", ["--criterion", "block-influence", "--remove", "3"]),
    ("resnet", "dynamo", ["--criterion", "sglp", "--remove", "2"]),
    ("resnet", "dynamo", ["--criterion", "last", "--remove", "4"]),
    ("transformer", "dynamo", ["--criterion", "last", "--remove", "2"]),
    ("transformer", "legacy", ["--criterion", "random", "--remove", "2", "--seed", "2"]),
    ("transformer", "dynamo", ["--criterion", "last", "--remove", "2", "--granularity", "sublayer"]),
]


@pytest.mark.parametrize(("name", "exporter", "args"), SELECTIONS,
                         ids=[f"{n}-{e}-{'-'.join(a[1::2])}" for n, e, a in SELECTIONS])
def test_output_equals_independent_rewiring_of_the_reported_units(tmp_path, capsys, name, exporter, args):
    model = write_exported(tmp_path, name, exporter)
    # The plain bypass (repaired models: test_repair.py).
    code, _, err = _cli(capsys, "-q", "compress", model, *args, "--repair", "none")
    assert code == 0, err
    report = _report(tmp_path / "model.pruned.json")
    pairs = [(u["entry"], u["exit"]) for u in report["units"] if u["removed"]]
    assert len(pairs) == report["budget"]["units_removed"] > 0
    if args[1] == "last":
        removed = [u["index"] for u in report["units"] if u["removed"]]
        assert removed == list(range(len(report["units"]) - len(removed), len(report["units"])))
    x = example_input(name, 5, seed=21)
    reference = rewire(onnx.load(str(model)), pairs)
    np.testing.assert_array_equal(run(tmp_path / "model.pruned.onnx", x)[0], run(reference, x)[0])


def test_existing_output_is_not_overwritten_without_force(tmp_path, capsys):
    model = write_exported(tmp_path)
    assert _cli(capsys, "compress", model, "--criterion", "last", "--remove", 1)[0] == 0
    pruned, report = tmp_path / "model.pruned.onnx", tmp_path / "model.pruned.json"
    before = pruned.read_bytes(), report.read_bytes()
    code, _, err = _cli(capsys, "compress", model, "--criterion", "last", "--remove", 2)
    assert code == 2
    assert "--force" in _one_error_line(err)
    assert (pruned.read_bytes(), report.read_bytes()) == before
    code, _, err = _cli(capsys, "compress", model, "--criterion", "last", "--remove", 2, "--force")
    assert code == 0, err
    assert sum(u["removed"] for u in _report(report)["units"]) == 2


def test_explicit_output_and_report_paths(tmp_path, capsys):
    model = write_exported(tmp_path)
    out, rep = tmp_path / "small.onnx", tmp_path / "r" / "rep.json"
    rep.parent.mkdir()
    code, stdout, _ = _cli(capsys, "compress", model, "-o", out, "--report", rep, "--criterion", "last",
                           "--remove", 1, "--json")
    assert code == 0
    printed = json.loads(stdout)
    assert printed["output"] == str(out) and printed["report_path"] == str(rep)
    assert _report(rep)["units"] == printed["units"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.calib.npz", "model.onnx", "r", "small.onnx"]


def test_analyze_writes_nothing(tmp_path, capsys):
    model = write_exported(tmp_path)
    code, out, _ = _cli(capsys, "analyze", model, "--remove", 2, "--json")
    assert code == 0
    report = json.loads(out)
    assert len(report["units"]) == 5 and np.array(report["cka"]).shape == (5, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.calib.npz", "model.onnx"]


def test_paired_torch_model_gives_gradnorm(tmp_path, capsys):
    model = write_exported(tmp_path)
    weights = tmp_path / "w.pt"
    torch.save(exported("resnet", "legacy")[0].state_dict(), weights)
    code, _, err = _cli(capsys, "compress", model, "--remove", 2, "--criterion", "sglp", "--torch-model", "graphs:tiny_resnet",
                        "--torch-weights", weights)
    assert code == 0, err
    report = _report(tmp_path / "model.pruned.json")
    assert report["importance_kind"] == "GradNorm"
    assert [p["modules"] for p in report["pairing"]["units"]] == [[s] for s in TinyResNet.IDENTITY_BLOCKS]
    assert report["pairing"]["output_relative_error"] < 1e-4
    assert all(u["importance"] > 0 for u in report["units"])


def test_paired_model_with_other_weights_is_refused(tmp_path, capsys):
    model = write_exported(tmp_path)
    weights = tmp_path / "other.pt"
    torch.save(seeded(TinyResNet, seed=1).state_dict(), weights)
    code, _, err = _cli(capsys, "compress", model, "--remove", 2, "--torch-model", "graphs:tiny_resnet",
                        "--torch-weights", weights)
    assert code == 2
    assert "torch" in _one_error_line(err)
    assert not (tmp_path / "model.pruned.onnx").exists() and not (tmp_path / "model.pruned.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--remove", "5"], "at least one must stay"),
    (["--remove", "1", "--ratio", "0.3"], "only one of"),
    (["--criterion", "nope"], "unknown criterion"),
    (["--segments", "5", "--remove", "1"], "segments"),
])
def test_bad_requests_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    model = write_exported(tmp_path)
    code, _, err = _cli(capsys, "compress", model, *args)
    assert code == 2
    assert message in _one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.calib.npz", "model.onnx"]


def test_missing_model_exits_2(tmp_path, capsys):
    code, _, err = _cli(capsys, "compress", tmp_path / "absent.onnx")
    assert code == 2
    assert "absent.onnx" in _one_error_line(err)
