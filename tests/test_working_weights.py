"""A model that holds its weights in its own file is worked on from a
temporary side file (files/working_weights.py): the run's sessions map the
weights instead of copying them, the results equal a run from the proto,
what is written and returned holds its weights as the input did, and the
side file goes whatever ends the run. Small models cross the size thresholds
here because the thresholds are lowered."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import sglp_onnx.files.model_files as model_files
import sglp_onnx.files.working_weights as working_weights
import sglp_onnx.graph.runtime as runtime
from sglp_onnx import analyze, compress
from sglp_onnx.errors import UserError
from sglp_onnx.files.model_files import data_folder, external_tensors, load_model
from tiny_graphs import residual_mlp

WIDTH = 32  # 4 KiB weights


@pytest.fixture
def inline(tmp_path) -> tuple[Path, Path]:
    """A residual MLP holding its weights in its own file, and its calibration set."""
    path = tmp_path / "in" / "mlp.onnx"
    path.parent.mkdir()
    onnx.save(residual_mlp(6, width=WIDTH), str(path))
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(1).standard_normal((24, WIDTH)).astype(np.float32))
    return path, calib


@pytest.fixture
def temporary(tmp_path, monkeypatch) -> Path:
    """The temporary folder side files go to, watched by the test."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(working_weights.tempfile, "tempdir", str(folder))
    return folder


def spill_everything(monkeypatch) -> list[Path]:
    """Lower both thresholds so the 4 KiB weights go; returns the data folders sessions were opened in."""
    monkeypatch.setattr(working_weights, "SPILL_MIN_BYTES", 0)
    monkeypatch.setattr(working_weights, "SPILL_TENSOR_MIN_BYTES", 2048)
    folders = []
    make_session = runtime.make_session

    def watched(model, *args, **kwargs):
        if isinstance(model, onnx.ModelProto):
            folders.append((data_folder(), len(external_tensors(model))))
        return make_session(model, *args, **kwargs)

    monkeypatch.setattr(runtime, "make_session", watched)
    return folders


def test_sessions_map_the_spilled_weights_and_the_output_equals_a_run_from_the_proto(
        tmp_path, monkeypatch, inline, temporary):
    path, calib = inline
    expected = compress(path, tmp_path / "plain.onnx", remove=2, calib=calib)
    folders = spill_everything(monkeypatch)
    result = compress(path, tmp_path / "spilled.onnx", remove=2, calib=calib)
    # Every session of the run read the weights from the side file, not from its proto.
    spilled = {folder for folder, count in folders if count}
    assert len(spilled) == 1 and next(iter(spilled)).parent == temporary
    assert sum(1 for _, count in folders if count) >= 3
    assert list(temporary.iterdir()) == []  # gone with the run
    assert result.selection.removed == expected.selection.removed
    assert result.report["fidelity"] == expected.report["fidelity"]
    assert result.report["repair"] == expected.report["repair"]
    # Written and returned as the input came: one file, every weight in it.
    assert sorted(p.name for p in tmp_path.glob("spilled.onnx*")) == ["spilled.onnx"]
    for model in (result.pruned, result.model, onnx.load(str(tmp_path / "spilled.onnx"), load_external_data=False)):
        assert external_tensors(model) == []
    written, reference = load_model(tmp_path / "spilled.onnx"), load_model(tmp_path / "plain.onnx")
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in written.graph.initializer} == \
        {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in reference.graph.initializer}
    assert [n.SerializeToString() for n in written.graph.node] == [n.SerializeToString() for n in reference.graph.node]


def test_analyze_returns_models_that_hold_their_weights(monkeypatch, inline, temporary):
    path, calib = inline
    spill_everything(monkeypatch)
    analysis = analyze(path, remove=2, calib=calib)
    assert analysis.repair is not None and analysis.repair.model is not None
    for model in (analysis.model, analysis.repair.model):
        assert external_tensors(model) == []
    assert list(temporary.iterdir()) == []


def test_a_small_model_or_one_with_external_data_is_not_spilled(tmp_path, monkeypatch, inline, temporary):
    path, calib = inline
    folders = []
    make_session = runtime.make_session
    monkeypatch.setattr(runtime, "make_session", lambda model, *a, **k: (folders.append(data_folder()),
                                                                         make_session(model, *a, **k))[1])
    compress(path, tmp_path / "out.onnx", remove=2, calib=calib)  # 24 KiB of weights: under SPILL_MIN_BYTES
    assert set(folders) == {path.parent.resolve()}
    monkeypatch.setattr(working_weights, "SPILL_MIN_BYTES", 0)
    monkeypatch.setattr(model_files, "DEFER_MIN_BYTES", 2048)  # its 4 KiB weights stay in its data file
    external = tmp_path / "ext" / "mlp.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(str(path)), str(external), save_as_external_data=True, size_threshold=1024)
    folders.clear()
    compress(external, tmp_path / "ext.pruned.onnx", remove=2, calib=calib)
    assert set(folders) == {external.parent.resolve()}  # its own data files are read where they are


def test_the_side_file_goes_when_the_run_fails(monkeypatch, inline, temporary):
    path, calib = inline
    spill_everything(monkeypatch)
    seen = []

    def fail(*args, **kwargs):
        seen.extend(temporary.iterdir())
        raise UserError("stop here")

    monkeypatch.setattr("sglp_onnx.pipeline.discover", fail)
    with pytest.raises(UserError, match="stop here"):
        compress(path, path.with_name("out.onnx"), remove=2, calib=calib)
    assert len(seen) == 1 and seen[0].name.startswith("sglp-weights-")  # it was there
    assert list(temporary.iterdir()) == []
    assert not path.with_name("out.onnx").exists()


def test_a_side_file_that_cannot_be_written_leaves_the_run_on_the_proto(tmp_path, monkeypatch, inline):
    path, calib = inline
    expected = compress(path, tmp_path / "plain.onnx", remove=2, calib=calib)
    folders = spill_everything(monkeypatch)
    monkeypatch.setattr(working_weights.tempfile, "tempdir", str(tmp_path / "no such folder"))
    result = compress(path, tmp_path / "out.onnx", remove=2, calib=calib)
    assert all(count == 0 for _, count in folders)
    assert result.selection.removed == expected.selection.removed
    assert os.path.exists(tmp_path / "out.onnx")
