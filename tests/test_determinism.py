"""Same inputs and seed -> the same removed units and a byte-identical model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sglp_onnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "cnn1d_radio.onnx"
WEIGHTS = ROOT / "models" / "cnn1d_radio.pt"
CLI = str(Path(sys.executable).with_name("sglp-onnx"))


@pytest.fixture(scope="module")
def small_calib(tmp_path_factory) -> Path:
    """The first 24 samples of the radio model's calibration set (fast, still real signals)."""
    full = np.load(ROOT / "models" / "cnn1d_radio.calib.npz")
    path = tmp_path_factory.mktemp("calib") / "radio24.npz"
    np.savez(path, input=full["input"][:24], labels=full["labels"][:24])
    return path


def _removed(report: Path) -> list[str]:
    return [u["name"] for u in json.loads(report.read_text())["units"] if u["removed"]]


def _compress_in_process(out: Path, *args: str) -> None:
    code = main(["-q", "compress", str(MODEL), "-o", str(out), *args])
    assert code == 0


def _report_without_run_details(path: Path) -> dict:
    report = json.loads(path.read_text())
    for key in ("timings", "output", "report_path"):
        report.pop(key)
    return report


def _assert_same(a: Path, b: Path) -> list[str]:
    assert a.read_bytes() == b.read_bytes(), "the two runs wrote different models"
    removed = _removed(a.with_suffix(".json"))
    assert removed == _removed(b.with_suffix(".json"))
    # Importance, CKA, segments, K curve: all identical, only timings and paths differ.
    assert _report_without_run_details(a.with_suffix(".json")) == _report_without_run_details(b.with_suffix(".json"))
    assert removed, "nothing was removed: the comparison would be vacuous"
    return removed


def test_sglp_without_torch_model_across_processes(tmp_path, small_calib):
    # Separate processes with different hash seeds: no set or dict order may leak into the result.
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"run{seed}.onnx"
        done = subprocess.run(
            [CLI, "-q", "compress", str(MODEL), "-o", str(out), "--calib", str(small_calib), "--ratio", "0.3"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert done.returncode == 0, done.stderr
        outs.append(out)
    _assert_same(*outs)


def test_sglp_with_torch_model(tmp_path, small_calib):
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        _compress_in_process(out, "--calib", str(small_calib), "--ratio", "0.3", "--batch-size", "12",
                             "--criterion", "sglp", "--torch-model", "models.cnn1d:cnn1d_radio", "--torch-weights", str(WEIGHTS))
    _assert_same(*outs)
    report = json.loads(outs[0].with_suffix(".json").read_text())
    assert report["importance_kind"] == "GradNorm"


@pytest.mark.parametrize("criterion", ["random", "last"])
def test_data_free_criteria(tmp_path, criterion):
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        _compress_in_process(out, "--criterion", criterion, "--remove", "5", "--seed", "7")
    _assert_same(*outs)


def test_random_depends_on_the_seed(tmp_path):
    removed = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"s{seed}.onnx"
        _compress_in_process(out, "--criterion", "random", "--remove", "5", "--seed", seed)
        removed.append(tuple(_removed(out.with_suffix(".json"))))
    assert len(set(removed)) > 1, "the seed changed nothing"
