"""GradNorm on the paired torch model, checked by hand and against an
independent autograd computation; pairing and its refusals; the task loss."""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from graphs import LinearBlock, ResidualMLP, discover, export, exported, residual_mlp, seeded
from sglp_onnx.errors import UserError
from sglp_onnx.paired.gradnorm import gradnorm, pair_units, task_loss
from sglp_onnx.pipeline import analyze
from sglp_onnx.evidence.activations import probe


def _pair(torch_model, onnx_model, units, x):
    feed = {"input": x}
    names = [t for u in units for t in (u.entry, u.exit)]
    values = probe(onnx_model, feed, names)
    outputs = [values[o.name] for o in onnx_model.graph.output]
    return pair_units(torch_model, units, feed, values, outputs, ["input"], {})


def _batches(x, labels, size):
    for start in range(0, len(x), size):
        yield {"input": x[start:start + size]}, None if labels is None else labels[start:start + size]


class LinearResidual(nn.Module):
    """x + W x (no bias, no activation)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return x + self.fc(x)


class TwoBlockLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(LinearResidual(3), LinearResidual(3))
        self.head = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.head(self.blocks(x))


@pytest.fixture(scope="module")
def two_block(tmp_path_factory):
    model = TwoBlockLinear().eval()
    with torch.no_grad():
        model.blocks[0].fc.weight.copy_(torch.tensor([[0.5, -1.0, 0.0], [0.25, 0.0, 1.0], [0.0, 0.5, -0.5]]))
        model.blocks[1].fc.weight.copy_(torch.tensor([[-0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, -1.0, 0.25]]))
        model.head.weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [-0.5, 1.0, 1.0]]))
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    onnx_model = export(model, x[:2], tmp_path_factory.mktemp("two_block") / "m.onnx", "legacy")
    return model, onnx_model, x


def _hand_gradnorm(model: TwoBlockLinear, x: np.ndarray, labels: np.ndarray | None) -> list[float]:
    """||dL/dW_k||_F / N for L = sum of cross-entropies, written out for row vectors.

    a1 = x (I + W1^T), a2 = a1 (I + W2^T), z = a2 H^T, dL/dz = softmax(z) - onehot(y):
    dL/dW2 = (dL/dz H)^T a1 and dL/dW1 = (dL/dz H (I + W2))^T x.
    """
    w1, w2 = (model.blocks[k].fc.weight.detach().double().numpy() for k in (0, 1))
    h = model.head.weight.detach().double().numpy()
    x = x.astype(np.float64)
    eye = np.eye(3)
    a1 = x @ (eye + w1.T)
    a2 = a1 @ (eye + w2.T)
    z = a2 @ h.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = z.argmax(1) if labels is None else labels
    dz = p - np.eye(2)[y]
    da2 = dz @ h
    da1 = da2 @ (eye + w2)
    g2, g1 = da2.T @ a1, da1.T @ x
    return [float(np.linalg.norm(g1)) / len(x), float(np.linalg.norm(g2)) / len(x)]


@pytest.mark.parametrize("with_labels", [True, False])
def test_gradnorm_equals_the_hand_computed_gradient_norm(two_block, with_labels):
    model, onnx_model, x = two_block
    units = discover(onnx_model, x[:2])
    assert [u.scope for u in units] == ["blocks.0", "blocks.1"]
    pairing = _pair(copy.deepcopy(model), onnx_model, units, x[:4])
    assert pairing.modules == [["blocks.0"], ["blocks.1"]]
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1]) if with_labels else None
    # Gradients accumulate over uneven batches (4, 4, 2).
    scores = gradnorm(copy.deepcopy(model), pairing, _batches(x, labels, 4), ["input"])
    np.testing.assert_allclose(scores, _hand_gradnorm(model, x, labels), rtol=1e-5)


def test_gradnorm_matches_independent_autograd_on_a_relu_mlp(tmp_path):
    torch_model, path = exported("mlp", "legacy")
    onnx_model = onnx.load(str(path))
    x = np.random.default_rng(1).standard_normal((12, 5)).astype(np.float32)
    labels = np.arange(12) % 3
    units = discover(onnx_model, x[:2])
    pairing = _pair(copy.deepcopy(torch_model), onnx_model, units, x[:6])
    assert pairing.modules == [["blocks.0"], ["blocks.1"], ["blocks.2"]]
    assert max(pairing.max_error) < 1e-5
    scores = gradnorm(copy.deepcopy(torch_model), pairing, _batches(x, labels, 5), ["input"])

    reference = copy.deepcopy(torch_model)
    loss = nn.functional.cross_entropy(reference(torch.from_numpy(x)), torch.from_numpy(labels), reduction="mean")
    expected = []
    for block in reference.blocks:
        grads = torch.autograd.grad(loss, list(block.parameters()), retain_graph=True)
        expected.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)))
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    # The model is left as it was: eval mode, no stale gradients.
    assert not torch_model.training and all(p.grad is None for p in torch_model.parameters())


@pytest.fixture(scope="module")
def zeroed(tmp_path_factory):
    """ResidualMLP whose block 1 branch ends in an all-zero Linear: its exit equals its entry."""
    model = residual_mlp()
    with torch.no_grad():
        model.blocks[1].fc2.weight.zero_()
        model.blocks[1].fc2.bias.zero_()
    folder = tmp_path_factory.mktemp("zeroed")
    x = np.random.default_rng(2).standard_normal((24, 5)).astype(np.float32)
    export(model, x[:2], folder / "m.onnx", "legacy")
    np.savez(folder / "m.calib.npz", input=x, labels=np.arange(24) % 3)
    torch.save(model.state_dict(), folder / "w.pt")
    return model, folder


def test_zeroed_block_gets_the_lowest_gradient_free_importance(zeroed):
    _, folder = zeroed
    result = analyze(folder / "m.onnx", calib=folder / "m.calib.npz", remove=1, criterion="sglp")
    report = result.report
    assert [u["scope"] for u in report["units"]] == ["blocks.0", "blocks.1", "blocks.2"]
    importance = [u["importance"] for u in report["units"]]
    assert int(np.argmin(importance)) == 1 and abs(importance[1]) < 1e-5
    assert min(importance[0], importance[2]) > 1e-3
    assert [u["removed"] for u in report["units"]] == [False, True, False]
    assert report["importance_kind"].startswith("1 - CKA")


def test_zeroed_block_still_pairs_with_its_module(zeroed):
    _, folder = zeroed
    result = analyze(folder / "m.onnx", calib=folder / "m.calib.npz", remove=1, criterion="sglp",
                     torch_model="graphs:residual_mlp", torch_weights=folder / "w.pt")
    report = result.report
    assert report["importance_kind"] == "GradNorm"
    assert [u["modules"] for u in report["pairing"]["units"]] == [["blocks.0"], ["blocks.1"], ["blocks.2"]]
    assert all(np.isfinite(u["importance"]) and u["importance"] > 0 for u in report["units"])


def test_pairing_refuses_a_model_with_other_weights():
    torch_model, path = exported("mlp", "legacy")
    onnx_model = onnx.load(str(path))
    x = np.random.default_rng(3).standard_normal((4, 5)).astype(np.float32)
    units = discover(onnx_model, x)
    with pytest.raises(UserError, match="does not reproduce"):
        _pair(seeded(ResidualMLP, seed=7), onnx_model, units, x)


class FlatMLP(nn.Module):
    """ResidualMLP's computation with no submodule per block: nothing to pair a unit with."""

    def __init__(self, source: ResidualMLP) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in source.parameters()])

    def forward(self, x):
        w = list(self.weights)
        h = nn.functional.linear(x, w[0], w[1])
        for k in range(2, len(w) - 2, 4):
            h = h + nn.functional.linear(torch.relu(nn.functional.linear(h, w[k], w[k + 1])), w[k + 2], w[k + 3])
        return nn.functional.linear(h, w[-2], w[-1])


def test_pairing_refuses_a_model_without_matching_modules():
    torch_model, path = exported("mlp", "legacy")
    onnx_model = onnx.load(str(path))
    x = np.random.default_rng(4).standard_normal((4, 5)).astype(np.float32)
    flat = FlatMLP(torch_model).eval()
    np.testing.assert_allclose(flat(torch.from_numpy(x)).detach().numpy(),
                               torch_model(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    with pytest.raises(UserError, match="no module of the paired torch model reproduces"):
        _pair(flat, onnx_model, discover(onnx_model, x), x)


def test_task_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    feed = {"input": np.zeros((3, 1), np.float32)}
    labels = np.array([1, 1, 0])
    expected = (math.log(1 + math.exp(2)) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2)))
    assert task_loss(logits, feed, labels, causal_lm=False).item() == pytest.approx(expected, rel=1e-6)
    # No labels: the model's own argmax (0, 1, 0).
    expected = math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))
    assert task_loss(logits, feed, None, causal_lm=False).item() == pytest.approx(expected, rel=1e-6)


def test_causal_lm_loss_is_next_token_cross_entropy_over_unmasked_pairs():
    # Vocabulary 3; position t predicts token t+1. The last token is padding.
    logits = torch.log(torch.tensor([[[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [1 / 3, 1 / 3, 1 / 3]]]))
    feed = {"input_ids": np.array([[0, 1, 2, 0]]), "attention_mask": np.array([[1, 1, 1, 0]])}
    expected = -(math.log(0.5) + math.log(0.8))
    assert task_loss(logits, feed, None, causal_lm=True).item() == pytest.approx(expected, rel=1e-5)


class InplaceActNet(nn.Module):
    """Blocks separated by ReLU(inplace=True) modules that overwrite each block's output tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.body = nn.Sequential(LinearBlock(6, 8), nn.ReLU(inplace=True), LinearBlock(6, 8), nn.ReLU(inplace=True))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(self.inp(x)))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_pairing_survives_in_place_ops_after_a_block(tmp_path, exporter):
    torch.manual_seed(0)
    model = InplaceActNet().eval()
    x = np.random.default_rng(6).standard_normal((6, 5)).astype(np.float32)
    onnx_model = export(model, x[:2], tmp_path / "m.onnx", exporter)
    units = discover(onnx_model, x)
    # The ReLU runs in the parent, after the block: it is not part of the unit.
    assert [u.scope for u in units] == ["body.0", "body.2"]
    pairing = _pair(model, onnx_model, units, x)
    assert pairing.modules == [["body.0"], ["body.2"]]
    assert max(pairing.max_error) < 1e-5
    scores = gradnorm(model, pairing, _batches(x, None, 3), ["input"])
    assert np.all(np.isfinite(scores)) and np.all(scores > 0)
