"""Hugging Face vision models (random weights from tiny configs) through the
whole pipeline: the expected blocks are found, the output validates and
equals both an independent rewiring and the torch model with those blocks
replaced by nn.Identity(); GradNorm pairs with the HF model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import ResNetForImageClassification

import hf_factories
from graphs import EXPORTERS, discover, export, randomize, rewire, run, torch_out, with_identity
from sglp_onnx.pipeline import compress

N_CALIB = 8


def resnet_blocks(config) -> list[str]:
    """Bottleneck blocks with an identity shortcut: a stage's first block projects
    unless it keeps both the width and the resolution."""
    scopes = []
    for stage, (depth, width) in enumerate(zip(config.depths, config.hidden_sizes)):
        c_in = config.embedding_size if stage == 0 else config.hidden_sizes[stage - 1]
        stride = 2 if stage > 0 or config.downsample_in_first_stage else 1
        first = 0 if (c_in == width and stride == 1) else 1
        scopes += [f"resnet.encoder.stages.{stage}.layers.{j}" for j in range(first, depth)]
    return scopes


def mobilenet_v2_blocks(config) -> list[str]:
    """Inverted residuals with stride 1 and equal input/output channels (MobileNetV2 paper, Table 2:
    output channels per block and depthwise strides, scaled by the depth multiplier)."""
    base = [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
    strides = [2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]

    def scaled(c: int) -> int:
        div = config.depth_divisible_by
        value = round(c * config.depth_multiplier)
        rounded = max(config.min_depth, int(value + div / 2) // div * div)
        return rounded + div if rounded < 0.9 * value else rounded

    channels = [scaled(c) for c in base]
    return [f"mobilenet_v2.layer.{i}" for i in range(16) if strides[i] == 1 and channels[i] == channels[i + 1]]


def convnext_blocks(config) -> list[str]:
    """Every ConvNeXt layer is residual; downsampling is a separate module between stages."""
    return [f"convnext.encoder.stages.{s}.layers.{j}" for s, depth in enumerate(config.depths) for j in range(depth)]


def mobilevit_blocks(config) -> list[str]:
    """MobileViT: its stride-1 inverted residuals that keep the width (the first
    stage's one block, the second's blocks after the first), then every layer
    of the transformers of stages 3-5 (2, 4 and 3 layers in transformers'
    MobileViT), attention and MLP together."""
    neck = config.neck_hidden_sizes
    mv2 = (["mobilevit.encoder.layer.0.layer.0"] if neck[0] == neck[1] else []) + \
        [f"mobilevit.encoder.layer.1.layer.{j}" for j in (1, 2)]
    return mv2 + [f"mobilevit.encoder.layer.{s}.transformer.layer.{j}"
                  for s, depth in ((2, 2), (3, 4), (4, 3)) for j in range(depth)]


def vit_blocks(config) -> list[str]:
    """Every encoder layer (attention and MLP residuals together) is one unit."""
    return [f"vit.layers.{i}" for i in range(config.num_hidden_layers)]


MODELS = {
    "resnet": (hf_factories.resnet_config, resnet_blocks),
    "mobilenet_v2": (hf_factories.mobilenet_v2_config, mobilenet_v2_blocks),
    "convnext": (hf_factories.convnext_config, convnext_blocks),
    "mobilevit": (hf_factories.mobilevit_config, mobilevit_blocks),
    "vit": (hf_factories.vit_config, vit_blocks),
}
EXPECTED_COUNTS = {"resnet": 3, "mobilenet_v2": 10, "convnext": 5, "mobilevit": 12, "vit": 3}


def test_expected_block_counts_follow_from_the_configs():
    for name, (config, blocks) in MODELS.items():
        assert len(blocks(config())) == EXPECTED_COUNTS[name]


_CACHE: dict = {}


def _staged(name: str, exporter: str, tmp_path_factory):
    """Random-weight model, its export, a calibration file and its state_dict (cached per session)."""
    key = (name, exporter)
    if key not in _CACHE:
        torch.manual_seed(0)
        model = randomize(getattr(hf_factories, name)(), seed=0)
        folder = tmp_path_factory.mktemp(f"{name}-{exporter}")
        rng = np.random.default_rng(0)
        x = rng.standard_normal((N_CALIB, 3, hf_factories.IMAGE_SIZE, hf_factories.IMAGE_SIZE)).astype(np.float32)
        np.savez(folder / "calib.npz", pixel_values=x, labels=rng.integers(0, hf_factories.NUM_LABELS, N_CALIB))
        export(model, x[:2], folder / "model.onnx", exporter, input_names=("pixel_values",))
        torch.save(model.state_dict(), folder / "weights.pt")
        _CACHE[key] = (model, folder)
    return _CACHE[key]


CASES = [(name, exporter) for name in MODELS for exporter in EXPORTERS]
# MobileNetV2's and MobileViT's dynamo exports (10 s each on 2 cores) run with the slow tests; their legacy
# exports always run.
SLOW = {("mobilenet_v2", "dynamo"), ("mobilevit", "dynamo")}


@pytest.mark.parametrize(("name", "exporter"), [
    pytest.param(n, e, marks=[pytest.mark.slow] if (n, e) in SLOW else [], id=f"{n}-{e}") for n, e in CASES])
def test_hf_model_prunes_to_the_independent_rewiring(tmp_path_factory, name, exporter):
    model, folder = _staged(name, exporter, tmp_path_factory)
    config, blocks = MODELS[name]
    out = folder / "pruned.onnx"
    result = compress(folder / "model.onnx", out, calib=folder / "calib.npz", remove=2, force=True, repair="none")
    report = result.report
    assert [u["scope"] for u in report["units"]] == blocks(config())
    assert all(report["validation"][k] for k in ("checker", "runs", "signature", "finite", "opset_ir_kept"))
    removed = [u for u in report["units"] if u["removed"]]
    assert len(removed) == 2

    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    original = onnx.load(str(folder / "model.onnx"))
    assert pruned.ir_version == original.ir_version
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    got = run(pruned, x)[0]
    np.testing.assert_array_equal(got, run(rewire(original, [(u["entry"], u["exit"]) for u in removed]), x)[0])
    expected = torch_out(with_identity(model, [u["scope"] for u in removed]), x)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert json.loads((folder / "pruned.json").read_text())["units"] == report["units"]


# Pairing reads torch module outputs, not the graph: one exporter per model,
# plus dynamo for one CNN and the transformer.
PAIRING_CASES = [(name, "legacy") for name in MODELS] + [("resnet", "dynamo"), ("vit", "dynamo")]


@pytest.mark.parametrize(("name", "exporter"), PAIRING_CASES, ids=[f"{n}-{e}" for n, e in PAIRING_CASES])
def test_hf_model_pairs_with_its_factory_for_gradnorm(tmp_path_factory, name, exporter):
    _, folder = _staged(name, exporter, tmp_path_factory)
    config, blocks = MODELS[name]
    result = compress(folder / "model.onnx", folder / "gradnorm.onnx", calib=folder / "calib.npz", remove=2,
                      criterion="sglp", force=True, torch_model=f"hf_factories:{name}", torch_weights=folder / "weights.pt")
    report = result.report
    assert report["importance_kind"] == "GradNorm"
    assert [u["modules"] for u in report["pairing"]["units"]] == [[s] for s in blocks(config())]
    assert report["pairing"]["output_relative_error"] < 1e-4
    assert all(np.isfinite(u["importance"]) and u["importance"] > 0 for u in report["units"])
    assert sum(u["removed"] for u in report["units"]) == 2


def test_resnet_first_block_without_projection_is_a_unit(tmp_path):
    # Stem width equal to the first stage's width and no downsampling there:
    # the first block's shortcut is the identity, so it is a unit too.
    config = hf_factories.resnet_config()
    config.embedding_size = config.hidden_sizes[0]
    torch.manual_seed(0)
    model = randomize(ResNetForImageClassification(config), seed=1)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    onnx_model = export(model, x, tmp_path / "m.onnx", "legacy", input_names=("pixel_values",))
    units = discover(onnx_model, {"pixel_values": x})
    assert [u.scope for u in units] == resnet_blocks(config)
    assert len(units) == EXPECTED_COUNTS["resnet"] + 1
