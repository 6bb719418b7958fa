"""Big-model paths, exercised on small models by lowering the size thresholds:
weights streamed to a side file without touching the in-memory model,
sessions that map their weights from a temporary file, the checker above the
protobuf limit, and ONNX Runtime reading what was written."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import sglp_onnx.files.model_files as model_files
import sglp_onnx.graph.runtime as runtime
import sglp_onnx.surgery.validation as validation
from sglp_onnx.files.model_files import (DATA_ALIGNMENT, load_model, proto_size, save_model, saved_with_external_data,
                                         write_with_external_data)
from tiny_graphs import residual_mlp

WIDTH = 32  # 32 x 32 float32 weights are 4 KiB, above the 1 KiB external-data threshold


def outputs(source, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.fixture
def model() -> onnx.ModelProto:
    return residual_mlp(3, width=WIDTH)


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, WIDTH)).astype(np.float32)


def test_written_with_external_data_model_untouched_offsets_aligned(tmp_path, model, x):
    before = model.SerializeToString()
    write_with_external_data(model, tmp_path / "m.onnx", tmp_path / "weights.bin", location="weights.bin")
    assert model.SerializeToString() == before
    stub = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    external = [t for t in stub.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    # Six 4 KiB block weights go out; the 384-byte head stays inline.
    assert [t.name for t in external] == [f"blocks.{i}.{w}" for i in range(3) for w in ("w1", "w2")]
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        assert info["location"] == "weights.bin" and int(info["offset"]) % DATA_ALIGNMENT == 0
    reloaded = onnx.load(str(tmp_path / "m.onnx"))
    for a, b in zip(model.graph.initializer, reloaded.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    np.testing.assert_array_equal(outputs(str(tmp_path / "m.onnx"), x), outputs(before, x))


def test_small_tensors_stay_inline(tmp_path):
    small = residual_mlp(2, width=4)  # 64-byte weights
    write_with_external_data(small, tmp_path / "m.onnx", tmp_path / "m.onnx.data", location="m.onnx.data")
    stub = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in stub.graph.initializer)
    assert (tmp_path / "m.onnx.data").stat().st_size == 0


def test_save_model_with_external_data_records_the_final_name(tmp_path, model, x):
    save_model(model, tmp_path / "out.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    stub = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    assert {e.value for t in stub.graph.initializer for e in t.external_data if e.key == "location"} == \
        {"out.onnx.data"}
    np.testing.assert_array_equal(outputs(load_model(tmp_path / "out.onnx").SerializeToString(), x),
                                  outputs(model.SerializeToString(), x))


def test_temporary_copy_is_removed_and_model_kept(model):
    before = model.SerializeToString()
    with saved_with_external_data(model) as path:
        assert path.is_file() and path.with_name("model.onnx.data").is_file()
    assert not path.parent.exists()
    assert model.SerializeToString() == before


def test_sessions_of_big_models_read_a_mapped_file(monkeypatch, model, x):
    expected = outputs(model.SerializeToString(), x)
    monkeypatch.setattr(runtime, "SESSION_FILE_THRESHOLD", 0)
    before = model.SerializeToString()
    session = runtime.make_session(model)
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], expected)
    assert model.SerializeToString() == before


def test_checker_above_the_protobuf_limit_goes_through_a_file(monkeypatch, model):
    monkeypatch.setattr(model_files, "PROTOBUF_LIMIT", 0)
    validation.full_check(model)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[1] = "missing_weight"
    with pytest.raises(Exception):
        validation.full_check(broken)


def test_proto_size_is_the_serialised_size(model):
    assert proto_size(model) == len(model.SerializeToString())


def _saved_external(tmp_path, model: onnx.ModelProto, name: str = "big.onnx"):
    folder = tmp_path / "in"
    folder.mkdir()
    save_model(model, folder / name, external_data=True)
    return folder / name


def test_compress_leaves_large_external_weights_in_the_input_file(tmp_path, monkeypatch, x):
    """With external data, no large tensor is read into the process: sessions,
    the checker and the writer take it from the input's data file, and the
    output equals the one written from a fully loaded copy of the same model."""
    from sglp_onnx import compress

    monkeypatch.setattr(model_files, "DEFER_MIN_BYTES", 2048)  # the 4 KiB weights stay in the file
    model = residual_mlp(6, width=WIDTH)
    external = _saved_external(tmp_path, model)
    inline = tmp_path / "inline.onnx"
    onnx.save(model, str(inline))
    read = []
    original_load = onnx.external_data_helper.load_external_data_for_tensor
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_tensor",
                        lambda tensor, base_dir: (read.append(tensor.name), original_load(tensor, base_dir))[1])
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(1).standard_normal((24, WIDTH)).astype(np.float32))
    result = compress(external, tmp_path / "out.onnx", remove=2, criterion="damage", calib=calib)
    assert read == []
    # The input's weights (a repair map's weight is new: it is written with the output).
    weights = [t for t in result.pruned.graph.initializer if t.dims == [WIDTH, WIDTH]
               and not t.name.startswith("sglp_repair/")]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["big.onnx", "big.onnx.data"]
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_tensor", original_load)
    expected = compress(inline, tmp_path / "inline.pruned.onnx", remove=2, criterion="damage", calib=calib)
    assert result.selection.removed == expected.selection.removed
    written = load_model(tmp_path / "out.onnx")
    reference = load_model(tmp_path / "inline.pruned.onnx")
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in written.graph.initializer} == \
        {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in reference.graph.initializer}
    np.testing.assert_array_equal(outputs(str(tmp_path / "out.onnx"), x), outputs(str(tmp_path / "inline.pruned.onnx"), x))
    assert result.report["validation"]["runs"] and result.report["fidelity"] == expected.report["fidelity"]


def test_small_external_tensors_are_loaded_and_large_ones_referenced(tmp_path, monkeypatch):
    monkeypatch.setattr(model_files, "DEFER_MIN_BYTES", 2048)
    model = residual_mlp(2, width=WIDTH)
    path = _saved_external(tmp_path, model)
    loaded, files = model_files.load_model_files(path, defer=True)
    assert files == [path, path.with_name("big.onnx.data")]
    for tensor in loaded.graph.initializer:
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        assert external == (math.prod(tensor.dims) * 4 >= 2048), tensor.name  # float32 weights
    with model_files.external_data_folder(path.parent):
        for tensor, original in zip(loaded.graph.initializer, model.graph.initializer):
            np.testing.assert_array_equal(model_files.tensor_array(tensor), onnx.numpy_helper.to_array(original))


def test_a_reference_beyond_the_end_of_its_data_file_is_refused(tmp_path, monkeypatch):
    from sglp_onnx.errors import UserError

    monkeypatch.setattr(model_files, "DEFER_MIN_BYTES", 2048)
    path = _saved_external(tmp_path, residual_mlp(2, width=WIDTH))
    data = path.with_name("big.onnx.data")
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(UserError, match="external data"):
        model_files.load_model_files(path, defer=True)


def test_the_checker_reads_a_deferred_model_without_its_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_files, "DEFER_MIN_BYTES", 2048)
    loaded, _ = model_files.load_model_files(_saved_external(tmp_path, residual_mlp(2, width=WIDTH)), defer=True)
    validation.full_check(loaded)  # from any working directory: the data files are stood in for
    broken = onnx.ModelProto()
    broken.CopyFrom(loaded)
    broken.graph.node[0].input[1] = "missing_weight"
    with pytest.raises(Exception):
        validation.full_check(broken)


def _packs(session) -> bool:
    try:
        return session.get_session_options().get_session_config_entry("session.disable_prepacking") != "1"
    except RuntimeError:  # never set: ONNX Runtime's default, packed
        return True


def test_only_sessions_that_run_many_times_on_small_weights_pack_them(monkeypatch, model, x):
    """Measuring sessions run the samples once: no packed copy of the weights;
    `prepack=True` (what bench asks for, as a deployment runs) packs, and the
    gated runner packs below PREPACK_MAX_BYTES of weights."""
    from sglp_onnx.evidence.gated_runner import GatedRunner
    from sglp_onnx.units.discovery import find_units

    session = runtime.make_session(model)
    assert not _packs(session)
    np.testing.assert_allclose(session.run(None, {"input": x})[0], outputs(model.SerializeToString(), x), rtol=1e-6)
    assert _packs(runtime.make_session(model, prepack=True))
    units = find_units(model, granularity="layer")
    runner = GatedRunner(model, units, [model.graph.output[0].name])
    assert runner.prepack and _packs(runner.full._session)
    monkeypatch.setattr("sglp_onnx.evidence.gated_runner.PREPACK_MAX_BYTES", model_files.initializer_bytes(model) - 1)
    runner = GatedRunner(model, units, [model.graph.output[0].name])
    assert not runner.prepack and not _packs(runner.full._session)
