"""Valid input that the file system or the machine limits: sparse
initializers (valid ONNX that ONNX Runtime runs), output names near and over
the file system's limit, a batch size no machine holds. Through the real
CLI: a pruned model where the input is valid, else exit 2 and one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from sglp_onnx.cli import main
from sglp_onnx.files.model_files import name_max
from cli_runs import Workspace, run_main
from tiny_graphs import calibration, residual_mlp


def sparse_version(model: onnx.ModelProto, names: list[str], *, coordinates: bool = False) -> onnx.ModelProto:
    """`model` with the initializers `names` stored as sparse initializers
    (small entries zeroed first, in both models, so that they compute the same)."""
    sparse = onnx.ModelProto()
    sparse.CopyFrom(model)
    for name in names:
        (init,) = [i for i in sparse.graph.initializer if i.name == name]
        array = numpy_helper.to_array(init).copy()
        array[np.abs(array) < 0.2] = 0
        (dense,) = [i for i in model.graph.initializer if i.name == name]
        dense.CopyFrom(numpy_helper.from_array(array, name))
        sparse.graph.initializer.remove(init)
        nonzero = np.nonzero(array)
        flat = np.ravel_multi_index(nonzero, array.shape)
        indices = np.stack(nonzero, axis=1) if coordinates else flat
        sparse.graph.sparse_initializer.append(helper.make_sparse_tensor(
            numpy_helper.from_array(array.reshape(-1)[flat], name), numpy_helper.from_array(indices.astype(np.int64)),
            list(array.shape)))
    onnx.checker.check_model(sparse)  # (the full check's shape inference does not take sparse inputs)
    return sparse


def run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("coordinates", [False, True], ids=["linear", "coordinates"])
def test_sparse_initializers_are_pruned_like_dense_ones(tmp_path, capsys, coordinates):
    dense = residual_mlp()
    sparse = sparse_version(dense, ["blocks.1.w1", "blocks.2.w2", "head.w"], coordinates=coordinates)
    onnx.save_model(dense, str(tmp_path / "dense.onnx"))
    onnx.save_model(sparse, str(tmp_path / "sparse.onnx"))
    np.savez(tmp_path / "calib.npz", **calibration())
    x = calibration(5, seed=9)["input"]
    np.testing.assert_allclose(run(tmp_path / "sparse.onnx", x), run(tmp_path / "dense.onnx", x), rtol=1e-6)
    before = (tmp_path / "sparse.onnx").read_bytes()
    reports = {}
    for name in ("dense", "sparse"):
        capsys.readouterr()
        code = main(["-q", "compress", str(tmp_path / f"{name}.onnx"), "--calib", str(tmp_path / "calib.npz"),
                     "--remove", "2"])  # the default criterion
        assert code == 0, capsys.readouterr().err
        reports[name] = json.loads((tmp_path / f"{name}.pruned.json").read_text())
        assert reports[name]["validation"]["signature"]
    assert (tmp_path / "sparse.onnx").read_bytes() == before
    removed = [[u["removed"] for u in r["units"]] for r in reports.values()]
    assert removed[0] == removed[1]
    np.testing.assert_allclose(run(tmp_path / "sparse.pruned.onnx", x), run(tmp_path / "dense.pruned.onnx", x),
                               rtol=1e-6)
    for command in (["eval", "--data", str(tmp_path / "calib.npz")], ["bench", "--runs", "2"]):
        capsys.readouterr()
        assert main(["-q", command[0], str(tmp_path / "sparse.onnx"), *command[1:]]) == 0, capsys.readouterr().err


def test_an_output_name_longer_than_the_file_system_allows(ws, capsys):
    limit = name_max(ws.out)
    long = ws.out / ("x" * (limit + 10) + ".onnx")
    run_main(ws, capsys, ["compress", str(ws.model), "-o", str(long), "--remove", "1"], says="shorter name")
    run_main(ws, capsys, ["compress", str(ws.model), "-o", str(ws.output), "--report",
                          str(ws.out / ("r" * (limit + 1))), "--remove", "1"], says="shorter name")


def test_a_legal_name_at_the_limit_works(ws, capsys):
    limit = name_max(ws.out)
    name = "y" * (limit - len(".onnx") - 5) + ".onnx"  # its .json report and the temporary files fit too
    capsys.readouterr()
    code = main(["-q", "compress", str(ws.model), "-o", str(ws.out / name), "--remove", "1", "--plot",
                 str(ws.out / ("p" * (limit - 4) + ".png"))])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.suffix for p in ws.out.iterdir()) == [".json", ".onnx", ".png"]
    assert not list(ws.root.rglob(".*.tmp"))


def test_bench_batch_size_no_machine_holds(ws, capsys):
    run_main(ws, capsys, ["bench", str(ws.model), "--batch-size", "10000000000", "--runs", "1"],
             says="smaller --batch-size")


@pytest.mark.parametrize("command", ["compress", "bench"])
def test_a_thread_count_far_beyond_the_cores_is_refused(ws, capsys, command):
    """--threads 100000 started that many threads per session (minutes, then gigabytes) before failing."""
    argv = [command, str(ws.model), "--threads", "100000"]
    argv += ["-o", str(ws.output)] if command == "compress" else ["--runs", "1"]
    run_main(ws, capsys, argv, says="per core")


def test_an_output_whose_weights_file_name_is_too_long_is_refused_before_any_work(ws, capsys):
    """An input with external data gives an output with OUTPUT.data: its name must fit too."""
    folder = ws.root / "ext"
    folder.mkdir()
    onnx.save_model(residual_mlp(4, 8), str(folder / "m.onnx"), save_as_external_data=True, location="m.bin",
                    size_threshold=0)
    np.savez(folder / "m.calib.npz", **calibration())
    name = "z" * (name_max(ws.out) - len(".onnx")) + ".onnx"  # legal; name.data is not
    run_main(ws, capsys, ["compress", str(folder / "m.onnx"), "-o", str(ws.out / name), "--report",
                          str(ws.out / "r.json"), "--remove", "1"], says="weights file")
