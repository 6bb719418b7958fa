"""The example CIFAR-style ResNets: architecture facts and the committed digits model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.digits_data import load_split
from models.resnet_cifar import BasicBlock, ResNetCIFAR, resnet20, resnet56_digits, resnet110_digits
from models.train_digits import SECTION_BEGIN, SECTION_END, update_readme

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

# Hand count for ResNet-20, 3 input channels, 10 classes (convs have no bias,
# each BN has weight + bias = 2C parameters; running stats are buffers):
#   stem      conv 3->16: 3*16*9 = 432, BN 32                          =     464
#   stage 1   3 blocks x (2 x 16*16*9 + 2 x 32) = 3 x 4,672            =  14,016
#   stage 2   first: 16*32*9 + 32*32*9 + 2*64 + proj 16*32 + 64 = 14,528
#             two more: 2 x (2 x 32*32*9 + 2*64) = 2 x 18,560          =  51,648
#   stage 3   first: 32*64*9 + 64*64*9 + 2*128 + proj 32*64 + 128 = 57,728
#             two more: 2 x (2 x 64*64*9 + 2*128) = 2 x 73,984         = 205,696
#   head      64*10 + 10                                               =     650
#   total                                                              = 272,474
RESNET20_PARAMS = 464 + 14_016 + 51_648 + 205_696 + 650


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_parameter_count_matches_hand_count():
    assert RESNET20_PARAMS == 272_474
    assert count_params(resnet20()) == RESNET20_PARAMS


@pytest.mark.parametrize("depth, per_stage", [(20, 3), (32, 5), (44, 7), (56, 9), (110, 18)])
def test_blocks_per_stage_and_projection_only_at_stage_transitions(depth, per_stage):
    model = ResNetCIFAR(depth)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [per_stage] * 3
    blocks = model.blocks()
    assert len(blocks) == 3 * per_stage and all(isinstance(b, BasicBlock) for b in blocks)
    projections = [i for i, block in enumerate(blocks) if block.has_projection]
    assert projections == [per_stage, 2 * per_stage]
    # 6n+2 weighted layers: stem, two convs per block, the head (projections not counted).
    convs_in_main_path = 1 + 2 * len(blocks)
    assert convs_in_main_path + 1 == depth


@pytest.mark.parametrize("depth", [7, 21, 2])
def test_invalid_depth_is_refused(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNetCIFAR(depth)


@pytest.mark.parametrize("factory", [resnet56_digits, resnet110_digits])
def test_digits_factories_shapes(factory):
    model = factory().eval()
    (example,) = model.example_inputs()
    assert example.shape == (1, 1, 8, 8)
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert resnet20().example_inputs()[0].shape == (1, 3, 32, 32)


def readme_accuracy(artifact: str) -> float:
    text = (MODELS_DIR / "README.md").read_text()
    for line in text.splitlines():
        if line.startswith(f"| `{artifact}` |"):
            return float(re.findall(r"(\d+(?:\.\d+)?)%", line)[-1])
    raise AssertionError(f"no README row for {artifact}")


def test_committed_resnet56_onnx_reaches_readme_accuracy():
    path = MODELS_DIR / "resnet56_digits.onnx"
    with np.load(MODELS_DIR / "digits.test.npz") as data:
        images, labels = data["input"], data["labels"]
    assert images.shape[1:] == (1, 8, 8) and images.dtype == np.float32 and labels.dtype == np.int64
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": images})
    measured = 100 * float((logits.argmax(1) == labels).mean())
    stated = readme_accuracy("resnet56_digits.onnx")
    assert abs(measured - stated) <= 0.5
    assert stated >= 90.0


def test_committed_resnet56_weights_match_onnx():
    model = resnet56_digits()
    model.load_state_dict(torch.load(MODELS_DIR / "resnet56_digits.pt", map_location="cpu", weights_only=True))
    model.eval()
    with np.load(MODELS_DIR / "resnet56_digits.calib.npz") as data:
        images = data["input"][:32]
    session = ort.InferenceSession(str(MODELS_DIR / "resnet56_digits.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": images})
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_digits_split_is_fixed_stratified_and_standardised_on_train():
    split = load_split()
    assert split.train_x.shape == (1347, 1, 8, 8) and split.test_x.shape == (450, 1, 8, 8)
    assert split.train_x.dtype == np.float32 and split.train_y.dtype == np.int64
    assert abs(float(split.train_x.mean())) < 1e-5 and abs(float(split.train_x.std()) - 1) < 1e-5
    # Stratified: every class keeps (to within one image) its share in the test split.
    train_counts, test_counts = np.bincount(split.train_y), np.bincount(split.test_y)
    assert np.all(np.abs(test_counts - (train_counts + test_counts) * 0.25) <= 1)
    assert np.array_equal(load_split().test_x, split.test_x)


def test_readme_update_keeps_other_sections_and_rows(tmp_path):
    readme = tmp_path / "README.md"
    other = "## another model\n\n| file | what |\n|---|---|\n| `other.onnx` | not ours |\n"
    readme.write_text(other)
    result = dict(depth=56, epochs=1, seed=0, train_seconds=1.0, test_accuracy=0.5, onnx_test_accuracy=0.5, test_samples=450)
    update_readme(readme, result)
    update_readme(readme, dict(result, depth=110, test_accuracy=0.25, onnx_test_accuracy=0.25))
    text = readme.read_text()
    assert other in text and text.count(SECTION_BEGIN) == 1 and text.count(SECTION_END) == 1
    ours = text.split(SECTION_BEGIN)[1].split(SECTION_END)[0]
    assert "| `resnet56_digits.onnx` |" in ours and "| `resnet110_digits.onnx` |" in ours
    assert "`other.onnx`" not in ours
    update_readme(readme, result)
    assert readme.read_text() == text
