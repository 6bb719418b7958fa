"""The synthetic radio generator, the residual 1-D CNN and its committed artifacts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from models.cnn1d import ResNet1d, cnn1d_radio
from models.radio_signals import CLASSES, FRAME_LEN, make_dataset, raised_cosine

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
ONNX_PATH = MODELS_DIR / "cnn1d_radio.onnx"
WEIGHTS_PATH = MODELS_DIR / "cnn1d_radio.pt"
CALIB_PATH = MODELS_DIR / "cnn1d_radio.calib.npz"
TEST_PATH = MODELS_DIR / "radio.test.npz"
README_PATH = MODELS_DIR / "README.md"


@pytest.fixture(scope="module")
def small_set():
    return make_dataset(20, snr_db=(-6.0, 18.0), seed=5)


def test_same_seed_gives_identical_arrays(small_set):
    again = make_dataset(20, snr_db=(-6.0, 18.0), seed=5)
    for a, b in zip(small_set, again):
        np.testing.assert_array_equal(a, b)


def test_different_seed_gives_different_frames(small_set):
    other = make_dataset(20, snr_db=(-6.0, 18.0), seed=6)
    assert not np.array_equal(small_set[0], other[0])
    assert not np.array_equal(small_set[1], other[1])


def test_shapes_dtypes_and_class_balance(small_set):
    x, y, snr = small_set
    n = 20 * len(CLASSES)
    assert x.shape == (n, 2, FRAME_LEN) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int64
    assert snr.shape == (n,) and snr.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(y, minlength=len(CLASSES)), np.full(len(CLASSES), 20))
    # Shuffled: labels are not in class blocks.
    assert not np.array_equal(y, np.sort(y))
    assert np.isfinite(x).all()


def test_every_frame_has_unit_average_power(small_set):
    power = (small_set[0].astype(np.float64) ** 2).sum(axis=1).mean(axis=1)
    np.testing.assert_allclose(power, 1.0, atol=1e-5)


@pytest.mark.parametrize("snr_db", [(-6.0, 18.0), (0.0, 4.0), (10.0, 10.0)])
def test_snr_is_whole_db_within_range(snr_db):
    _, _, snr = make_dataset(30, snr_db=snr_db, seed=1)
    assert snr.min() >= snr_db[0] and snr.max() <= snr_db[1]
    np.testing.assert_array_equal(snr, np.round(snr))


def test_empty_snr_range_is_refused():
    with pytest.raises(ValueError, match="empty"):
        make_dataset(2, snr_db=(5.0, 0.0), seed=0)


def test_constant_envelope_classes_have_constant_envelope_without_noise():
    x, y, _ = make_dataset(10, snr_db=(80.0, 80.0), seed=3)
    envelope = np.hypot(x[:, 0], x[:, 1])
    for name in ("GFSK", "CPFSK", "WBFM"):
        frames = envelope[y == CLASSES.index(name)]
        np.testing.assert_allclose(frames, 1.0, atol=1e-3, err_msg=name)
    # Linear modulations with pulse shaping do not have a constant envelope.
    assert envelope[y == CLASSES.index("QAM16")].std(axis=1).min() > 0.1


def test_raised_cosine_is_a_nyquist_pulse():
    t = np.arange(-6, 7, dtype=float)
    for rolloff in (0.25, 0.35, 0.5):
        expected = (t == 0).astype(float)
        np.testing.assert_allclose(raised_cosine(t, rolloff), expected, atol=1e-12)
        # Continuous across the removable singularity at |t| = 1/(2 rolloff).
        edge = 1.0 / (2.0 * rolloff)
        values = raised_cosine(np.array([edge - 1e-6, edge, edge + 1e-6]), rolloff)
        assert np.isfinite(values).all()
        assert np.ptp(values) < 1e-5


def test_committed_architecture_has_16_identity_blocks():
    model = cnn1d_radio()
    assert len(model.residual_blocks()) == 18
    assert len(model.identity_blocks()) == 16
    # The two stage transitions are the projection blocks.
    projections = [b for b in model.residual_blocks() if not b.is_identity]
    assert [b.conv1.stride[0] for b in projections] == [2, 2]
    (example,) = model.example_inputs()
    assert example.shape == (1, 2, FRAME_LEN)
    assert model.eval()(example).shape == (1, len(CLASSES))


def test_identity_blocks_keep_their_input_shape():
    model = ResNet1d(num_classes=4, widths=(4, 8), blocks_per_stage=3).eval()
    shapes = []

    def record(module, inputs, output):
        shapes.append((inputs[0].shape, output.shape))

    hooks = [b.register_forward_hook(record) for b in model.identity_blocks()]
    model(torch.zeros(2, 2, FRAME_LEN))
    for hook in hooks:
        hook.remove()
    assert len(shapes) == 5  # 3 in the first stage, 2 after the projection in the second
    assert all(inp == out for inp, out in shapes)


def _readme_onnx_accuracy() -> float:
    text = README_PATH.read_text()
    section = text[text.index("cnn1d_radio"):]
    match = re.search(r"onnx\s+test accuracy: overall ([0-9.]+)%", section)
    assert match, "models/README.md has no 'onnx test accuracy: overall X%' line for cnn1d_radio"
    return float(match.group(1))


def test_committed_onnx_model_reaches_readme_accuracy():
    import onnxruntime as ort

    data = np.load(TEST_PATH)
    session = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    logits = np.concatenate([session.run(None, {"input": data["input"][s : s + 1000]})[0]
                             for s in range(0, len(data["input"]), 1000)])
    accuracy = 100.0 * float((logits.argmax(1) == data["labels"]).mean())
    assert abs(accuracy - _readme_onnx_accuracy()) <= 0.5


def test_committed_weights_pair_with_the_onnx_model():
    import onnxruntime as ort

    calib = np.load(CALIB_PATH)
    assert calib["input"].shape == (256, 2, FRAME_LEN) and calib["input"].dtype == np.float32
    assert calib["labels"].dtype == np.int64 and set(np.unique(calib["labels"])) <= set(range(len(CLASSES)))
    model = cnn1d_radio()
    model.load_state_dict(torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True))
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(calib["input"])).numpy()
    session = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": calib["input"]})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
