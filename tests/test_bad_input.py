"""Bad input through the real CLI: exit 2, one or two lines saying what is
wrong and what to do, no traceback, nothing written, the input untouched."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sglp_onnx.cli import main
from cli_runs import CLI, Workspace, assert_refused, compress_args, run_main, snapshot
from tiny_graphs import calibration, plain_mlp

N_UNITS = 4  # the residual MLP of tiny_graphs has four blocks


# -- the model file ---------------------------------------------------------------------------------------------


def test_missing_model_file(ws, capsys):
    run_main(ws, capsys, compress_args(ws, model=ws.root / "in" / "absent.onnx"), says="not found")


def test_empty_model_file(ws, capsys):
    empty = ws.root / "in" / "empty.onnx"
    empty.write_bytes(b"")
    run_main(ws, capsys, compress_args(ws, model=empty), says="empty")


def test_text_file_named_onnx(ws, capsys):
    text = ws.root / "in" / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    run_main(ws, capsys, compress_args(ws, model=text), says="not a readable ONNX model")


def test_truncated_model(ws, capsys):
    data = ws.model.read_bytes()
    cut = ws.root / "in" / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    run_main(ws, capsys, compress_args(ws, "--calib", str(ws.calib), model=cut), says="ONNX model")


def test_model_is_a_folder(ws, capsys):
    folder = ws.root / "in" / "folder.onnx"
    folder.mkdir()
    run_main(ws, capsys, compress_args(ws, model=folder), says="folder.onnx")


def test_a_folder_holding_a_model_names_the_file_to_give(ws, capsys):
    """An onnxruntime-genai or Optimum folder given as the model: the line names its model file."""
    folder = ws.root / "in" / "genai"
    folder.mkdir()
    onnx.save_model(plain_mlp(), str(folder / "model.onnx"))
    run_main(ws, capsys, compress_args(ws, model=folder), says=f"give the model file in it ({folder / 'model.onnx'})")


def test_model_without_prunable_unit(ws, capsys):
    path = ws.root / "in" / "plain.onnx"
    onnx.save_model(plain_mlp(), str(path))
    run_main(ws, capsys, compress_args(ws, "--calib", str(ws.calib), model=path), says="no prunable unit")


# -- the calibration file ---------------------------------------------------------------------------------------


def _bad_calibration(ws: Workspace, arrays: dict[str, np.ndarray]) -> Path:
    path = ws.root / "in" / "bad.npz"
    np.savez(path, **arrays)
    return path


def test_calibration_not_an_npz(ws, capsys):
    path = ws.root / "in" / "calib.npz"
    path.write_text("input,labels\n1,2\n")
    run_main(ws, capsys, compress_args(ws, "--calib", str(path)), says="not a readable .npz")


def _npy_named_npz(path: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, calibration()["input"])


def _zip_of_text(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("input.txt", "1 2 3")


def _corrupt_compressed(path: Path) -> None:
    np.savez_compressed(path, **calibration(64))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("write", [_npy_named_npz, _zip_of_text, _corrupt_compressed, _empty_file],
                         ids=["npy", "zip-of-text", "corrupt-compressed", "empty"])
def test_calibration_not_a_proper_npz(ws, capsys, write):
    path = ws.root / "in" / "calib.npz"
    write(path)
    run_main(ws, capsys, compress_args(ws, "--calib", str(path)), says="not a readable .npz")


def test_calibration_without_samples(ws, capsys):
    path = _bad_calibration(ws, {"input": np.zeros((0, 8), np.float32)})
    run_main(ws, capsys, compress_args(ws, "--calib", str(path)), says="no samples")


def test_calibration_missing(ws, capsys):
    run_main(ws, capsys, compress_args(ws, "--calib", str(ws.root / "in" / "absent.npz")), says="not found")


def test_calibration_lacks_the_input(ws, capsys):
    good = calibration()
    path = _bad_calibration(ws, {"x": good["input"], "labels": good["labels"]})
    run_main(ws, capsys, compress_args(ws, "--calib", str(path)), says="lacks the model input(s) input")


@pytest.mark.parametrize(
    ("array", "says"),
    [
        (np.zeros((16, 8, 1), np.float32), "rank 3"),
        (np.zeros((16, 5), np.float32), "shape (16, 5)"),
        (np.zeros((16, 8), np.int64), "dtype int64"),
        (np.array([["a"] * 8] * 16), "dtype <U1"),
    ],
    ids=["rank", "shape", "dtype", "strings"],
)
def test_calibration_wrong_array(ws, capsys, array, says):
    path = _bad_calibration(ws, {"input": array})
    run_main(ws, capsys, compress_args(ws, "--calib", str(path)), says=says)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_calibration_not_finite(ws, capsys, bad):
    arrays = calibration()
    arrays["input"][3, 2] = bad
    path = _bad_calibration(ws, arrays)
    run_main(ws, capsys, compress_args(ws, "--calib", str(path)), says="NaN or Inf")


def test_calibration_with_pickled_objects_is_refused(ws, capsys):
    path = ws.root / "in" / "objects.npz"
    np.savez(path, input=np.array([{"a": 1}] * 16, dtype=object))
    run_main(ws, capsys, compress_args(ws, "--calib", str(path)), says="not a readable .npz")


def test_calibration_labels_disagree_in_length(ws, capsys):
    arrays = calibration()
    arrays["labels"] = arrays["labels"][:5]
    path = _bad_calibration(ws, arrays)
    run_main(ws, capsys, compress_args(ws, "--calib", str(path)), says="number of samples")


# -- the budget -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2", "nan"])
def test_ratio_outside_open_unit_interval(ws, capsys, ratio):
    run_main(ws, capsys, compress_args(ws, "--ratio", ratio), says="--ratio must be in (0, 1)")


@pytest.mark.parametrize("flops", ["0", "1", "2"])
def test_target_flops_outside_open_unit_interval(ws, capsys, flops):
    run_main(ws, capsys, compress_args(ws, "--target-flops", flops), says="--target-flops must be in (0, 1)")


def test_two_budgets_at_once(ws, capsys):
    run_main(ws, capsys, compress_args(ws, "--remove", "1", "--ratio", "0.5"), says="--remove")


@pytest.mark.parametrize("criterion", ["sglp", "random", "last", "block-influence"])
def test_remove_all_units(ws, capsys, criterion):
    run_main(ws, capsys, compress_args(ws, "--remove", str(N_UNITS), "--criterion", criterion),
             says=f"remove at most {N_UNITS - 1}")


def test_remove_negative(ws, capsys):
    run_main(ws, capsys, compress_args(ws, "--remove", "-1"), says="--remove")


def test_explicit_segments_make_the_request_impossible(ws, capsys):
    # Three segments over four units keep three: only one can go.
    run_main(ws, capsys, compress_args(ws, "--remove", "2", "--segments", "3", "--criterion", "sglp"), says="at most 1")


def test_more_segments_than_units(ws, capsys):
    run_main(ws, capsys, compress_args(ws, "--remove", "1", "--segments", str(N_UNITS + 1)), says="--segments")


def test_zero_segments(ws, capsys):
    run_main(ws, capsys, compress_args(ws, "--remove", "1", "--segments", "0"), says="--segments")


def test_unknown_criterion(ws, capsys):
    err = run_main(ws, capsys, compress_args(ws, "--criterion", "magnitude"), says="unknown criterion 'magnitude'")
    assert "sglp" in err  # the valid choices are listed


def test_gradnorm_without_torch_model(ws, capsys):
    run_main(ws, capsys, compress_args(ws, "--criterion", "gradnorm"), says="--torch-model")


@pytest.mark.parametrize("size", ["0", "-3"])
def test_bad_batch_size(ws, capsys, size):
    run_main(ws, capsys, compress_args(ws, "--batch-size", size), says="--batch-size")


@pytest.mark.parametrize("criterion", ["random", "sglp"])
def test_negative_seed(ws, capsys, criterion):
    run_main(ws, capsys, compress_args(ws, "--seed", "-1", "--criterion", criterion), says="--seed")


def test_too_few_calibration_samples_for_cka(ws, capsys):
    path = _bad_calibration(ws, calibration(n=2))
    run_main(ws, capsys, compress_args(ws, "--calib", str(path)), says="at least 4")


# -- extreme but valid input: works, quietly, and the report stays strict JSON ----------------------------------


def test_overflowing_activations_give_a_strict_json_report(ws, capsys):
    import json

    arrays = calibration()
    arrays["input"] *= np.float32(1e38)  # the residual sums overflow to inf
    path = _bad_calibration(ws, arrays)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["-q", *compress_args(ws, "--calib", str(path), "--ratio", "0.5")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads(ws.output.with_suffix(".json").read_text(), parse_constant=refuse)
    assert report["calibration"]["nonfinite_values"] > 0


# -- where the output goes --------------------------------------------------------------------------------------


def test_output_folder_does_not_exist(ws, capsys):
    argv = ["compress", str(ws.model), "-o", str(ws.root / "nowhere" / "x.onnx")]
    run_main(ws, capsys, argv, says="does not exist")


def test_output_folder_not_writable(ws, capsys):
    locked = ws.root / "locked"
    locked.mkdir(mode=0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_bytes(b"")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("permission bits do not stop this user (root) from writing; see the /proc case")
        run_main(ws, capsys, ["compress", str(ws.model), "-o", str(locked / "x.onnx")], says="cannot write")
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_folder_that_refuses_files_even_for_root(ws, capsys):
    # /proc accepts no new files whoever asks: os.access says yes to root, the write fails.
    run_main(ws, capsys, ["compress", str(ws.model), "-o", "/proc/sglp-test-output.onnx"], says="cannot write")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_export_into_a_folder_that_refuses_files(ws, capsys):
    argv = ["export", "torch.nn:ReLU", "-o", "/proc/sglp-test-export.onnx", "--input-shape", "1,4"]
    run_main(ws, capsys, argv, says="cannot write")


def test_output_is_a_folder(ws, capsys):
    run_main(ws, capsys, ["compress", str(ws.model), "-o", str(ws.out), "--force"], says="folder")


def test_output_exists_without_force(ws, capsys):
    ws.output.write_bytes(b"precious")
    run_main(ws, capsys, compress_args(ws, "--ratio", "0.5"), says="--force")
    assert ws.output.read_bytes() == b"precious"


def test_report_exists_without_force(ws, capsys):
    report = ws.out / "pruned.json"
    report.write_text("{}")
    run_main(ws, capsys, compress_args(ws, "--ratio", "0.5"), says="--force")


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_output_is_the_input(ws, capsys, force):
    argv = ["compress", str(ws.model), "-o", str(ws.model), "--ratio", "0.5", *force]
    run_main(ws, capsys, argv, says="is the input model")


def test_output_is_the_input_through_another_spelling(ws, capsys):
    other = ws.model.parent / ".." / "in" / ws.model.name
    run_main(ws, capsys, ["compress", str(ws.model), "-o", str(other), "--force"], says="is the input model")


def test_report_is_the_input(ws, capsys):
    argv = compress_args(ws, "--report", str(ws.model), "--force")
    run_main(ws, capsys, argv, says="is the input model")


def test_report_is_the_output(ws, capsys):
    argv = compress_args(ws, "--report", str(ws.output))
    run_main(ws, capsys, argv, says="different files")


# -- the paired torch model -------------------------------------------------------------------------------------

FACTORIES = '''
import torch

def linear():
    return torch.nn.Linear(8, 3)

def not_a_model():
    return {"weights": 1}

def raises():
    raise RuntimeError("factory blew up")

answer = 42
'''


@pytest.fixture
def factories(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.mktemp("factories")
    (folder / "sglp_test_factories.py").write_text(FACTORIES)
    (folder / "sglp_test_broken.py").write_text("import numpy\nraise ImportError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    return folder


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("sglp_no_such_module_xyz:build", "cannot import module 'sglp_no_such_module_xyz'"),
        ("sglp_test_broken:build", "broken on purpose"),
        ("sglp_test_factories:absent", "has no attribute 'absent'"),
        ("sglp_test_factories:answer", "not a callable"),
        ("sglp_test_factories:not_a_model", "not a torch.nn.Module"),
        ("sglp_test_factories:raises", "factory blew up"),
        ("no-colon-here", "expected MODULE:FACTORY"),
    ],
    ids=["missing", "import-error", "no-attribute", "not-callable", "wrong-return", "raises", "bad-spec"],
)
def test_torch_factory_problems(ws, capsys, factories, spec, says):
    run_main(ws, capsys, compress_args(ws, "--remove", "1", "--torch-model", spec), says=says)


@pytest.mark.parametrize(
    ("state", "says"),
    [
        ({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, "do not fit"),
        ({"weight": torch.zeros(3, 8)}, "missing keys: bias"),
        ({"weight": torch.zeros(3, 8), "bias": torch.zeros(3), "extra": torch.zeros(1)}, "unexpected keys: extra"),
        ({"weight": [1, 2, 3]}, "not a state_dict"),
    ],
    ids=["shape", "missing-key", "unexpected-key", "not-tensors"],
)
def test_weights_that_do_not_fit(ws, capsys, factories, state, says):
    weights = ws.root / "in" / "w.pt"
    torch.save(state, weights)
    argv = compress_args(ws, "--remove", "1", "--torch-model", "sglp_test_factories:linear",
                         "--torch-weights", str(weights))
    run_main(ws, capsys, argv, says=says)


def test_weights_file_missing(ws, capsys, factories):
    argv = compress_args(ws, "--remove", "1", "--torch-model", "sglp_test_factories:linear",
                         "--torch-weights", str(ws.root / "in" / "absent.pt"))
    run_main(ws, capsys, argv, says="not found")


def test_weights_file_not_a_checkpoint(ws, capsys, factories):
    weights = ws.root / "in" / "w.pt"
    weights.write_text("not a checkpoint")
    argv = compress_args(ws, "--remove", "1", "--torch-model", "sglp_test_factories:linear",
                         "--torch-weights", str(weights))
    run_main(ws, capsys, argv, says="weights")


def test_weights_safetensors_corrupt(ws, capsys, factories):
    weights = ws.root / "in" / "w.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    argv = compress_args(ws, "--remove", "1", "--torch-model", "sglp_test_factories:linear",
                         "--torch-weights", str(weights))
    run_main(ws, capsys, argv, says="safetensors")


# -- the same through the installed console script -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_args", "says"),
    [
        (lambda ws: ["compress", str(ws.root / "in" / "absent.onnx")], "not found"),
        (lambda ws: compress_args(ws, "--ratio", "1.5"), "--ratio must be in (0, 1)"),
        (lambda ws: ["compress", str(ws.model), "-o", str(ws.model), "--force"], "is the input model"),
        (lambda ws: compress_args(ws, "--criterion", "nope"), "unknown criterion"),
        (lambda ws: compress_args(ws, "--bogus-flag"), "no such option"),
    ],
    ids=["missing-model", "ratio", "output-is-input", "criterion", "unknown-option"],
)
def test_console_script(ws, make_args, says):
    before = snapshot(ws.root)
    done = subprocess.run([CLI, *make_args(ws)], capture_output=True, text=True, timeout=600,
                          cwd=ws.root, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.stdout == ""
    assert_refused(ws, done.returncode, done.stderr, before, says=says)
