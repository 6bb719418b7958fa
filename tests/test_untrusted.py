"""Untrusted files: external data that escapes the model's folder, pickles
with code in them, and user strings that must never be evaluated."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import external_data_helper

from sglp_onnx.cli import main
from sglp_onnx.errors import UserError
from sglp_onnx.tools.export.torch_export import load_torch_model
from sglp_onnx.files.model_files import check_external_data_paths, load_model
from cli_runs import snapshot
from tiny_graphs import calibration, residual_mlp

PACKAGE = Path(__file__).resolve().parents[1] / "sglp_onnx"


# -- ONNX external data -------------------------------------------------------------------------------------------


def _model_with_external_data(folder: Path, location: str = "weights.bin") -> Path:
    """A width-32 residual model whose weights live in `folder/location`."""
    folder.mkdir(parents=True, exist_ok=True)
    model = residual_mlp(width=32)
    path = folder / "model.onnx"
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    np.savez(folder / "model.calib.npz", **calibration(width=32))
    return path


def _point_external_data_at(model_path: Path, location: str) -> None:
    """Rewrite every external-data location in the model file (weights stay where they were)."""
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the model's folder that must never be opened."""
    path = tmp_path / "elsewhere" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(os.urandom(1 << 16))
    return path


@pytest.fixture
def no_external_reads(monkeypatch):
    """Fail the test if onnx is asked to read any external data."""

    def forbidden(*args, **kwargs):
        raise AssertionError("external data was read before the locations were checked")

    monkeypatch.setattr(onnx, "load_external_data_for_model", forbidden)
    monkeypatch.setattr(external_data_helper, "load_external_data_for_model", forbidden)
    monkeypatch.setattr(external_data_helper, "load_external_data_for_tensor", forbidden)


def _absolute(model_dir: Path, secret: Path) -> str:
    return str(secret)


def _dot_dot(model_dir: Path, secret: Path) -> str:
    return os.path.relpath(secret, model_dir)


def _symlink(model_dir: Path, secret: Path) -> str:
    (model_dir / "link.bin").symlink_to(secret)
    return "link.bin"


def _symlinked_folder(model_dir: Path, secret: Path) -> str:
    (model_dir / "sub").symlink_to(secret.parent, target_is_directory=True)
    return f"sub/{secret.name}"


ESCAPES = [_absolute, _dot_dot, _symlink, _symlinked_folder]
ESCAPE_IDS = ["absolute", "dot-dot", "symlink", "symlinked-folder"]


@pytest.mark.parametrize("escape", ESCAPES, ids=ESCAPE_IDS)
def test_escaping_external_data_is_refused_before_reading(tmp_path, secret, no_external_reads, escape):
    model_path = _model_with_external_data(tmp_path / "model")
    _point_external_data_at(model_path, escape(model_path.parent, secret))
    with pytest.raises(UserError, match="outside the model's folder"):
        load_model(model_path)
    proto = onnx.load(str(model_path), load_external_data=False)
    with pytest.raises(UserError, match="refusing to read it"):
        check_external_data_paths(proto, model_path.parent)


@pytest.mark.parametrize("escape", ESCAPES, ids=ESCAPE_IDS)
def test_escaping_external_data_through_the_cli(tmp_path, capsys, secret, escape):
    model_path = _model_with_external_data(tmp_path / "model")
    _point_external_data_at(model_path, escape(model_path.parent, secret))
    before = snapshot(tmp_path)
    code = main(["compress", str(model_path), "--ratio", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: external data location") and "refusing" in err, err
    assert len(err.splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_external_data_inside_the_folder_is_read(tmp_path, capsys):
    model_path = _model_with_external_data(tmp_path / "model", location="data/weights.bin")
    model = load_model(model_path)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert main(["-q", "compress", str(model_path), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5"]) == 0


def test_symlink_inside_the_folder_is_a_clear_error(tmp_path, capsys):
    # onnx itself refuses every symbolic link for external data; the user still gets one line and exit 2.
    model_path = _model_with_external_data(tmp_path / "model")
    (model_path.parent / "alias.bin").symlink_to(model_path.parent / "weights.bin")
    _point_external_data_at(model_path, "alias.bin")
    code = main(["compress", str(model_path), "--ratio", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "symbolic link" in err, err


def test_missing_external_data_file(tmp_path, capsys):
    model_path = _model_with_external_data(tmp_path / "model")
    (model_path.parent / "weights.bin").unlink()
    code = main(["compress", str(model_path), "--ratio", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "missing" in err, err


# -- pickles ------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs os.mkdir(marker): a stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


FACTORY = "import torch\n\ndef linear():\n    return torch.nn.Linear(8, 3)\n"


@pytest.fixture
def factory(tmp_path_factory, monkeypatch) -> str:
    folder = tmp_path_factory.mktemp("factory")
    (folder / "sglp_untrusted_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(folder))
    return "sglp_untrusted_factory:linear"


def _torch_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"weight": torch.zeros(3, 8), "bias": _Payload(marker)}, path)


def _raw_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload(marker)}, f, protocol=2)


@pytest.mark.parametrize("write", [_torch_checkpoint, _raw_pickle], ids=["torch.save", "pickle"])
def test_weights_with_a_code_payload_never_run(tmp_path, capsys, factory, write):
    marker = tmp_path / "payload-ran"
    weights = tmp_path / "evil.pt"
    write(weights, marker)
    # The payload is live: a plain unpickle would run it.
    with open(weights, "rb") as f:
        if weights.read_bytes()[:2] == b"PK":
            torch.load(f, weights_only=False)
        else:
            pickle.load(f)
    assert marker.is_dir()
    marker.rmdir()

    with pytest.raises(UserError, match="refusing to load"):
        load_torch_model(factory, weights)
    assert not marker.exists()

    model, calib = tmp_path / "m.onnx", tmp_path / "m.calib.npz"
    onnx.save_model(residual_mlp(), str(model))
    np.savez(calib, **calibration())
    code = main(["compress", str(model), "--remove", "1", "--torch-model", factory, "--torch-weights", str(weights)])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to load" in err and "safetensors" in err, err
    assert not marker.exists()


def test_calibration_with_a_pickled_payload_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    calib = tmp_path / "m.calib.npz"
    np.savez(calib, input=np.array([_Payload(marker)], dtype=object))
    model = tmp_path / "m.onnx"
    onnx.save_model(residual_mlp(), str(model))
    code = main(["compress", str(model), "--ratio", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "pickled" in err, err
    assert not marker.exists()


def test_safetensors_weights_are_loaded(tmp_path, factory):
    from safetensors.torch import save_file

    reference = torch.nn.Linear(8, 3)
    weights = tmp_path / "w.safetensors"
    save_file(reference.state_dict(), str(weights))
    model = load_torch_model(factory, weights)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)
    assert not model.training


def test_safetensors_weights_of_the_radio_model_pair_and_rank(tmp_path):
    # The committed .pt converted to .safetensors gives the same GradNorm ranking as the .pt.
    from safetensors.torch import save_file

    root = Path(__file__).resolve().parents[1]
    state = torch.load(root / "models" / "cnn1d_radio.pt", map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    weights = tmp_path / "radio.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    full = np.load(root / "models" / "cnn1d_radio.calib.npz")
    calib = tmp_path / "c.npz"
    np.savez(calib, input=full["input"][:12], labels=full["labels"][:12])
    out = tmp_path / "out.onnx"
    code = main(["-q", "compress", str(root / "models" / "cnn1d_radio.onnx"), "-o", str(out), "--calib", str(calib),
                 "--remove", "3", "--criterion", "sglp", "--torch-model", "models.cnn1d:cnn1d_radio", "--torch-weights", str(weights)])
    assert code == 0
    import json

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["importance_kind"] == "GradNorm"
    assert sum(u["removed"] for u in report["units"]) == 3


# -- user strings are names, never code ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "os:system('mkdir {marker}')",
        "__import__('os').system('mkdir {marker}'):x",
        "os:mkdir",  # callable, but only ever called with no arguments
    ],
)
def test_factory_specs_are_not_evaluated(tmp_path, capsys, monkeypatch, spec):
    marker = tmp_path / "spec-ran"
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.onnx"
    onnx.save_model(residual_mlp(), str(model))
    np.savez(tmp_path / "m.calib.npz", **calibration())
    code = main(["compress", str(model), "--remove", "1", "--torch-model", spec.format(marker=marker)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: "), err
    assert not marker.exists()


def test_criterion_names_are_looked_up_not_evaluated(tmp_path, capsys):
    marker = tmp_path / "criterion-ran"
    model = tmp_path / "m.onnx"
    onnx.save_model(residual_mlp(), str(model))
    code = main(["compress", str(model), "--ratio", "0.5", "--criterion", f"__import__('os').mkdir('{marker}')"])
    assert code == 2 and "unknown criterion" in capsys.readouterr().err
    assert not marker.exists()


# The one static guard: the package never evaluates strings or unpickles freely.
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_package_source_has_no_eval_exec_or_unsafe_loads():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree):
            func = call.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno}"
            if isinstance(func, ast.Name) and name in FORBIDDEN_CALLS:
                problems.append(f"{where} calls {name}()")
            if name in {"load", "loads"} and isinstance(func, ast.Attribute) and \
                    isinstance(func.value, ast.Name) and func.value.id in {"pickle", "cPickle", "dill", "yaml"}:
                problems.append(f"{where} calls {func.value.id}.{name}()")
            for kw in call.keywords:
                unsafe = (kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is False) \
                    or (kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False)) \
                    or (kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False))
                if unsafe:
                    problems.append(f"{where} passes {kw.arg}={ast.unparse(kw.value)}")
            if name == "load" and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and func.value.id == "torch" and not any(k.arg == "weights_only" for k in call.keywords):
                problems.append(f"{where} calls torch.load without weights_only=True")
    assert not problems, "\n".join(problems)
