"""Exports at opsets before 17 spell LayerNorm out in element-wise ops.

A post-norm encoder (BERT) then ends each residual block with that
decomposed norm; it must still be one unit per layer, and removing layers
must give what transformers computes with those layers deleted. Pre-norm
models (GPT-2) keep their final norm out of the last layer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sglp_onnx.pipeline import compress

# The TorchScript exporter warns about every traced branch of the HF code.
pytestmark = pytest.mark.filterwarnings("ignore")
from tiny_transformers import CONFIGS, LAYERS, delete_layers, hf_logits, inputs_for, removed_layers, session


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_opset14_layers_are_units_and_match_transformers(arch, tmp_path):
    torch.manual_seed(0)
    model = CONFIGS[arch]().eval()
    feed = inputs_for(arch, 6, seed=1)
    path = tmp_path / f"{arch}14.onnx"
    example = tuple(torch.from_numpy(feed[k][:2]) for k in ("input_ids", "attention_mask"))
    dynamic = {k: {0: "batch", 1: "sequence"} for k in ("input_ids", "attention_mask")}
    torch.onnx.export(_Logits(model), example, str(path), dynamo=False, opset_version=14,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=dynamic)
    np.savez(tmp_path / f"{arch}14.calib.npz", **inputs_for(arch, 16, seed=2))

    result = compress(path, tmp_path / "out.onnx", remove=2, criterion="random", seed=3, repair="none")
    report = result.report
    assert len(report["units"]) == LAYERS
    assert all(u["sublayers"] == 2 for u in report["units"])
    removed = removed_layers(report)
    assert len(removed) == 2
    expected = hf_logits(delete_layers(model, removed), feed)
    got = session(tmp_path / "out.onnx").run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
